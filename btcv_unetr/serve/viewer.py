"""The web page's slice viewer: a done job's scan and mask at full resolution, one slice at a time.

    GET /jobs/{id}/geometry                               the volume's shape, spacing, affine, first slices
    GET /jobs/{id}/slice?axis=axial|coronal|sagittal&index=N   one slice's HU values and mask labels

Both need the token, like every API route. Arrays are in RAS+ voxel order (:func:`~btcv_unetr.inference.plots.to_display_order`:
index x grows toward the patient's right, y toward anterior, z toward superior), whatever the file's own
order; turning them into the radiological picture is the page's job. A slice is its two remaining axes
in RAS order (axial (x, y), coronal (x, z), sagittal (y, z)), C order, little-endian: the HU values
(``X-Dtype``: int16 when the file's scaled values are whole numbers that fit, else float32), then the
labels as uint8, same shape; ``X-Shape`` and ``X-Spacing`` (mm) give those two axes' sizes.

HU values are the CT as stored in the input file, scaled by its NIfTI slope and intercept: never the
model's normalised intensities. Pictures (2D jobs) have no slices: their overlay is their viewer.

    VolumeCache   the volumes read last, bounded in bytes, so paging slices does not re-read a NIfTI
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from .service import Service, authorised, service

# Two abdominal CTs of 512 x 512 x 300 (int16 HU and uint8 mask: 225 MB each). A volume larger than
# this is still served: it is then the only one kept.
CACHE_BYTES = 512 << 20
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # view -> the RAS axis its slices are taken along
INT16 = np.iinfo(np.int16)


@dataclass
class ViewerVolume:
    """A job's scan (HU) and mask in RAS+ voxel order, with what the page needs to place them."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: list[float]  # mm along x, y, z
    affine: np.ndarray  # RAS+ voxel index -> the scanner's RAS coordinates in mm

    @property
    def nbytes(self) -> int:
        return self.hu.nbytes + self.labels.nbytes

    def geometry(self) -> dict:
        return {"shape": list(self.hu.shape), "spacing": [round(float(s), 6) for s in self.spacing],
                "affine": np.round(self.affine, 6).tolist(), "dtype": self.hu.dtype.name,
                "start": [first_slice(self.labels, axis) for axis in range(3)]}

    def slice(self, axis: int, index: int) -> tuple[bytes, dict[str, str]]:
        """The slice's bytes (HU then labels) and the headers that describe them."""
        take = [slice(None)] * 3
        take[axis] = index
        hu, labels = self.hu[tuple(take)], self.labels[tuple(take)]
        spacing = [s for a, s in enumerate(self.spacing) if a != axis]
        headers = {"X-Shape": ",".join(map(str, hu.shape)), "X-Spacing": ",".join(f"{s:.6g}" for s in spacing),
                   "X-Dtype": hu.dtype.name}
        little = hu.astype(hu.dtype.newbyteorder("<"), copy=False)
        return little.tobytes(order="C") + labels.astype(np.uint8, copy=False).tobytes(order="C"), headers


def first_slice(labels: np.ndarray, axis: int) -> int:
    """Where the page opens along ``axis``: the labelled slice nearest the middle of the labelled range, so
    the first picture shows organs even when two of them lie apart; the middle slice without any label."""
    others = tuple(a for a in range(3) if a != axis)
    filled = np.flatnonzero(labels.any(axis=others))
    if filled.size == 0:
        return labels.shape[axis] // 2
    middle = (filled[0] + filled[-1]) / 2
    return int(filled[np.argmin(np.abs(filled - middle))])


def stored_hu(image: nib.Nifti1Image) -> np.ndarray:
    """The file's voxels scaled by its slope and intercept: int16 when that is exact (most CT), else float32.

    Scaling the raw integers ourselves avoids nibabel's float64 copy of the whole volume."""
    proxy = image.dataobj
    raw = np.asanyarray(proxy.get_unscaled()) if nib.is_proxy(proxy) else np.asanyarray(proxy)
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if raw.dtype.kind in "iu" and raw.size and slope.is_integer() and inter.is_integer():
        ends = np.array([raw.min(), raw.max()], dtype=np.int64) * int(slope) + int(inter)
        if INT16.min <= ends.min() and ends.max() <= INT16.max:
            if slope == 1 and inter == 0:
                return raw.astype(np.int16, copy=False)
            return (raw.astype(np.int32) * int(slope) + int(inter)).astype(np.int16)
    return raw.astype(np.float32) * np.float32(slope) + np.float32(inter)


def read_viewer_volume(scan: Path, mask: Path) -> ViewerVolume:
    """The scan and its mask (same voxel grid) turned to RAS+ voxel order."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    from ..inference.plots import to_display_order
    image = nib.load(str(scan))
    shape = image.shape[:3]
    hu = stored_hu(image).reshape(shape)  # a trailing axis of one (X, Y, Z, 1) is not a second volume
    labels = np.asanyarray(nib.load(str(mask)).dataobj).astype(np.uint8, copy=False).reshape(shape)
    hu, labels, spacing = to_display_order(hu, labels, image.affine)
    affine = image.affine @ inv_ornt_aff(io_orientation(image.affine), shape)
    return ViewerVolume(hu, labels, [float(s) for s in spacing], affine)


class VolumeCache:
    """The volumes read last, up to ``budget`` bytes (the newest one always kept); a volume several requests
    ask for at once is read once."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget = budget
        self._volumes: OrderedDict[str, ViewerVolume] = OrderedDict()
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Lock] = {}

    def get(self, key: str, read: Callable[[], ViewerVolume]) -> ViewerVolume:
        with self._lock:
            if key in self._volumes:
                self._volumes.move_to_end(key)
                return self._volumes[key]
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            with self._lock:
                if key in self._volumes:  # read by the request this one waited for
                    return self._volumes[key]
            volume = read()
            with self._lock:
                self._volumes[key] = volume
                self._reading.pop(key, None)
                self._evict()
        return volume

    def _evict(self) -> None:
        while len(self._volumes) > 1 and sum(v.nbytes for v in self._volumes.values()) > self.budget:
            self._volumes.popitem(last=False)


volumes = VolumeCache()  # one per process: keys are job folders, unique across apps and restarts
router = APIRouter(dependencies=[Depends(authorised)])


def viewer_volume(svc: Service, job_id: str) -> ViewerVolume:
    job = svc.finished(job_id)
    if job.kind == "picture":
        raise HTTPException(404, f"job {job.id} is a picture: it has no slices, see its overlay")
    folder = svc.store.folder(job.id)
    return volumes.get(str(folder), lambda: read_viewer_volume(folder / job.input, folder / job.outputs["mask"]))


@router.get("/jobs/{job_id}/geometry")
def geometry(job_id: str, svc: Service = Depends(service)) -> dict:
    return viewer_volume(svc, job_id).geometry()


# axis and index are plain strings: the application turns any validation error into a message about uploads.
@router.get("/jobs/{job_id}/slice", response_class=Response, response_model=None)
def slice_of(job_id: str, axis: str = "axial", index: str = "", svc: Service = Depends(service)) -> Response:
    if axis not in AXES:
        raise HTTPException(400, f"axis must be one of {', '.join(AXES)}, not {axis!r}")
    volume = viewer_volume(svc, job_id)
    size = volume.hu.shape[AXES[axis]]
    if not index.isdigit() or int(index) >= size:
        raise HTTPException(400, f"index must be a whole number from 0 to {size - 1} for {axis} slices, "
                                 f"not {index!r}")
    content, headers = volume.slice(AXES[axis], int(index))
    return Response(content, media_type="application/octet-stream", headers=headers)
