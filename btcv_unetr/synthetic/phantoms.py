"""Synthetic abdominal CT cases that look to the pipeline like BTCV (it cannot be downloaded here).

Each case is a body (subcutaneous fat, muscle wall, spine, paraspinal and psoas muscles, lung
bases) holding the 13 BTCV organs as smooth labelled shapes: deformed ellipsoids for solid organs
and tubes along polylines for vessels, the esophagus and the pancreas. Shapes are defined in a
patient frame (mm; +x right, +y anterior, +z superior, origin at the body centre at L1) and each
case draws its own body size, placement, rotation, organ sizes, positions, shapes and intensities.

The geometry varies as scanners' does: 512 x 512 in-plane at 0.6-0.95 mm, slices of 2.5-5 mm,
non-identity affines stored in LPS-like and other axis orders, int16 HU images and uint8 labels.

    btcv-unetr phantoms --out DIR --cases 12 --seed 0 [--size 128]
    python -m btcv_unetr.synthetic.phantoms --out DIR ...
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from ..files import atomic_save_nifti, atomic_write_json
from ..labels import label_map
from ..logs import with_progress

FULL_SIZE = 512
STORAGE_ORIENTATIONS = ("LPS", "LPS", "LPS", "RAS", "LPI", "LAS")  # LPS is what most scanners give
AIR_HU, FAT_HU, MUSCLE_HU, BONE_HU, LUNG_HU = -1000.0, -100.0, 50.0, 450.0, -850.0


@dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid: ``|R^T (p - centre) / radii| + ripple(p) < 1``."""

    label: int
    hu: float
    centre: np.ndarray      # (3,) mm, patient frame
    radii: np.ndarray       # (3,) mm
    rotation: np.ndarray    # (3, 3), columns are the blob's axes
    ripple: np.ndarray      # (k, 5): frequency vector (3), phase, amplitude; in normalised units


@dataclass(frozen=True)
class Tube:
    """A tube whose radius varies linearly between the points of a polyline."""

    label: int
    hu: float
    points: np.ndarray      # (n, 3) mm, patient frame
    radii: np.ndarray       # (n,) mm


# (label, HU, centre mm, radii mm, base rotation about z in degrees), portal-venous phase HU.
BLOBS = (
    (6, 105.0, (52, 0, 65), (62, 68, 68), 0.0),      # liver, right upper
    (1, 115.0, (-75, -32, 65), (24, 45, 50), -35.0),  # spleen, left posterior
    (7, 30.0, (-45, 38, 58), (40, 30, 48), 20.0),    # stomach, left anterior
    (2, 165.0, (58, -45, -15), (24, 22, 52), 15.0),  # right kidney, lower than the left
    (3, 165.0, (-58, -45, -5), (24, 22, 52), -15.0),  # left kidney
    (4, 15.0, (50, 48, 8), (15, 15, 30), 10.0),      # gallbladder, under the liver
)
# (label, HU, [(x, y, z, radius), ...])
TUBES = (
    (11, 95.0, [(28, 10, 5, 14), (5, 14, 18, 11), (-35, 6, 28, 10), (-70, -12, 38, 8)]),  # pancreas
    (10, 155.0, [(-72, -22, 45, 5), (-35, -6, 22, 5), (5, 2, 15, 7), (30, 6, 35, 7), (44, 10, 50, 6)]),  # veins
    (9, 140.0, [(22, -30, 130, 11), (22, -32, 0, 11), (18, -26, -160, 10)]),  # inferior vena cava
    (8, 190.0, [(-15, -34, 260, 12), (-18, -38, 0, 11), (-12, -32, -130, 10)]),  # aorta
    (5, 45.0, [(2, -12, 260, 9), (-8, -5, 110, 9), (-28, 16, 85, 9)]),  # esophagus, into the stomach
)
# About 4 mL each, as real adrenal glands (a flat gland some 4 cm long).
ADRENALS = (
    (12, 50.0, (44, -46, 52), (10, 5, 20), 30.0),    # right adrenal, above the right kidney
    (13, 50.0, (-44, -42, 40), (10, 5, 20), -30.0),  # left adrenal
)


