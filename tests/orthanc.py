"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian packages ``orthanc``, ``orthanc-dicomweb``),
started on a free port with its own storage folder and configuration, never the system service. Orthanc 1.10
has no bind address: ``RemoteAccessAllowed: false`` makes it answer loopback clients only.

    orthanc_or_skip  the Orthanc program and the DICOMweb plugin, or the reason the tests skip
    running_orthanc  a started Orthanc: yields its base URL (REST at ``/``, DICOMweb at ``/dicom-web``)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from btcv_unetr.testing.server import free_port

PLUGIN_PLACES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
START_TIMEOUT_S = 60.0



def _end_of(log: Path) -> str:
    """The last 2000 characters of Orthanc's log (whatever bytes it wrote)."""
    return log.read_text(encoding="utf-8", errors="replace")[-2000:]

def orthanc_or_skip() -> tuple[str, str] | str:
    """``(program, plugin)`` paths, or a one-line reason why the PACS tests cannot run here."""
    program = shutil.which("Orthanc")
    if program is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    plugins = [place for place in PLUGIN_PLACES if Path(place).is_file()]
    plugins += sorted(str(p) for p in Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")) \
        if Path("/usr/lib/orthanc").is_dir() else []
    if not plugins:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return program, plugins[0]


def _configuration(folder: Path, http_port: int, plugin: str) -> dict:
    """Loopback clients only, no DICOM (DIMSE) listener, no authentication (nothing else can reach it),
    storage in ``folder``."""
    return {"Name": "btcv-unetr-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": False, "DicomPort": free_port(),
            "StorageCompression": False, "SaveJobs": False, "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[str]:
    """Orthanc on a free loopback port, its files and log (``orthanc.log``) in ``folder``; yields its base URL
    once its REST API and the DICOMweb plugin answer, stops it afterwards."""
    found = orthanc_or_skip()
    if isinstance(found, str):
        raise RuntimeError(found)
    program, plugin = found
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps(_configuration(folder, port, plugin), indent=2))
    url = f"http://127.0.0.1:{port}"
    with open(folder / "orthanc.log", "w") as log:
        process = subprocess.Popen([program, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        _wait_until_up(process, url, folder / "orthanc.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}: {_end_of(log)}")
        try:
            if httpx.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s: {_end_of(log)}")
