"""DICOM Segmentation objects (highdicom) for masks of DICOM series: what PACS viewers (OHIF, 3D Slicer) show.

    require_highdicom  the ``dicom`` extra, or one line that says how to install it
    organ_codes        SNOMED CT code (and laterality) of an organ name; generic where none exists
    slice_indices      which slice of the mask's grid each SOP instance of the series is
    write_dicom_seg    labels on the series' grid -> one SEG file referencing the series, atomically

A mask here is ``(X, Y, Z)`` uint8 in the voxel order of the NIfTI that SimpleITK wrote from the
series (X: the slices' columns, Y: their rows, Z: the slices), with that NIfTI's RAS affine.
Each slice is matched to its SOP instance by the instance's ImagePositionPatient (DICOM's world is
LPS), never by file order, so the frames land where the series' own slices are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..data.dicom import frame_count, frame_geometry
from ..data.images import LPS_TO_RAS
from ..errors import UserError
from ..files import atomic_write
from .dicom_outputs import LO_LIMIT, warning_label
from .provenance import network_of

if TYPE_CHECKING:
    from pydicom.sr.coding import Code

EXTRA_LINE = "--output_format dicom_seg needs the dicom extra: pip install 'btcv-unetr[dicom]'"
# A slice farther than this from a voxel plane of the grid (in voxels), or in-plane cosines farther
# apart than COSINE_TOLERANCE, is not on the grid: NIfTI stores its affine in float32.
POSITION_TOLERANCE = 0.05
COSINE_TOLERANCE = 1e-3


def require_highdicom(what: str = "--output_format dicom_seg") -> None:
    """Raise a one-line :class:`UserError` naming ``what`` when highdicom (the ``dicom`` extra) is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UserError(EXTRA_LINE.replace("--output_format dicom_seg", what, 1)) from None


def organ_codes(name: str) -> tuple[Code, Code | None]:
    """``(property type, laterality modifier or None)`` as pydicom ``Code``s for a class name.

    The 13 BTCV organs have SNOMED CT codes; the kidneys and adrenal glands take the organ's code
    with a Right/Left modifier, the way DICOM's segmentation property types (CID 7151) code
    laterality. Any other name gets the generic "anatomical structure".
    """
    from pydicom.sr.codedict import codes
    sct = codes.SCT
    known = {"spleen": (sct.Spleen, None), "right kidney": (sct.Kidney, sct.Right),
             "left kidney": (sct.Kidney, sct.Left), "gallbladder": (sct.Gallbladder, None),
             "esophagus": (sct.Esophagus, None), "liver": (sct.Liver, None), "stomach": (sct.Stomach, None),
             "aorta": (sct.Aorta, None), "inferior vena cava": (sct.InferiorVenaCava, None),
             # BTCV labels the portal and splenic veins as one class, and no SNOMED CT concept covers
             # exactly those two veins: the generic code, with the name in the segment label.
             "portal and splenic veins": (sct.AnatomicalStructure, None),
             "pancreas": (sct.Pancreas, None), "right adrenal gland": (sct.AdrenalGland, sct.Right),
             "left adrenal gland": (sct.AdrenalGland, sct.Left)}
    return known.get(name.strip().lower(), (sct.AnatomicalStructure, None))


def _parameter_text(value: object) -> str:
    """A value of AlgorithmParameters, which is ``key=value`` items joined by commas (as highdicom writes and reads
    them): lists joined by spaces, and no comma or equals sign left inside (";" and ":" stand for them)."""
    text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace(",", ";").replace("=", ":")


def algorithm_parameters(provenance: Mapping) -> dict[str, str]:
    """The SEG's AlgorithmParameters from a provenance: its plain values (weights checksum, precision, device, overlap,
    TTA, the net's name), and each net's ``model_name``, own settings and ``roi_size`` flattened; an ensemble's per
    member as ``memberK_<key>`` (K from 1), with its weights checksum. The whole provenance, as JSON, is in the
    Image Comments."""
    parameters = {key: _parameter_text(value) for key, value in provenance.items()
                  if key not in ("package_version", "networks", "ensemble_weights_sha256")}
    networks = list(provenance.get("networks") or [])
    checksums = list(provenance.get("ensemble_weights_sha256") or [])
    for index, net in enumerate(networks, start=1):
        prefix = f"member{index}_" if len(networks) > 1 else ""
        facts = {"model_name": net.get("model_name"), **(net.get("network_settings") or {}),
                 "roi_size": "x".join(map(str, net.get("roi_size") or []))}
        if prefix and index <= len(checksums):
            facts["weights_sha256"] = checksums[index - 1]
        parameters.update({prefix + key: _parameter_text(value) for key, value in facts.items()})
    return parameters