class Frame:
    """Maps the patient frame to the scan's RAS voxel grid.

    world = Rz(angle) @ (scale * patient) + shift;  voxel = (world - origin) / spacing.
    """

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray,
                 angle: float, scale: np.ndarray, shift: np.ndarray):
        self.shape, self.spacing, self.origin = shape, spacing, origin
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.scale, self.shift = scale, shift

    def to_world(self, p: np.ndarray) -> np.ndarray:
        q = p * self.scale
        return np.stack([self.cos * q[..., 0] - self.sin * q[..., 1],
                         self.sin * q[..., 0] + self.cos * q[..., 1], q[..., 2]], -1) + self.shift

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the patient-frame box ``[lo, hi]``; None when outside the scan."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        index = (self.to_world(corners) - self.origin) / self.spacing
        start = np.maximum(np.floor(index.min(0)).astype(int), 0)
        stop = np.minimum(np.ceil(index.max(0)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(a, b) for a, b in zip(start, stop))  # type: ignore[return-value]

    def patient_coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient-frame coordinates of the voxels in ``box``: x, y of shape (n, m, 1), z of (1, 1, k)."""
        w = [self.origin[a] + self.spacing[a] * np.arange(box[a].start, box[a].stop, dtype=np.float32)
             for a in range(3)]
        wx, wy = w[0][:, None, None] - self.shift[0], w[1][None, :, None] - self.shift[1]
        px = (self.cos * wx + self.sin * wy) / self.scale[0]
        py = (-self.sin * wx + self.cos * wy) / self.scale[1]
        pz = ((w[2] - self.shift[2]) / self.scale[2])[None, None, :]
        return px.astype(np.float32), py.astype(np.float32), pz.astype(np.float32)


def _rotation(rng: np.random.Generator, yaw_deg: float, jitter_deg: float) -> np.ndarray:
    """Rotation about z by ``yaw_deg`` plus random tilts of up to ``jitter_deg`` about each axis."""
    a, b, c = np.radians(rng.uniform(-jitter_deg, jitter_deg, 3) + (0.0, 0.0, yaw_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_blob(rng: np.random.Generator, label: int, hu: float, centre, radii, yaw: float) -> Blob:
    ripple = np.concatenate([rng.normal(0, 2.5, (3, 3)), rng.uniform(0, 2 * np.pi, (3, 1)),
                             rng.uniform(0.02, 0.07, (3, 1))], axis=1)
    return Blob(label=label, hu=hu + rng.normal(0, 8), centre=np.asarray(centre, float) + rng.normal(0, 5, 3),
                radii=np.asarray(radii, float) * rng.uniform(0.85, 1.15, 3),
                rotation=_rotation(rng, yaw, 10.0), ripple=ripple)


def _random_tube(rng: np.random.Generator, label: int, hu: float, nodes) -> Tube:
    nodes = np.asarray(nodes, float)
    return Tube(label=label, hu=hu + rng.normal(0, 8), points=nodes[:, :3] + rng.normal(0, 3, (len(nodes), 3)),
                radii=nodes[:, 3] * rng.uniform(0.85, 1.15))


def random_anatomy(rng: np.random.Generator) -> list[Blob | Tube]:
    """The 13 organs of one case, in painting order (later shapes win where they touch)."""
    shapes: list[Blob | Tube] = [_random_blob(rng, *spec) for spec in BLOBS]
    shapes += [_random_tube(rng, *spec) for spec in TUBES]
    shapes += [_random_blob(rng, *spec) for spec in ADRENALS]
    return shapes


def _blob_mask(blob: Blob, px, py, pz) -> np.ndarray:
    d = (px - blob.centre[0], py - blob.centre[1], pz - blob.centre[2])
    u = [sum(blob.rotation[i, a] * d[i] for i in range(3)) / blob.radii[a] for a in range(3)]
    rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    for fx, fy, fz, phase, amplitude in blob.ripple:
        rho = rho + amplitude * np.sin(fx * u[0] + fy * u[1] + fz * u[2] + phase)
    return rho < 1.0


def _paint(frame: Frame, hu: np.ndarray, label: np.ndarray | None, value: float, label_id: int,
           lo: np.ndarray, hi: np.ndarray, inside) -> None:
    """Set voxels of the patient box ``[lo, hi]`` where ``inside(px, py, pz)`` holds."""
    box = frame.box(lo, hi)
    if box is None:
        return
    mask = inside(*frame.patient_coords(box))
    mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in box))
    hu[box][mask] = value
    if label is not None:
        label[box][mask] = label_id


def _segment_distance(px, py, pz, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each point to segment ``ab`` and the position ``t`` in [0, 1] of the nearest point."""
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2)
    return dist, t


