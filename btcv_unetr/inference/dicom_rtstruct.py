"""DICOM RT Structure Sets (RTSTRUCT) of masks of DICOM series: the contours radiotherapy systems and many PACS show.

    require_skimage        scikit-image (the ``post`` extra), or one line that says how to install it
    plane_contours         closed polygons around the voxels of one plane of one class, in voxel coordinates
    write_dicom_rtstruct   labels on the series' grid -> one RTSTRUCT file referencing the series, atomically

The mask is ``(X, Y, Z)`` uint8 on the grid :mod:`btcv_unetr.data.dicom` reads (X along a slice's columns, Y along
its rows, Z along the normal) with its RAS affine, as for the SEG (:mod:`.dicom_seg`, whose matching of instances
to planes by ImagePositionPatient and whose UIDs from the file meta header are reused here). Each contour lies on
the plane of one source image and references it; planes the reader interpolated over missing slices have no image,
so they get no contour.

The dataset is built with pydicom by hand, not with rt-utils: rt-utils needs opencv-python, whose GUI libraries
(libGL) fail to import in slim Docker images.

Contours are traced by marching squares (scikit-image's ``find_contours``, level 0.5, on the class's plane padded by
one voxel so every contour closes) through the midpoints between voxel centres inside and outside, so a polygon
filled by its voxel centres gives the plane back. RTSTRUCT has no hole semantics that every reader honours: outer
boundaries and the boundaries of holes are written alike, as separate CLOSED_PLANAR contours on the same image, as
most tools write them, and viewers and planning systems fill them even-odd (a hole's contour inside an organ's
cuts it out). One ROI per class that has a contour, numbered by its class index (absent classes are left out, so a
planning system lists no empty structure); each ROI is an ORGAN, coded with the SEG's SNOMED CT codes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.dicom import frame_count
from ..data.images import LPS_TO_RAS
from ..errors import UserError
from ..files import atomic_write
from .dicom_outputs import warning_label
from .dicom_seg import organ_codes, slice_indices, with_uids
from .provenance import DEFAULT_NETWORK, network_of

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# The SOP class RT objects conventionally give the study they reference (Detached Study Management, retired but
# what planning systems expect in RT Referenced Study Sequence).
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
EXTRA_LINE = "--output_format dicom_rtstruct needs scikit-image to trace contours: pip install 'btcv-unetr[post]'"
NIFTI_ONLY = "the mask is written as NIfTI only"
SPACING_TOLERANCE = 1e-3  # relative: PixelSpacing against the affine's in-plane steps (stored as float32)
ST_LIMIT, LO_LIMIT, SH_LIMIT = 1024, 64, 16  # characters of the value representations ST, LO and SH

PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
PATIENT_STUDY_OPTIONAL = ("IssuerOfPatientID", "PatientIdentityRemoved", "DeidentificationMethod", "StudyDescription",
                          "PatientAge", "PatientSize", "PatientWeight")


def require_skimage() -> None:
    """Raise a one-line :class:`UserError` when scikit-image (the ``post`` extra), which traces the contours, is
    missing."""
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        raise UserError(EXTRA_LINE) from None


def plane_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed polygons around the True voxels of a boolean ``(X, Y)`` plane: each ``(points, 2)`` float64 of
    ``(x, y)`` voxel coordinates, once around, its first point not repeated (DICOM closes CLOSED_PLANAR contours
    itself). Outer boundaries and hole boundaries alike (fill even-odd). Only corners are kept: the points in the
    middle of a straight run of the voxel staircase change nothing but the file's size."""
    from skimage.measure import find_contours
    padded = np.pad(plane.astype(np.float32), 1)  # background all round: every contour closes
    polygons = []
    for contour in find_contours(padded, 0.5):
        ring = contour[:-1]  # find_contours repeats the first point at the end of a closed contour
        before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
        corner = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9  # the path turns there
        polygons.append(ring[corner] - 1.0)  # undo the padding
    return polygons