def _segment_descriptions(names: Sequence[str], colours: np.ndarray, provenance: Mapping | None = None) -> list:
    """One highdicom ``SegmentDescription`` per class ``1..len(names)``; ``colours`` is ``(len(names) + 1, 3)``
    uint8 RGB, row 0 the background's. ``provenance`` names the algorithm ("btcv-unetr SegResNet", "btcv-unetr
    ensemble of 2: UNETR, Swin UNETR") and becomes its parameters (:func:`algorithm_parameters`), the standard's
    place for how a segment was made."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    parameters = algorithm_parameters(provenance or {})
    algorithm = hd.AlgorithmIdentificationSequence(name=f"btcv-unetr {network_of(provenance)}"[:LO_LIMIT],
                                                   version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   parameters=parameters or None)
    descriptions = []
    for number, name in enumerate(names, start=1):
        kind, side = organ_codes(name)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in colours[number])))
        if side is not None:  # highdicom has no argument for it: the attribute of the type's code item
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
                [hd.sr.CodedConcept.from_code(side)]
        descriptions.append(description)
    return descriptions


def _planes(sources: Sequence, display: str, what: str = "a SEG"
            ) -> list[tuple[str, np.ndarray, np.ndarray, tuple[int, int]]]:
    """``(name, position, orientation, (columns, rows))`` of every image plane of ``sources``: each single-frame
    instance, or each frame of a multi-frame (enhanced) image, in the order a SEG's frames follow them."""
    planes = []
    for dataset in sources:
        frames = frame_count(dataset)
        size = (int(dataset.Columns), int(dataset.Rows))
        for frame in ([None] if frames == 1 else range(frames)):
            position, orientation, _ = frame_geometry(dataset, frame)
            name = f"instance {dataset.SOPInstanceUID}" + ("" if frame is None else f" frame {frame + 1}")
            if position is None or orientation is None:
                raise UserError(f"{display}: {name} has no position or orientation: {what} cannot place it; the mask "
                                "is written as NIfTI only")
            planes.append((name, position, orientation, size))
    return planes