class Body:
    """Elliptic body cross-section: fat layer, muscle wall, and the abdominal cavity inside it."""

    def __init__(self, rng: np.random.Generator):
        self.half_axes = np.array([145.0, 105.0])
        self.fat = rng.uniform(12.0, 30.0)
        self.wall = rng.uniform(8.0, 13.0)

    def inside(self, px, py, pz, shrink: float = 0.0) -> np.ndarray:
        # A slow change of girth along z so that slices differ a little.
        girth = 1.0 + 0.03 * np.sin(pz / 90.0)
        ax, ay = (self.half_axes[0] - shrink) * girth, (self.half_axes[1] - shrink) * girth
        return (px / ax) ** 2 + (py / ay) ** 2 < 1.0

    def cavity(self, px, py, pz) -> np.ndarray:
        return self.inside(px, py, pz, self.fat + self.wall)


def _paint_body(frame: Frame, hu: np.ndarray, body: Body, z_range: tuple[float, float]) -> None:
    lo, hi = np.array([-400.0, -400.0, z_range[0]]), np.array([400.0, 400.0, z_range[1]])
    _paint(frame, hu, None, FAT_HU, 0, lo, hi, body.inside)
    _paint(frame, hu, None, MUSCLE_HU, 0, lo, hi, lambda x, y, z: body.inside(x, y, z, body.fat))
    _paint(frame, hu, None, FAT_HU + 10, 0, lo, hi, body.cavity)
    columns = [((0, -72), (18, 18), BONE_HU),             # vertebral bodies
               ((0, -100), (22, 11), BONE_HU),            # posterior elements
               ((0, -88), (7, 7), 20.0),                  # spinal canal
               ((38, -98), (20, 18), MUSCLE_HU), ((-38, -98), (20, 18), MUSCLE_HU)]  # paraspinal muscles
    for (cx, cy), (rx, ry), value in columns:
        _paint(frame, hu, None, value, 0, np.array([cx - rx, cy - ry, z_range[0]]),
               np.array([cx + rx, cy + ry, z_range[1]]),
               lambda x, y, z, cx=cx, cy=cy, rx=rx, ry=ry: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0)
    for side in (1.0, -1.0):  # psoas muscles widen towards the pelvis
        _paint(frame, hu, None, MUSCLE_HU, 0, np.array([side * 40 - 30, -90, z_range[0]]),
               np.array([side * 40 + 30, -30, -20]),
               lambda x, y, z, s=side: np.hypot(x - s * 40, y + 60) < 8 + 0.12 * np.clip(-20 - z, 0, 150))
        lung = Blob(0, LUNG_HU, np.array([side * 80, -15, 215]), np.array([62, 72, 95]), np.eye(3), np.zeros((0, 5)))
        _paint(frame, hu, None, LUNG_HU, 0, lung.centre - lung.radii, lung.centre + lung.radii,
               lambda x, y, z, b=lung: _blob_mask(b, x, y, z) & body.cavity(x, y, z))