def _plane_geometry(dataset, path: Path, display: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(origin, column step, row step)`` in LPS mm of a single-frame image: the centre of its first pixel, and the
    moves to the next column (along X) and the next row (along Y)."""
    try:
        if frame_count(dataset) != 1:
            raise ValueError("multi-frame")
        origin = np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)
        cosines = np.asarray([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
        if origin.shape != (3,) or cosines.shape != (6,):
            raise ValueError("geometry")
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"{display}: {path.name} is not a single-frame image with a position, orientation and pixel "
                        f"spacing, which an RTSTRUCT's contours are placed by; {NIFTI_ONLY}") from None
    return origin, cosines[:3] * column_spacing, cosines[3:] * row_spacing


def _check_spacing(steps: tuple[np.ndarray, np.ndarray], affine: np.ndarray, path: Path, display: str) -> None:
    """One line when an image's pixel spacing is not the grid's (its position and orientation are checked by
    :func:`.dicom_seg.slice_indices`)."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    for step, axis in zip(steps, (lps[:3, 0], lps[:3, 1])):
        if abs(np.linalg.norm(step) - np.linalg.norm(axis)) > SPACING_TOLERANCE * np.linalg.norm(axis):
            raise UserError(f"{display}: {path.name} has a pixel spacing other than the mask's grid: not a slice of "
                            f"the series' grid; {NIFTI_ONLY}")


def _code_item(code) -> object:
    """A pydicom code sequence item (value, scheme, meaning) of a pydicom ``Code``."""
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def _image_reference(dataset) -> object:
    """A Contour Image Sequence item: the SOP Class and Instance UIDs of one source image."""
    from pydicom.dataset import Dataset
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = dataset.SOPClassUID, dataset.SOPInstanceUID
    return item


def _contour_item(polygon: np.ndarray, geometry: tuple, source, number: int) -> object:
    """One CLOSED_PLANAR contour: ``polygon`` (voxel ``(x, y)``) placed on the plane of image ``source``."""
    from pydicom.dataset import Dataset
    origin, column_step, row_step = geometry
    points = origin + polygon[:, :1] * column_step + polygon[:, 1:] * row_step  # (points, 3) LPS mm
    item = Dataset()
    item.ContourImageSequence = [_image_reference(source)]
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points)
    item.ContourNumber = number
    # A micrometre is far below any CT's pixel; fixed decimals keep every value within DS's 16 characters.
    item.ContourData = [f"{v:.3f}".rstrip("0").rstrip(".") for v in points.ravel()]
    return item


def _contours(labels: np.ndarray, count: int, planes: Sequence[int], sources: Sequence,
              geometries: Sequence[tuple]) -> dict[int, list]:
    """Contour items per class ``1..count`` that has any, on the planes that have an image (``planes[i]`` is the
    plane of ``sources[i]``)."""
    from scipy import ndimage
    image_of = {k: i for i, k in enumerate(planes)}
    contours: dict[int, list] = {}
    for number, box in enumerate(ndimage.find_objects(labels, max_label=count), start=1):
        if box is None:
            continue
        region = labels[box] == number  # only the class's bounding box is traced
        offset = np.array([box[0].start, box[1].start], dtype=np.float64)
        for k in range(box[2].start, box[2].stop):
            if k not in image_of or not region[:, :, k - box[2].start].any():
                continue
            i = image_of[k]
            for polygon in plane_contours(region[:, :, k - box[2].start]):
                items = contours.setdefault(number, [])
                items.append(_contour_item(polygon + offset, geometries[i], sources[i], len(items) + 1))
    return contours


def _copy_patient_and_study(dataset, first) -> None:
    """The patient and study attributes of the series (empty where it has none and DICOM needs them present)."""
    for keyword in PATIENT_STUDY_TYPE2:
        value = first.get(keyword)
        # A name as text: written again in this file's character set, whatever the source's was.
        setattr(dataset, keyword, "" if value is None else str(value) if keyword.endswith("Name") else value)
    for keyword in PATIENT_STUDY_OPTIONAL:
        if first.get(keyword) not in (None, ""):
            setattr(dataset, keyword, first.get(keyword))
    dataset.StudyInstanceUID = first.StudyInstanceUID