def slice_indices(sources: Sequence, affine: np.ndarray, shape: tuple[int, int, int], display: str,
                  what: str = "a SEG") -> list[int]:
    """For each source dataset (pydicom, pixels not needed), the slice ``k`` of the ``shape`` = ``(X, Y, Z)``
    grid with RAS ``affine`` that it is; a one-line :class:`UserError` naming ``display`` when an instance is not
    one of that grid's slices (columns along X, rows along Y) or two are the same slice. Planes may lack an
    instance: those the reader interpolated over missing slices."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # the same flip takes RAS back to LPS
    to_voxel = np.linalg.inv(lps)
    axes = lps[:3, :2] / np.linalg.norm(lps[:3, :2], axis=0)
    indices = []
    for name, position, orientation, size in _planes(sources, display, what):
        voxel = to_voxel @ np.append(position, 1.0)
        k = int(round(voxel[2]))
        cosines = orientation.reshape(2, 3).T
        on_grid = np.abs(voxel[:3] - (0.0, 0.0, k)).max() < POSITION_TOLERANCE and \
            np.abs(cosines - axes).max() < COSINE_TOLERANCE and 0 <= k < shape[2] and size == shape[:2]
        if not on_grid:
            raise UserError(f"{display}: {name} is not a slice of the series' grid: {what} needs one series of "
                            "parallel slices of one size; the mask is written as NIfTI only")
        indices.append(k)
    if len(set(indices)) != len(indices):
        raise UserError(f"{display}: the series has two instances at one slice position: {what} cannot reference "
                        "it; the mask is written as NIfTI only")
    # A plane without an instance was interpolated over a gap in the series (btcv_unetr.data.dicom): no frame there.
    return indices


def with_uids(dataset, path: Path, display: str, what: str = "a SEG"):
    """``dataset`` with its SOP Class and Instance UIDs, taken from the file meta header where an anonymiser emptied
    them in the dataset (a SEG references each source image by both); one line when neither place has them."""
    meta = getattr(dataset, "file_meta", None)
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if str(dataset.get(keyword) or "").strip():
            continue
        value = str(meta.get(meta_keyword) or "").strip() if meta is not None else ""
        if not value:
            raise UserError(f"{display}: {path.name} has no {keyword} (emptied by an anonymiser?), which {what} "
                            "needs to reference it; the mask is written as NIfTI only")
        setattr(dataset, keyword, value)
    return dataset


def write_dicom_seg(labels: np.ndarray, affine: np.ndarray, source_files: Sequence[Path], names: Sequence[str],
                    path: Path, colours: np.ndarray | None = None, provenance: Mapping | None = None,
                    warning: str | None = None) -> None:
    """Write ``labels`` as a DICOM Segmentation to ``path`` (temporary name, then rename).

    Args:
        labels: ``(X, Y, Z)`` uint8 classes on the series' grid (0 background, ``1..len(names)`` organs).
        affine: 4x4 voxel-to-RAS affine of that grid (mm).
        source_files: the series' DICOM files, any order; the SEG references them and copies the patient and study.
        names: class names of ``1..len(names)``: segment labels, and the SNOMED CT codes of :func:`organ_codes`.
        colours: ``(len(names) + 1, 3)`` uint8 RGB display colours; default the overlays' organ colours.
        provenance: what the mask was made with (:func:`btcv_unetr.inference.provenance.provenance`): its net names
            the algorithm, the manufacturer's model and the descriptions (UNETR where it names none); the whole is
            the segments' algorithm parameters, and JSON in the SEG's Image Comments.
        warning: the model card's warning (a phantom-trained or untrained model), or None: the series description
            and the content description then start "NOT FOR CLINICAL USE", and the Image Comments hold it whole.

    One BINARY segment per class (described even when empty, so segment numbers are the class
    indices); frames without any voxel of a segment are left out.
    """
    require_highdicom()
    import highdicom as hd
    import pydicom
    if colours is None:
        from .plots import class_colours
        colours = class_colours(len(names) + 1)
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim != 3 or int(labels.max(initial=0)) > len(names):
        raise ValueError(f"labels {labels.shape} with classes up to {int(labels.max(initial=0))}: expected (X, Y, Z) "
                         f"with classes 0..{len(names)}")
    display = str(Path(source_files[0]).parent)
    sources = [with_uids(pydicom.dcmread(str(name), stop_before_pixels=True, force=True), Path(name), display)
               for name in source_files]
    if len(sources) > 1 and any(frame_count(s) > 1 for s in sources):
        raise UserError(f"{display}: several multi-frame images in one series: a SEG references one multi-frame "
                        "image or single-frame instances; the mask is written as NIfTI only")
    indices = slice_indices(sources, affine, labels.shape, display)
    if not getattr(sources[0], "FrameOfReferenceUID", None):
        # A SEG is placed on its images through their frame of reference: one made up here would not match.
        raise UserError(f"{display}: the series has no FrameOfReferenceUID, which a SEG needs to be placed on it; "
                        "the mask is written as NIfTI only")
    # (instances, or the frames of one multi-frame image, rows, columns), in the sources' order
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0)[indices])
    first, network = sources[0], network_of(provenance)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(names, colours, provenance), series_instance_uid=hd.UID(),
            series_number=int(getattr(first, "SeriesNumber", None) or 0) + 1000, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="btcv-unetr", manufacturer_model_name=network[:LO_LIMIT],
            software_versions=__version__, device_serial_number="none",
            # The net first: a long name (an ensemble's) is cut at the LO's 64 characters from the end.
            content_description=warning_label(warning, f"{network}: abdominal organs (BTCV classes)"),
            series_description=warning_label(warning, f"{network} organ segmentation"))
    except (ValueError, AttributeError, KeyError, TypeError) as exc:  # highdicom's checks of the sources' attributes
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0] or type(exc).__name__
        raise UserError(f"{display}: a SEG cannot reference this series ({why}); the mask is written as NIfTI only") \
            from None
    comments = [warning] if warning else []
    if provenance:
        comments.append(json.dumps(dict(provenance), sort_keys=True))
    if comments:
        seg.ImageComments = "\n".join(comments)
    atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