def _paint_bowel(frame: Frame, hu: np.ndarray, body: Body, rng: np.random.Generator) -> None:
    """Unlabelled bowel loops in the lower abdomen, so that background is not just fat."""
    for _ in range(rng.integers(16, 26)):
        centre = np.array([rng.uniform(-80, 80), rng.uniform(-20, 60), rng.uniform(-150, -10)])
        loop = _random_blob(rng, 0, rng.uniform(0, 45), centre, rng.uniform(15, 32, 3), rng.uniform(0, 180))
        _paint(frame, hu, None, loop.hu, 0, loop.centre - loop.radii.max() * 1.2,
               loop.centre + loop.radii.max() * 1.2, lambda x, y, z, b=loop: _blob_mask(b, x, y, z) & body.cavity(x, y, z))


def _paint_organ(frame: Frame, hu: np.ndarray, label: np.ndarray, shape: Blob | Tube, body: Body) -> None:
    if isinstance(shape, Blob):
        reach = shape.radii.max() * 1.2
        _paint(frame, hu, label, shape.hu, shape.label, shape.centre - reach, shape.centre + reach,
               lambda x, y, z: _blob_mask(shape, x, y, z) & body.cavity(x, y, z))
        return
    for a, b, ra, rb in zip(shape.points[:-1], shape.points[1:], shape.radii[:-1], shape.radii[1:]):
        reach = max(ra, rb)
        _paint(frame, hu, label, shape.hu, shape.label, np.minimum(a, b) - reach, np.maximum(a, b) + reach,
               lambda x, y, z, a=a, b=b, ra=ra, rb=rb: _in_segment(x, y, z, a, b, ra, rb))


def _in_segment(x, y, z, a, b, ra, rb) -> np.ndarray:
    dist, t = _segment_distance(x, y, z, a, b)
    return dist < ra + t * (rb - ra)


def _scan_geometry(rng: np.random.Generator, size: int, frame_scale: np.ndarray, shift: np.ndarray):
    """Voxel spacing (mm), shape and the z extent (patient frame) of one scan."""
    scale = FULL_SIZE / size
    # The field of view must hold the body: widen the spacing for big bodies, as a technician would.
    needed = 2 * (145.0 * frame_scale[0] + abs(shift[0])) + 20.0
    in_plane = max(rng.uniform(0.6, 0.95), needed / FULL_SIZE)
    thickness = round(rng.uniform(2.5, 5.0) * 4) / 4
    spacing = np.array([in_plane * scale, in_plane * scale, thickness * min(scale, 2.0)])
    z_range = (-rng.uniform(120.0, 200.0), rng.uniform(140.0, 175.0))
    slices = int(round((z_range[1] - z_range[0]) * frame_scale[2] / spacing[2]))
    return spacing, (size, size, max(slices, 8)), z_range


@dataclass
class PhantomCase:
    image: nib.Nifti1Image   # int16 HU
    label: nib.Nifti1Image   # uint8, 0..13, same grid as the image