def _referenced_frame(first, sources: Sequence) -> object:
    """The Referenced Frame of Reference Sequence item: frame of reference, study, series and all its images."""
    from pydicom.dataset import Dataset
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [_image_reference(s) for s in sources]
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_REFERENCE_CLASS, first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _roi_items(number: int, name: str, colour: np.ndarray, contours: list, frame_uid: str,
               warning: str | None, network: str = DEFAULT_NETWORK) -> tuple:
    """The StructureSetROISequence, ROIContourSequence and RTROIObservationsSequence items of one class; ``network``
    (the net that made the mask, :func:`~btcv_unetr.inference.provenance.network_of`) in its generation's
    description."""
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame_uid, name[:LO_LIMIT]
    if warning:
        roi.ROIDescription = warning[:ST_LIMIT]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{network}, btcv-unetr {__version__}"[:LO_LIMIT]
    contour = Dataset()
    contour.ReferencedROINumber = number
    contour.ROIDisplayColor = [int(c) for c in colour]
    contour.ContourSequence = contours
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = number, number
    kind, side = organ_codes(name)
    observation.SegmentedPropertyCategoryCodeSequence = [_code_item(codes.SCT.AnatomicalStructure)]
    identification = _code_item(kind)
    if side is not None:  # laterality: the modifier the standard puts on the identification code (CID 244)
        identification.SegmentedPropertyTypeModifierCodeSequence = [_code_item(side)]
    observation.RTROIIdentificationCodeSequence = [identification]
    observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
    return roi, contour, observation


def _description(warning: str | None, provenance: Mapping | None) -> str:
    """StructureSetDescription (ST): the warning in full first, then the provenance as JSON."""
    parts = [warning] if warning else []
    if provenance:
        parts.append("provenance: " + json.dumps(dict(provenance), sort_keys=True, separators=(",", ":")))
    return " | ".join(parts)[:ST_LIMIT]


def _structure_set(first, sources: Sequence, rois: list[tuple], description: str, warning: str | None,
                   network: str = DEFAULT_NETWORK):
    """The RT Structure Set dataset (with its file meta) of ``rois``, on the series of ``first``; ``network`` names
    the net in the series description, the manufacturer's model name and the label."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid
    now = datetime.now()
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: copied names keep their letters whatever the source's set
    dataset.SOPClassUID, dataset.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, generate_uid()
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    _copy_patient_and_study(dataset, first)
    dataset.Modality, dataset.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    # The SEG takes the series' number + 1000: this one follows it, so both sort after the images.
    dataset.SeriesNumber = int(first.get("SeriesNumber") or 0) + 1001
    dataset.SeriesDescription = warning_label(warning, f"{network} organ contours")
    dataset.SeriesDate, dataset.SeriesTime = dataset.InstanceCreationDate, dataset.InstanceCreationTime
    dataset.OperatorsName = ""
    dataset.Manufacturer, dataset.SoftwareVersions = "btcv-unetr", __version__
    dataset.ManufacturerModelName = network[:LO_LIMIT]
    dataset.FrameOfReferenceUID = first.FrameOfReferenceUID
    dataset.PositionReferenceIndicator = first.get("PositionReferenceIndicator") or ""
    label = f"{network} organs" if len(network) <= SH_LIMIT - len(" organs") else "organ contours"
    dataset.StructureSetLabel = "NOT FOR CLINICAL" if warning else label  # SH: 16 characters
    dataset.StructureSetName = dataset.SeriesDescription
    if description:
        dataset.StructureSetDescription = description
    dataset.InstanceNumber = 1
    dataset.StructureSetDate, dataset.StructureSetTime = dataset.InstanceCreationDate, dataset.InstanceCreationTime
    dataset.ReferencedFrameOfReferenceSequence = [_referenced_frame(first, sources)]
    dataset.StructureSetROISequence = [roi for roi, _, _ in rois]
    dataset.ROIContourSequence = [contour for _, contour, _ in rois]
    dataset.RTROIObservationsSequence = [observation for _, _, observation in rois]
    dataset.ApprovalStatus = "UNAPPROVED"  # an automatic result: a person reviews it before any plan uses it
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dataset.SOPClassUID, dataset.SOPInstanceUID
    # Implicit VR: its 32-bit lengths hold a contour of any size (explicit VR gives DS values 64 KiB, about 2,500
    # points, which a large organ on a fine grid can pass); every DICOM system reads it, being DICOM's default.
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta
    return dataset


def _save(dataset, path: Path) -> None:
    """``dataset`` as a DICOM file (preamble, file meta, implicit VR little endian) at ``path``."""
    import pydicom
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), dataset, enforce_file_format=True)
    else:  # pydicom 2.4 (the oldest the project allows) says the encoding on the dataset
        dataset.is_little_endian, dataset.is_implicit_VR = True, True
        dataset.save_as(str(path), write_like_original=False)


def _read_sources(source_files: Sequence[Path], display: str) -> list:
    """The series' headers (no pixels) with their SOP UIDs, or the one line that says why none can be referenced."""
    import pydicom
    sources = []
    for name in source_files:
        sources.append(with_uids(pydicom.dcmread(str(name), stop_before_pixels=True, force=True), Path(name),
                                 display, what="an RTSTRUCT"))
    first = sources[0]
    for keyword, why in (("FrameOfReferenceUID", "to be placed on it"), ("StudyInstanceUID", "to reference it"),
                         ("SeriesInstanceUID", "to reference it")):
        values = {str(s.get(keyword) or "").strip() for s in sources}
        if "" in values:
            raise UserError(f"{display}: the series has no {keyword}, which an RTSTRUCT needs {why}; {NIFTI_ONLY}")
        if len(values) > 1:
            raise UserError(f"{display}: the files hold {len(values)} different {keyword}s: an RTSTRUCT references "
                            f"one series in one frame of reference; {NIFTI_ONLY}")
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(first, keyword, str(first.get(keyword)).strip())
    return sources


