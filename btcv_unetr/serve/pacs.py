"""The service's DICOMweb client (plain HTTP, the standard library's urllib): a series from a PACS, a SEG back.

    check_uid        a study or series UID as DICOM spells them (digits and dots), or a one-line refusal
    series_instances QIDO-RS: the SOP instance UIDs of one series, at most a given number
    retrieve_series  WADO-RS: those instances as numbered files in a folder, sizes checked before bodies are read
    store_instance   STOW-RS: one DICOM file (the job's SEG) stored on the PACS

``url`` is the PACS's DICOMweb root (Orthanc: ``http://host:8042/dicom-web``; dcm4chee:
``.../dcm4chee-arc/aets/DCM4CHEE/rs``). Every problem is a :class:`PacsError` with the HTTP status
the service answers and one line that names neither this server's files nor the PACS's address.
"""

from __future__ import annotations

import email.message
import json
import re
import secrets
import socket
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20
DICOM_JSON = "application/dicom+json"
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SOP_INSTANCE_UID = "00080018"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
# A QIDO-RS answer holds one small JSON object per instance: far below this many bytes each.
QIDO_BYTES_PER_INSTANCE = 16 << 10
UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class PacsError(Exception):
    """A PACS request that failed: ``status`` for the service's client (400, 404, 413, 502), ``detail`` one line."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def check_uid(value: object, what: str) -> str:
    """``value`` if it is a DICOM UID (digits and dots, at most 64 characters), else a 400 :class:`PacsError`."""
    if not isinstance(value, str) or len(value) > 64 or not UID.fullmatch(value):
        raise PacsError(400, f"{what} must be a DICOM UID (digits and dots, at most 64 characters), got {value!r:.80}")
    return value


def _open(request: urllib.request.Request, what: str, timeout_s: float, missing: str | None = None):
    """The response to ``request``; HTTP and network failures as :class:`PacsError` (404 -> ``missing``)."""
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404 and missing:
            raise PacsError(404, missing) from None
        raise PacsError(502, f"the PACS answered {exc.code} {exc.reason} to {what}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        why = "no answer within the timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else \
            getattr(reason, "strerror", None) or reason.__class__.__name__
        raise PacsError(502, f"the PACS cannot be reached for {what} ({why})") from None


def _read_limited(response, limit: int, what: str, too_large: str) -> bytes:
    """The body of ``response``, refused (413) by its Content-Length before it is read, or once more than
    ``limit`` bytes arrive when it has none."""
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PacsError(413, too_large)
    parts, received = [], 0
    try:
        while chunk := response.read(min(CHUNK, limit + 1 - received)):
            received += len(chunk)
            if received > limit:
                raise PacsError(413, too_large)
            parts.append(chunk)
    except (OSError, socket.timeout) as exc:
        raise PacsError(502, f"the PACS stopped sending {what} ({exc.__class__.__name__})") from None
    return b"".join(parts)


def series_instances(url: str, study: str, series: str, max_instances: int, timeout_s: float = 60.0) -> list[str]:
    """QIDO-RS: the SOP instance UIDs of ``series`` in ``study``; 404 when there are none, 413 over ``max_instances``.

    Asks for one more than the limit, so a series over it is told without listing it all.
    """
    study, series = check_uid(study, "study_uid"), check_uid(series, "series_uid")
    what = f"the instances of series {series}"
    missing = f"series {series} of study {study} is not on the PACS"
    request = urllib.request.Request(f"{url.rstrip('/')}/studies/{study}/series/{series}/instances"
                                     f"?limit={max_instances + 1}", headers={"Accept": DICOM_JSON})
    with _open(request, what, timeout_s, missing) as response:
        body = _read_limited(response, (max_instances + 1) * QIDO_BYTES_PER_INSTANCE, what,
                             f"series {series} has more than {max_instances} instances (this server's limit)")
    try:
        found = json.loads(body or b"[]")
        uids = [check_uid(item[SOP_INSTANCE_UID]["Value"][0], "SOPInstanceUID") for item in found]
    except (ValueError, TypeError, KeyError, IndexError, PacsError):
        raise PacsError(502, f"the PACS's list of {what} is not DICOM JSON with instance UIDs") from None
    if not uids:
        raise PacsError(404, missing)
    if len(uids) > max_instances:
        raise PacsError(413, f"series {series} has more than {max_instances} instances (this server's limit)")
    return uids


def _boundary(content_type: str) -> bytes | None:
    """The ``boundary`` parameter of a ``multipart/related`` Content-Type, else None."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary") if header.get_content_type() == "multipart/related" else None
    return boundary.encode("latin-1") if isinstance(boundary, str) and boundary else None