def generate_case(seed: int, index: int, size: int = FULL_SIZE) -> PhantomCase:
    """Case ``index`` of the phantom set drawn with ``seed``; the same arguments give the same case.

    Args:
        seed: data-set seed.
        index: case number; each case has its own random stream, so a case does not depend on how
            many others are generated.
        size: in-plane matrix (512 like BTCV); smaller sizes keep the anatomy and widen the voxels.
    """
    rng = np.random.default_rng([seed, index])
    frame_scale = np.array([rng.uniform(0.88, 1.08), rng.uniform(0.88, 1.1), rng.uniform(0.9, 1.1)])
    shift = np.array([rng.uniform(-12, 12), rng.uniform(-20, 5), 0.0])
    spacing, shape, z_range = _scan_geometry(rng, size, frame_scale, shift)
    origin = np.array([-(shape[0] - 1) / 2 * spacing[0], -(shape[1] - 1) / 2 * spacing[1],
                       z_range[0] * frame_scale[2]])
    frame = Frame(shape, spacing, origin, math.radians(rng.uniform(-6, 6)), frame_scale, shift)

    hu = np.full(shape, AIR_HU, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = Body(rng)
    _paint_body(frame, hu, body, z_range)
    _paint_bowel(frame, hu, body, rng)
    for organ in random_anatomy(rng):
        _paint_organ(frame, hu, label, organ, body)
    hu += _smooth_field(rng, shape)
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(8.0, 22.0))
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    codes = STORAGE_ORIENTATIONS[rng.integers(len(STORAGE_ORIENTATIONS))]
    return PhantomCase(image=_nifti(image, affine, codes), label=_nifti(label, affine, codes))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Low-frequency intensity inhomogeneity (HU), as beam hardening and scatter leave."""
    field = np.zeros(shape, dtype=np.float32)
    for axis in range(3):
        t = np.linspace(0, 1, shape[axis], dtype=np.float32)
        wave = rng.uniform(5.0, 15.0) * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 2 * np.pi))
        field += wave.reshape([-1 if a == axis else 1 for a in range(3)])
    return field


def _nifti(array: np.ndarray, ras_affine: np.ndarray, codes: str) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` (RAS voxel order) stored in the axis order ``codes``."""
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    data = np.ascontiguousarray(apply_orientation(array, transform))
    affine = ras_affine @ inv_ornt_aff(transform, array.shape)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def write_dataset(out: str | Path, cases: int, seed: int = 0, size: int = FULL_SIZE,
                  test_cases: int = 0, progress: bool = True) -> Path:
    """Write ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and ``dataset.json``; returns the datalist path.

    The last fifth of the labelled cases (at least one) forms the validation split.
    """
    if cases < 2:
        raise ValueError("cases must be >= 2 (at least one training and one validation case)")
    out = Path(out)
    entries = []
    for index in with_progress(range(1, cases + 1), progress, "labelled cases"):
        case = generate_case(seed, index, size)
        entry = {"image": f"imagesTr/img{index:04d}.nii.gz", "label": f"labelsTr/label{index:04d}.nii.gz"}
        atomic_save_nifti(case.image, out / entry["image"])
        atomic_save_nifti(case.label, out / entry["label"])
        entries.append(entry)
    tests = []
    for index in with_progress(range(cases + 1, cases + test_cases + 1), progress, "test cases"):
        tests.append(f"imagesTs/img{index:04d}.nii.gz")
        atomic_save_nifti(generate_case(seed, index, size).image, out / tests[-1])
    n_val = max(1, cases // 5)
    datalist = {
        "name": "btcv-phantom", "description": f"synthetic abdominal CT, seed {seed}, size {size}",
        # Read by the model card of every checkpoint trained on it: a phantom-trained model is not for real scans.
        "synthetic": True, "generator": "btcv-unetr phantoms",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": label_map(),
        "numTraining": cases, "numTest": test_cases,
        "training": entries[:-n_val], "validation": entries[-n_val:], "test": tests,
    }
    path = out / "dataset.json"
    atomic_write_json(path, datalist)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cases", type=int, default=12, help="labelled cases (default 12)")
    parser.add_argument("--test_cases", type=int, default=2, help="unlabelled test cases (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=FULL_SIZE,
                        help="in-plane matrix (default 512, like BTCV); smaller is faster, same anatomy")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    if args.cases < 2 or args.test_cases < 0:
        raise UserError("phantoms: --cases must be >= 2 and --test_cases >= 0")
    if not 32 <= args.size <= 2048:
        raise UserError(f"phantoms: --size {args.size} must be between 32 and 2048")
    path = write_dataset(args.out, args.cases, args.seed, args.size, args.test_cases)
    print(f"wrote {args.cases} labelled and {args.test_cases} test cases; datalist: {path}")
    return 0