def write_dicom_rtstruct(labels: np.ndarray, affine: np.ndarray, source_files: Sequence[Path], names: Sequence[str],
                         path: Path, colours: np.ndarray | None = None, provenance: Mapping | None = None,
                         warning: str | None = None) -> None:
    """Write ``labels`` as a DICOM RT Structure Set to ``path`` (temporary name, then rename).

    Args:
        labels: ``(X, Y, Z)`` uint8 classes on the series' grid (0 background, ``1..len(names)`` organs).
        affine: 4x4 voxel-to-RAS affine of that grid (mm).
        source_files: the series' DICOM files that were stacked, any order: each is one plane of the grid (the
            contours on it reference it); planes without a file were interpolated and get no contour.
        names: class names of ``1..len(names)``: ROI names, and the SNOMED CT codes of :func:`.dicom_seg.organ_codes`.
        path: the file to write.
        colours: ``(len(names) + 1, 3)`` uint8 RGB display colours; default the overlays' organ colours.
        provenance: what the mask was made with (:func:`btcv_unetr.inference.provenance.provenance`): its net named in
            the series and ROI generation descriptions and the manufacturer's model name (UNETR where none); JSON in the
            StructureSetDescription, after the warning.
        warning: the model card's warning (:func:`btcv_unetr.io.card.card_warning`) or None: its gist in the
            SeriesDescription and StructureSetName (:func:`warning_label`), "NOT FOR CLINICAL" as the label, and
            in full in the StructureSetDescription and every ROI's description.

    A series the structure set cannot reference (no frame of reference, study or series UID, an image without SOP
    UIDs anywhere, an image off the grid or multi-frame) is one :class:`UserError` line ending "the mask is written
    as NIfTI only", like the SEG's.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim != 3 or int(labels.max(initial=0)) > len(names):
        raise ValueError(f"labels {labels.shape} with classes up to {int(labels.max(initial=0))}: expected (X, Y, Z) "
                         f"with classes 0..{len(names)}")
    if not source_files:
        raise ValueError("no source files: an RTSTRUCT references the series it was made from")
    require_skimage()
    if colours is None:
        from .plots import class_colours
        colours = class_colours(len(names) + 1)
    display = str(Path(source_files[0]).parent)
    sources = _read_sources(source_files, display)
    geometries = [_plane_geometry(s, Path(name), display) for s, name in zip(sources, source_files)]
    planes = slice_indices(sources, affine, labels.shape, display, what="an RTSTRUCT")
    for geometry, name in zip(geometries, source_files):
        _check_spacing(geometry[1:], affine, Path(name), display)
    order = np.argsort(planes, kind="stable")  # the images referenced in slice order, whatever the files' order
    sources, geometries, planes = ([items[i] for i in order] for items in (sources, geometries, planes))
    contours = _contours(labels, len(names), planes, sources, geometries)
    if not contours:  # a structure set lists one ROI at least
        raise UserError(f"{display}: the mask has no organ voxel on any image of the series, and an RTSTRUCT needs one "
                        f"contour at least; {NIFTI_ONLY}")
    first = sources[0]
    network = network_of(provenance)
    rois = [_roi_items(number, names[number - 1], np.asarray(colours)[number], items, first.FrameOfReferenceUID,
                       warning, network) for number, items in sorted(contours.items())]
    dataset = _structure_set(first, sources, rois, _description(warning, provenance), warning, network)
    atomic_write(path, lambda tmp: _save(dataset, tmp))
