"""``btcv-unetr serve``: a REST service and a web page for people who do not run Python.

    btcv-unetr serve --checkpoint runs/demo/model.pt [--host 127.0.0.1] [--port 8000] [--token T]

FastAPI on uvicorn (``pip install 'btcv-unetr[serve]'``). The model is loaded once; uploads become
jobs that one worker thread runs in order (one inference at a time on the device), so a client gets
``202`` and a job id at once and polls the job. Routes:

    GET    /                       the web page (btcv_unetr/serve/web/index.html)
    GET    /health                 liveness (never needs the token)
    GET    /info                   model, classes with names and colours, ROI, spacing, precision, version,
                                   the model card (with its warning), provenance of the masks, the limits
    POST   /jobs                   multipart field ``file``: .nii/.nii.gz, a .zip of one DICOM series, or
                                   (2D models) PNG/JPEG -> 202 {"id": ...}; or, with --dicomweb, JSON
                                   {"study_uid", "series_uid"}: the series from the PACS, its SEG stored back
    GET    /jobs, /jobs/{id}       state (queued, running with window progress, done, failed with a reason)
    GET    /jobs/{id}/mask         the mask in the input's geometry (NIfTI uint8; PNG for pictures)
    GET    /jobs/{id}/overlay.png  slices (3D) or the picture (2D) with the mask in the class colours
    GET    /jobs/{id}/volumes      per-class volume in mL (pixel counts in 2D), flagged far outside the plausible range
    GET    /jobs/{id}/geometry     3D: the scan's shape, spacing and affine for the page's viewer (serve.viewer)
    GET    /jobs/{id}/slice        3D: one full-resolution slice's HU and mask (?axis=axial|coronal|sagittal&index=N)
    GET    /jobs/{id}/seg          a DICOM input's mask as a DICOM Segmentation referencing its series
    DELETE /jobs/{id}              removes a job and its files; a running job stops at its next window
    POST   /segment                the same upload for small inputs; answers with the mask itself

A job's record gives its state, ``progress`` (windows run / windows to run, 0..1), ``queue_position``
(1: next to run) while it waits, its input's ``shape`` and ``spacing`` (mm; 1 for pictures), the
``seconds`` it ran, the ``error`` line of a failed job and its result's ``provenance`` (package version,
weights checksum, precision, device, overlap, TTA; also in the mask's header). ``/info`` gives
``spacing`` null for 2D models.

Every client mistake is a 4xx with ``{"detail": "one line"}``: unreadable or truncated files, wrong
dimensions, NaN voxels (400), too large from the header or the body's length (413: serve.limits),
queue full (503 with ``Retry-After``), unknown job (404), no token (401, before any body byte is read).
"""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]

