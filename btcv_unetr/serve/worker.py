"""The work of one job: the predictor on the job's input, then mask, volumes and a DICOM job's SEG in its folder.

    organ_volumes  per-class voxel counts, volumes in mL and flags for volumes far outside the plausible range
    Segmenter      runs a job (called by the queue's worker thread); draws a done job's overlay on request
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np

from ..data.datalist import class_names
from ..data.images import read_volume, write_mask
from ..errors import UserError
from ..files import atomic_write_text
from ..inference.dicom_outputs import BY_SHORT_NAME, dicom_files, write_dicom_output
from ..inference.plots import class_colours, save_case_overlay
from ..io.card import card_warning
from ..labels import PLAUSIBLE_VOLUMES_ML, volume_flag
from .jobs import Job, JobStore
from .pacs import PacsError, store_instance
from .uploads import series_record_files


def organ_volumes(labels: np.ndarray, affine: np.ndarray | None, names: list[str]) -> dict:
    """Voxel counts and volumes in mL of classes ``1..len(names)``; pictures (no ``affine``): pixel counts.

    Each organ with a plausible adult range (:data:`~btcv_unetr.labels.PLAUSIBLE_VOLUMES_ML`) carries it
    as ``plausible_ml`` and ``flag`` "low"/"high" when its volume is far outside it (else None).
    """
    counts = np.bincount(labels.ravel(), minlength=len(names) + 1)
    colours = class_colours(len(names) + 1).tolist()
    millilitres = None if affine is None else abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    organs = []
    for index, name in enumerate(names, start=1):
        volume = None if millilitres is None else round(float(counts[index]) * millilitres, 3)
        plausible = PLAUSIBLE_VOLUMES_ML.get(name) if volume is not None else None
        organs.append({"index": index, "name": name, "color": colours[index], "voxels": int(counts[index]),
                       "volume_ml": volume, "plausible_ml": list(plausible) if plausible else None,
                       "flag": volume_flag(name, volume) if volume is not None else None})
    return {"unit": "pixels" if affine is None else "mL", "organs": organs}


class Segmenter:
    """Runs one job: the predictor on the job's input, then mask, volumes (and a DICOM job's SEG) in its folder."""

    def __init__(self, predictor, store: JobStore, dicomweb: str | None = None):
        self.predictor, self.store, self.dicomweb = predictor, store, dicomweb
        model = predictor.config.model
        self.names = class_names(predictor.config.data, model.out_channels)
        self.pictures = model.spatial_dims == 2
        self._drawing = threading.Lock()

    def __call__(self, job: Job) -> None:
        folder = self.store.folder(job.id)
        path = folder / job.input
        predictor = self.predictor
        try:
            image = predictor.prepare(path)
        except UserError as exc:  # the client knows its file by its own name, never by the server's path
            raise UserError(str(exc).replace(str(path), job.name)) from None
        job.windows_total = predictor.window_count(image)
        job.provenance = predictor.provenance()

        def count(windows: int) -> None:
            job.windows_done += windows
            job.check_cancelled()  # a DELETE, the time limit or the server's stop ends the job here

        job.check_cancelled()
        predictor.on_windows = count
        try:
            labels, _ = predictor.to_scan(predictor.probabilities(image), image, keep_probabilities=False)
        finally:
            predictor.on_windows = None
        job.check_cancelled()
        self._write_outputs(job, folder, path, labels)

    def _write_outputs(self, job: Job, folder: Path, path: Path, labels: np.ndarray) -> None:
        mask = folder / ("mask.png" if self.pictures else "mask.nii.gz")
        write_mask(labels, path, mask, provenance=job.provenance)
        # The scan's header for its voxel size (the predictor saw it resampled); a picture needs none.
        affine = None if self.pictures else nib.load(str(path)).affine
        atomic_write_text(folder / "volumes.json", json.dumps(organ_volumes(labels, affine, self.names)))
        job.outputs = {"mask": mask.name, "volumes": "volumes.json"}
        if job.kind == "dicom":
            self._write_dicom_outputs(job, folder, affine, labels)

    def _write_dicom_outputs(self, job: Job, folder: Path, affine: np.ndarray, labels: np.ndarray) -> None:
        """``labels`` ``(X, Y, Z)`` (on the grid of RAS ``affine``) as DICOM objects of the job's series in
        ``folder/dicom``: SEG and RTSTRUCT for every DICOM job, and what a PACS job asks to store (``store``, the
        overlay series too), stored back. One that cannot be written (no dicom extra, a series it cannot
        reference) leaves the job done without it, with a note: the mask is the job's result."""
        dicom = folder / "dicom"
        files = series_record_files(folder)
        if not files:  # a job kept from an older version, which recorded no stacked files
            return
        store = list((job.pacs or {}).get("store") or ["seg"]) if job.pacs is not None else []
        warning = card_warning(self.predictor.model_card)
        problems = []
        for short in dict.fromkeys(["seg", "rtstruct", *store]):
            output = BY_SHORT_NAME[short]
            path = folder / output.job_file
            try:
                write_dicom_output(output, labels, affine, files, self.names, path, provenance=job.provenance,
                                   warning=warning)
            except (UserError, ImportError) as exc:
                why = str(exc).replace(str(dicom), job.name)  # never the server's paths
                print(f"job {job.id}: no {output.what}: {why}", file=sys.stderr)
                job.notes.append(f"no {output.what} was written: {why}")  # the mask is still the job's result
                if short in store:
                    problems.append(f"no {output.what} was written: {why}")
                continue
            job.outputs[output.kind] = path.name
            if short in store:
                problems.extend(self._store(path, output))
        if job.pacs is not None:
            job.stored_to_pacs = "; ".join(problems) if problems else True

    def _store(self, path: Path, output) -> list[str]:
        """STOW-RS of the files of one output; what went wrong, one line each."""
        if not self.dicomweb:  # a PACS job kept over a restart without --dicomweb
            return [f"{output.what} not stored: this server runs without --dicomweb now"]
        try:
            for file in dicom_files(path):
                store_instance(self.dicomweb, file)
        except PacsError as exc:
            return [f"{output.what}: {exc.detail}"]
        return []

    def draw_overlay(self, job: Job) -> Path | None:
        """``overlay.png`` of a done job, drawn on first request (outside the inference worker: matplotlib
        takes longer than a small scan's windows); None without matplotlib."""
        folder = self.store.folder(job.id)
        out = folder / "overlay.png"
        with self._drawing:  # one picture at a time: pyplot's state is global
            if out.is_file():
                return out
            mask = read_volume(folder / job.outputs["mask"])
            labels = np.asarray(mask.data).reshape(mask.spatial_shape)
            drawn = save_case_overlay(folder / job.input, labels, out, title=job.name, names=self.names)
            return out if drawn else None