def multipart_parts(body: bytes, boundary: bytes) -> list[bytes]:
    """The contents of the parts of a multipart ``body`` (RFC 2046), each without its headers."""
    # Every delimiter is a line break, then --boundary; the body's first needs no line break.
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary)
    parts = []
    for piece in pieces[1:]:  # pieces[0]: the preamble
        if piece.startswith(b"--"):  # the closing delimiter
            break
        _, blank, content = piece.partition(b"\r\n\r\n")
        if blank:
            parts.append(content)
    return parts


def _retrieve_instance(url: str, study: str, series: str, instance: str, budget: int, timeout_s: float) -> bytes:
    """WADO-RS: one instance's DICOM bytes, at most ``budget`` (413 beyond, told by Content-Length when given)."""
    what = f"instance {instance}"
    request = urllib.request.Request(f"{url.rstrip('/')}/studies/{study}/series/{series}/instances/{instance}",
                                     headers={"Accept": INSTANCE_ACCEPT})
    too_large = f"series {series} is larger than this server's limit for a series"
    with _open(request, what, timeout_s, f"{what} of series {series} is not on the PACS") as response:
        boundary = _boundary(response.headers.get("Content-Type", ""))
        body = _read_limited(response, budget, what, too_large)
    parts = multipart_parts(body, boundary) if boundary else []
    if len(parts) != 1:
        raise PacsError(502, f"the PACS did not answer {what} with one DICOM part (multipart/related)")
    return parts[0]


def retrieve_series(url: str, study: str, series: str, folder: Path, max_bytes: int, max_instances: int,
                    timeout_s: float = 60.0) -> int:
    """QIDO-RS then WADO-RS: every instance of ``series`` as ``folder/NNNNN.dcm`` (the folder is created);
    returns the number of files. Refused (413) past ``max_instances`` before any is fetched, and past
    ``max_bytes`` in all before the body that would pass it is read, when the PACS gives its length."""
    instances = series_instances(url, study, series, max_instances, timeout_s)
    folder.mkdir(parents=True, exist_ok=True)
    remaining = max_bytes
    for number, instance in enumerate(instances):
        content = _retrieve_instance(url, study, series, instance, remaining, timeout_s)
        remaining -= len(content)
        (folder / f"{number:05d}.dcm").write_bytes(content)
    return len(instances)


def store_instance(url: str, path: Path, timeout_s: float = 120.0) -> None:
    """STOW-RS: ``path`` (one DICOM file) stored on the PACS; a 502 :class:`PacsError` when it refuses it."""
    boundary = secrets.token_hex(16)
    body = b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes(),
                     f"\r\n--{boundary}--\r\n".encode()))
    request = urllib.request.Request(
        f"{url.rstrip('/')}/studies", data=body, method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": DICOM_JSON})
    with _open(request, "the segmentation's storage", timeout_s) as response:
        answer = _read_limited(response, 16 << 20, "the storage answer", "the PACS's storage answer is too long")
    try:
        failed = (json.loads(answer) if answer.strip() else {}).get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    except (ValueError, AttributeError):
        raise PacsError(502, "the PACS answered the segmentation's storage with something other than DICOM JSON") \
            from None
    if failed:
        reason = (failed[0].get(FAILURE_REASON, {}).get("Value") or ["?"])[0]
        raise PacsError(502, f"the PACS refused the segmentation (failure reason {reason})")
