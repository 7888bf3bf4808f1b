"""The web page (GET /, btcv_unetr/serve/web/index.html) in a real browser, and the slice routes it reads
(btcv_unetr/serve/viewer.py).

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``), driven by selenium, uses the page
against a real ``btcv-unetr serve`` on loopback with a tiny model (random weights: the masks are
noise, which is all the page needs): the page asks for the server's token, uploads a phantom,
follows the job and shows the slices with the mask overlaid, the legend and the mask download; a
bad upload shows the server's one-line message; a 2D model's result is its overlay picture.

The viewer is checked on a synthetic scan stored the way DICOM conversions store CT (voxel order
left-posterior-superior, raw uint16 with an intercept of -1024) whose three markers have distinct HU:
the patient's left must show on the screen's right, anterior at the top (axial) and on the left
(sagittal), superior at the top; a window change, a zoom and a pan must move the drawn pixels; a
click in one view must move the other two views' slices. Without Chromium the browser tests are
skipped (``.ci/run`` installs it where it can); the route tests (on the service in the test's process,
btcv_unetr.testing.app) and the viewer's reading run anyway.
"""

from __future__ import annotations

import gzip
import re
import shutil
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service is the optional serve extra")
from conftest import REAL_SERVER_TOKEN  # noqa: E402
from serving import tiny_checkpoint  # noqa: E402

from btcv_unetr.serve.viewer import VolumeCache, read_viewer_volume  # noqa: E402
from btcv_unetr.testing.app import in_process_service  # noqa: E402

try:  # selenium is in the project's test extra; without it only the browser tests are skipped
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and webdriver),
    reason="no Chromium or selenium: apt-get install chromium chromium-driver (.ci/run does this)")

TOKEN = REAL_SERVER_TOKEN
# The tiny model segments a 64-voxel phantom in seconds on CPU; the margin is for a loaded CI machine.
SEGMENT_TIMEOUT_S = 120
PAGE_TIMEOUT_S = 20
VIEWS = ("axial", "coronal", "sagittal")

pytestmark = pytest.mark.xdist_group("real_server")  # the session's real server, shared with test_serve's gate test


@pytest.fixture(scope="module")
def server(real_server) -> str:
    """The session's real server (tests/conftest.py), with a token so that every fetch of the page must carry it."""
    return real_server.url


@pytest.fixture
def downloads(tmp_path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(downloads):
    """A fresh headless Chromium per test (starts in under a second): no token left in sessionStorage."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                     "--force-device-scale-factor=1"):  # one canvas pixel per CSS pixel, as the pixel tests count
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# ---------- a scan with markers on known sides ----------

MARKER_SHAPE = (50, 40, 30)
MARKER_SPACING = (4.0, 5.0, 6.0)
# HU of each region, and the grey the abdomen window (W 400, L 40) gives it: (HU + 160) * 255 / 400.
BODY_HU, LEFT_HU, ANTERIOR_HU, SUPERIOR_HU, AIR_HU = 0, 1000, 200, 100, -1000
GREY = {"body": (96, 108), "superior": (160, 172), "anterior": (224, 236), "left": (250, 256)}
BODY_HALF_MM = 80.0  # the body is a box of +-80 mm (x, y) around the scan's centre, all slices long
MARKER_FROM_MM = 45.0  # each marker is the part of the body beyond 45 mm toward its side


def marker_affine() -> np.ndarray:
    """Voxel order L, P, S (as DICOM series are converted), centred on the scanner's origin."""
    (nx, ny, nz), (sx, sy, sz) = MARKER_SHAPE, MARKER_SPACING
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * (nz - 1) / 2]
    return affine


def marker_hu() -> np.ndarray:
    """HU in the file's voxel order, from each voxel's RAS position in mm (x: patient's right, y: anterior)."""
    ijk = np.indices(MARKER_SHAPE).reshape(3, -1)
    x, y, z = (marker_affine()[:3, :3] @ ijk + marker_affine()[:3, 3:]).reshape(3, *MARKER_SHAPE)
    body = (np.abs(x) < BODY_HALF_MM) & (np.abs(y) < BODY_HALF_MM)
    left = body & (x < -MARKER_FROM_MM)
    anterior = body & ~left & (y > MARKER_FROM_MM)
    superior = body & ~left & ~anterior & (z > MARKER_FROM_MM)
    hu = np.full(MARKER_SHAPE, AIR_HU, np.int16)
    for region, value in ((body, BODY_HU), (left, LEFT_HU), (anterior, ANTERIOR_HU), (superior, SUPERIOR_HU)):
        hu[region] = value
    return hu


def write_marker_scan(path: Path) -> Path:
    """Raw uint16 with intercept -1024: the HU the viewer shows must be the scaled values."""
    image = nib.Nifti1Image((marker_hu().astype(np.int32) + 1024).astype(np.uint16), marker_affine())
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, path)
    return path


def segmented_marker(client, folder: Path) -> str:
    """The marker scan sent to the service behind ``client`` (without the page); the id of its finished job."""
    scan = write_marker_scan(folder / "markers.nii.gz")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    job = client.post("/jobs", headers=headers, files={"file": (scan.name, scan.read_bytes(), "application/gzip")}).json()
    deadline = time.monotonic() + SEGMENT_TIMEOUT_S
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(f"/jobs/{job['id']}", headers=headers).json()
    assert job["state"] == "done", job
    return job["id"]


@pytest.fixture(scope="module")
def marker_job(server, tmp_path_factory) -> str:
    """The marker scan segmented once on the real server, for the module's browser tests of the viewer."""
    with httpx.Client(base_url=server, timeout=60) as client:
        return segmented_marker(client, tmp_path_factory.mktemp("marker"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The same service (token and all) in the test's process, for the slice routes: no browser, no socket."""
    folder = tmp_path_factory.mktemp("web_in_process")
    with in_process_service(tiny_checkpoint(folder), folder / "jobs", "--token", TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def served_marker(service, tmp_path_factory) -> str:
    """The marker scan segmented once by the in-process service."""
    return segmented_marker(service, tmp_path_factory.mktemp("marker_in_process"))


# ---------- page helpers ----------

def page_state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def open_page(driver, url: str, token: str | None = None) -> None:
    """Load the page; with a ``token`` the page must ask for it first. Either way it then shows the model."""
    driver.get(url)
    wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
    if token:
        wait.until(lambda d: d.find_element(By.ID, "token-card").is_displayed())
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait.until(lambda d: "Model:" in text_of(d, "model-info"))


def open_job(driver, server: str, job_id: str) -> None:
    """The page on a job's result (?job=ID), once it is drawn."""
    open_page(driver, f"{server}/?job={job_id}", token=TOKEN)
    assert wait_until_finished(driver, PAGE_TIMEOUT_S) == "done", text_of(driver, "error")


def upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "submit").click()


def wait_until_finished(driver, timeout: float) -> str:
    """The final state ("done" or "failed"); "done" is set only once the result is drawn."""
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: page_state(d) in ("done", "failed"))
    return page_state(driver)


def legend_lines(driver) -> list[str]:
    return [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#legend li")]


def current_job_id(driver) -> str:
    """The page puts the job it shows in its address (?job=ID)."""
    return re.search(r"[?&]job=([0-9a-f]+)", driver.current_url).group(1)


def assert_no_script_errors(driver) -> None:
    """No exception in the page's JavaScript (refused requests, like the 401 before the token, are
    logged too: those are the server's answers, not the page's errors)."""
    errors = [entry for entry in driver.get_log("browser")
              if entry["level"] == "SEVERE" and entry["source"] != "network"]
    assert not errors, errors


def server_get(server, path: str, token: str | None = None) -> httpx.Response:
    """GET ``path`` from ``server``: a real server's URL, or a client on the service (``httpx.Client`` API)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    response = httpx.get(server + path, headers=headers) if isinstance(server, str) else server.get(path, headers=headers)
    assert response.status_code == 200, response.text[:200]
    return response


def save_screenshot(driver, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    return path


# Per grey band [low, high): how many grey (r = g = b) pixels of the canvas fall in it, their mean position
# and extent in canvas pixels; and how many pixels are coloured (the overlay, the crosshair).
CANVAS_PIXELS_JS = """
const [id, bands] = arguments;
const canvas = document.getElementById(id);
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
const found = bands.map(() => ({count: 0, x: 0, y: 0, left: Infinity, right: -Infinity, top: Infinity,
                                bottom: -Infinity}));
let lit = 0, coloured = 0, checksum = 0;
for (let p = 0, i = 0; p < data.length; p += 4, i++) {
  const [r, g, b] = [data[p], data[p + 1], data[p + 2]];
  checksum = (checksum * 31 + r + 7 * g + 13 * b) % 1000000007;
  if (r || g || b) lit++;
  if (r !== g || g !== b) { coloured++; continue; }
  const x = i % canvas.width, y = Math.floor(i / canvas.width);
  bands.forEach(([low, high], k) => {
    if (r < low || r >= high) return;
    const band = found[k];
    band.count++; band.x += x; band.y += y;
    band.left = Math.min(band.left, x); band.right = Math.max(band.right, x);
    band.top = Math.min(band.top, y); band.bottom = Math.max(band.bottom, y);
  });
}
found.forEach((band) => { if (band.count) { band.x /= band.count; band.y /= band.count; } });
return {width: canvas.width, height: canvas.height, lit, coloured, checksum, bands: found};
"""


def canvas_pixels(driver, canvas_id: str, bands: dict[str, tuple[int, int]] | None = None) -> dict:
    bands = bands or {}
    result = driver.execute_script(CANVAS_PIXELS_JS, canvas_id, [list(band) for band in bands.values()])
    result["bands"] = dict(zip(bands, result["bands"]))
    return result


def set_control(driver, element_id: str, value) -> None:
    """A range input moved as a person would (its input event fires)."""
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input', {bubbles: true}));", element_id, str(value))


def slider_value(driver, view: str) -> int:
    return int(driver.find_element(By.ID, f"{view}-slider").get_attribute("value"))


def wait_for_slices(driver) -> None:
    """Until every view draws the slice its slider asks for (slices are fetched as they are shown)."""
    WebDriverWait(driver, PAGE_TIMEOUT_S).until(lambda d: all(
        d.find_element(By.ID, view).get_attribute("data-slice") == str(slider_value(d, view)) for view in VIEWS))


def plain_views(driver, centre: tuple[int, int, int]) -> None:
    """The scan alone (no overlay, no crosshair lines) on the slices through ``centre`` (RAS voxel index)."""
    set_control(driver, "opacity", 0)
    crosshair = driver.find_element(By.ID, "crosshair")
    if crosshair.is_selected():
        crosshair.click()
    for view, index in zip(("sagittal", "coronal", "axial"), centre):
        set_control(driver, f"{view}-slider", index)
    wait_for_slices(driver)


def marker_centre() -> tuple[int, int, int]:
    return tuple(n // 2 for n in MARKER_SHAPE)


def drag(driver, element, start: tuple[float, float], by: tuple[float, float]) -> None:
    """Press at ``start`` (canvas pixels from its top-left corner), move by ``by``, release."""
    size = element.size
    actions = ActionChains(driver)
    actions.move_to_element_with_offset(element, start[0] - size["width"] / 2, start[1] - size["height"] / 2)
    actions.click_and_hold().move_by_offset(*by).release().perform()


def click_at(driver, element, x: float, y: float) -> None:
    size = element.size
    ActionChains(driver).move_to_element_with_offset(element, x - size["width"] / 2,
                                                     y - size["height"] / 2).click().perform()


def wait_for_download(folder: Path, suffix: str, timeout: float = PAGE_TIMEOUT_S) -> Path:
    """The finished download (Chromium writes ``*.crdownload`` first and renames it when complete)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [path for path in folder.iterdir() if path.name.endswith(suffix)]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no *{suffix} in {folder} after {timeout} s: {sorted(p.name for p in folder.iterdir())}")


def legend_expected(organs: list[dict]) -> list[str]:
    """The legend's lines as /volumes says: every organ found, its name and volume in mL with one decimal,
    and for an organ the server flags (when it sends flags) the plausible range it is outside of."""
    return [f"{organ['name']}\n{organ['volume_ml']:.1f} mL" + flag_line(organ)
            for organ in organs if organ["volume_ml"] > 0]


def flag_line(organ: dict) -> str:
    if not organ.get("flag"):
        return ""
    plausible = organ.get("plausible_ml")
    limits = f" ({millilitres(plausible[0])}–{millilitres(plausible[1])} mL)" if plausible else ""
    return f"\n⚠ {organ['flag'].capitalize()}: outside the plausible adult range{limits}"


def millilitres(value: float) -> str:
    """As the page writes them: thousands separated, at most one decimal."""
    text = f"{value:,.1f}"
    return text.removesuffix(".0")


# ---------- the page with a 3D model ----------

@needs_chromium
def test_page_segments_a_phantom_and_shows_slices_legend_and_download(browser, server, phantom_dir, downloads,
                                                                      tmp_path):
    scan = sorted((phantom_dir / "imagesTs").glob("*.nii.gz"))[0]
    open_page(browser, server + "/", token=TOKEN)
    upload(browser, scan)

    state = wait_until_finished(browser, SEGMENT_TIMEOUT_S)
    assert state == "done", f"page says {state}: {text_of(browser, 'error')!r}"

    # The legend: every organ found (volume > 0), its name and volume in mL with one decimal, as /volumes says.
    job_id = current_job_id(browser)
    organs = server_get(server, f"/jobs/{job_id}/volumes", TOKEN).json()["organs"]
    expected = legend_expected(organs)
    assert expected and legend_lines(browser) == expected
    assert_model_card_shown(browser, server_get(server, "/info", TOKEN).json())

    # Each view starts on a labelled slice, so it shows overlay colour; its orientation letters are on its edges.
    for view in VIEWS:
        pixels = canvas_pixels(browser, view)
        assert pixels["width"] == pixels["height"] > 200 and pixels["lit"] and pixels["coloured"], (view, pixels)
    assert orientation_letters(browser) == {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}
    save_screenshot(browser, tmp_path, "phantom")

    assert_organs_can_be_hidden(browser)

    browser.find_element(By.ID, "download").click()
    mask = wait_for_download(downloads, "_seg.nii.gz")
    assert mask.name == f"{scan.name.removesuffix('.nii.gz')}_seg.nii.gz"
    assert nib.Nifti1Image.from_bytes(gzip.decompress(mask.read_bytes())).shape == nib.load(scan).shape

    # ?job=ID in the address: reloading shows the same result without a new upload (sessionStorage
    # keeps the token for the tab, so the page does not ask again).
    browser.refresh()
    assert wait_until_finished(browser, PAGE_TIMEOUT_S) == "done"
    assert legend_lines(browser) == expected
    assert_no_script_errors(browser)


def orientation_letters(driver) -> dict[str, str]:
    """Each view's letters, left, right, top, bottom."""
    letters = {}
    for view in VIEWS:
        box = driver.find_element(By.ID, f"{view}-viewport")
        letters[view] = "".join(box.find_element(By.CSS_SELECTOR, f".orient.{side}").text
                                for side in ("left", "right", "top", "bottom"))
    return letters


def assert_model_card_shown(driver, info: dict) -> None:
    """A model card's warning is a visible banner, its summary a line under the title (only when the server
    sends them: nothing shows otherwise)."""
    card = info.get("model_card") or {}
    banner = driver.find_element(By.ID, "model-warning")
    if card.get("warning"):
        assert banner.is_displayed() and card["warning"] in banner.text
    else:
        assert not banner.is_displayed()
    if card.get("summary"):
        assert text_of(driver, "model-summary") == card["summary"]


def assert_organs_can_be_hidden(driver) -> None:
    """Unticking every organ leaves no overlay colour in the views (crosshair lines off); ticking them shows it."""
    crosshair = driver.find_element(By.ID, "crosshair")
    crosshair.click()
    boxes = driver.find_elements(By.CSS_SELECTOR, "#legend li input[type=checkbox]")
    assert boxes and all(box.is_displayed() and box.is_selected() for box in boxes)
    for box in boxes:
        box.click()
    assert all(canvas_pixels(driver, view)["coloured"] == 0 for view in VIEWS)
    for box in boxes:
        box.click()
    assert any(canvas_pixels(driver, view)["coloured"] for view in VIEWS)
    crosshair.click()


@needs_chromium
def test_views_follow_the_radiological_convention(browser, server, marker_job, tmp_path):
    browser.set_window_size(1400, 1500)   # all three views on the screenshot
    open_job(browser, server, marker_job)
    plain_views(browser, marker_centre())
    screenshot = save_screenshot(browser, tmp_path, "markers")

    axial = canvas_pixels(browser, "axial", GREY)
    coronal = canvas_pixels(browser, "coronal", GREY)
    sagittal = canvas_pixels(browser, "sagittal", GREY)
    centre = axial["width"] / 2
    # The patient's left on the screen's right; anterior up in axial, on the left in sagittal; superior up.
    assert axial["bands"]["left"]["x"] > centre + 40 and coronal["bands"]["left"]["x"] > centre + 40, screenshot
    assert axial["bands"]["anterior"]["y"] < centre - 40, screenshot
    assert sagittal["bands"]["anterior"]["x"] < centre - 40, screenshot
    assert coronal["bands"]["superior"]["y"] < centre - 40 and sagittal["bands"]["superior"]["y"] < centre - 40
    assert orientation_letters(browser) == {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}

    # Physical proportions at one scale for all views: the body is 160 mm wide, 160 mm deep and 180 mm long.
    def extent(pixels):
        lit = [band for band in pixels["bands"].values() if band["count"]]
        return (max(b["right"] for b in lit) - min(b["left"] for b in lit) + 1,
                max(b["bottom"] for b in lit) - min(b["top"] for b in lit) + 1)
    (axial_w, axial_h), (coronal_w, coronal_h), (sagittal_w, sagittal_h) = map(extent, (axial, coronal, sagittal))
    assert axial_w == pytest.approx(axial_h, rel=0.03) and axial_w == pytest.approx(coronal_w, rel=0.03)
    assert coronal_w / coronal_h == pytest.approx(160 / 180, rel=0.03)
    assert sagittal_w / sagittal_h == pytest.approx(160 / 180, rel=0.03)
    assert_no_script_errors(browser)


@needs_chromium
def test_window_presets_and_a_drag_change_the_drawn_pixels(browser, server, marker_job):
    open_job(browser, server, marker_job)
    plain_views(browser, marker_centre())
    assert text_of(browser, "window-readout") == "W 400 · L 40"
    before = canvas_pixels(browser, "axial", GREY)
    assert before["bands"]["body"]["count"] > 1000

    browser.find_element(By.CSS_SELECTOR, "[data-preset=bone]").click()
    assert text_of(browser, "window-readout") == "W 1800 · L 400"
    # Soft tissue (0 HU) is darker in a bone window: (0 + 500) * 255 / 1800 = 71.
    bone = canvas_pixels(browser, "axial", {**GREY, "body": (69, 74)})
    assert bone["checksum"] != before["checksum"]
    assert bone["bands"]["body"]["count"] == before["bands"]["body"]["count"]

    browser.find_element(By.CSS_SELECTOR, "[data-preset=abdomen]").click()
    assert canvas_pixels(browser, "axial")["checksum"] == before["checksum"]
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=window]").click()
    canvas = browser.find_element(By.ID, "axial")
    drag(browser, canvas, (100, 100), (50, 0))   # to the right: a wider window, steps of 400 / 256 HU
    assert text_of(browser, "window-readout") == "W 478 · L 40"
    assert canvas_pixels(browser, "axial")["checksum"] != before["checksum"]
    assert_no_script_errors(browser)


@needs_chromium
def test_clicking_one_view_moves_the_other_two_and_the_readout_gives_mm_and_hu(browser, server, marker_job,
                                                                              tmp_path):
    open_job(browser, server, marker_job)
    plain_views(browser, marker_centre())
    axial = canvas_pixels(browser, "axial", GREY)["bands"]
    # A point in the left marker's column and the anterior marker's row: patient's left, anterior.
    x, y = axial["left"]["x"], axial["anterior"]["y"]
    click_at(browser, browser.find_element(By.ID, "axial"), x, y)
    wait_for_slices(browser)

    canonical = nib.as_closest_canonical(nib.load(write_marker_scan(tmp_path / "markers.nii.gz"))).affine
    sagittal_mm = canonical[0, 0] * slider_value(browser, "sagittal") + canonical[0, 3]
    coronal_mm = canonical[1, 1] * slider_value(browser, "coronal") + canonical[1, 3]
    assert sagittal_mm < -MARKER_FROM_MM and coronal_mm > MARKER_FROM_MM
    assert slider_value(browser, "axial") == marker_centre()[2]
    # The sagittal view now cuts the left marker, the coronal one the anterior marker.
    assert canvas_pixels(browser, "sagittal", GREY)["bands"]["anterior"]["count"] == 0
    assert canvas_pixels(browser, "coronal", GREY)["bands"]["anterior"]["count"] > 100

    readout = text_of(browser, "readout")
    assert re.fullmatch(r"Pointer: L [\d.]+ · A [\d.]+ · [SI] [\d.]+ mm · 1000 HU( · .+)?", readout), readout
    assert f"L {abs(sagittal_mm):.1f} · A {coronal_mm:.1f}" in readout
    assert_no_script_errors(browser)


@needs_chromium
def test_zoom_and_pan_move_the_picture(browser, server, marker_job):
    open_job(browser, server, marker_job)
    plain_views(browser, marker_centre())
    canvas = browser.find_element(By.ID, "axial")
    centre = canvas_pixels(browser, "axial")["width"] / 2
    fitted = canvas_pixels(browser, "axial", GREY)["bands"]["left"]

    browser.find_element(By.ID, "zoom-in").click()
    zoomed = canvas_pixels(browser, "axial", GREY)["bands"]["left"]
    assert zoomed["x"] - centre == pytest.approx(1.25 * (fitted["x"] - centre), abs=2)

    browser.find_element(By.ID, "zoom-fit").click()
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=pan]").click()
    drag(browser, canvas, (100, 100), (-40, 30))
    panned = canvas_pixels(browser, "axial", GREY)["bands"]["left"]
    assert (panned["x"] - fitted["x"], panned["y"] - fitted["y"]) == (pytest.approx(-40, abs=1.5),
                                                                     pytest.approx(30, abs=1.5))
    assert_no_script_errors(browser)


@needs_chromium
def test_page_shows_the_servers_message_for_a_bad_upload(browser, server, tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_text("this is not a scan\n")
    direct = httpx.post(f"{server}/jobs", headers={"Authorization": f"Bearer {TOKEN}"},
                        files={"file": (bad.name, bad.read_bytes(), "application/gzip")})
    assert direct.status_code == 400
    detail = direct.json()["detail"]

    open_page(browser, server + "/", token=TOKEN)
    upload(browser, bad)
    assert wait_until_finished(browser, PAGE_TIMEOUT_S) == "failed"
    assert text_of(browser, "error") == detail
    assert text_of(browser, "status") == "Upload rejected."
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 0


@needs_chromium
def test_page_shows_a_2d_result_as_its_overlay_picture(browser, picture_server, downloads, tmp_path):
    import SimpleITK as sitk
    rgb = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)  # 48 rows, 80 columns
    photo = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(photo))

    open_page(browser, picture_server + "/")
    upload(browser, photo)
    state = wait_until_finished(browser, SEGMENT_TIMEOUT_S)
    assert state == "done", f"page says {state}: {text_of(browser, 'error')!r}"

    picture = browser.find_element(By.ID, "overlay-picture")
    assert picture.is_displayed() and not browser.find_element(By.ID, "views").is_displayed()
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", picture)
    assert size == [80, 48]

    job_id = current_job_id(browser)
    organs = server_get(picture_server, f"/jobs/{job_id}/volumes").json()["organs"]
    expected = [f"{organ['name']}\n{organ['voxels']:,} px" for organ in organs if organ["voxels"] > 0]
    assert legend_lines(browser) == (expected or ["No organ found in this scan."])
    assert httpx.get(f"{picture_server}/jobs/{job_id}/geometry").status_code == 404  # pictures have no slices

    browser.find_element(By.ID, "download").click()
    assert wait_for_download(downloads, "_seg.png").name == "photo_seg.png"
    assert_no_script_errors(browser)


# ---------- the slice routes ----------

def get_slice(server, job_id: str, axis: str, index: int) -> tuple[np.ndarray, np.ndarray, httpx.Response]:
    """HU and labels of one slice, decoded by the contract: little-endian values then uint8 labels."""
    response = server_get(server, f"/jobs/{job_id}/slice?axis={axis}&index={index}", TOKEN)
    shape = tuple(int(n) for n in response.headers["X-Shape"].split(","))
    dtype = np.dtype(response.headers["X-Dtype"]).newbyteorder("<")
    count = shape[0] * shape[1]
    hu = np.frombuffer(response.content, dtype, count).reshape(shape)
    labels = np.frombuffer(response.content, np.uint8, count, offset=count * dtype.itemsize).reshape(shape)
    return hu, labels, response


def test_slices_are_the_files_hu_and_mask_at_full_resolution_in_ras_order(service, served_marker, tmp_path):
    canonical = nib.as_closest_canonical(nib.load(write_marker_scan(tmp_path / "markers.nii.gz")))
    hu = np.asanyarray(canonical.dataobj)   # nibabel applies the intercept
    mask = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(
        server_get(service, f"/jobs/{served_marker}/mask", TOKEN).content)))
    labels = np.asanyarray(mask.dataobj)

    geometry = server_get(service, f"/jobs/{served_marker}/geometry", TOKEN).json()
    assert geometry["shape"] == list(MARKER_SHAPE) and geometry["spacing"] == list(MARKER_SPACING)
    assert np.allclose(geometry["affine"], canonical.affine)
    assert all(0 <= index < n for index, n in zip(geometry["start"], MARKER_SHAPE))

    for axis, take, spacing in (("sagittal", np.s_[7, :, :], (5.0, 6.0)), ("coronal", np.s_[:, 33, :], (4.0, 6.0)),
                                ("axial", np.s_[:, :, 29], (4.0, 5.0))):
        index = next(i for i in take if isinstance(i, int))
        slice_hu, slice_labels, response = get_slice(service, served_marker, axis, index)
        assert response.headers["X-Dtype"] == "int16"   # whole HU: two bytes a voxel
        assert [float(s) for s in response.headers["X-Spacing"].split(",")] == list(spacing)
        np.testing.assert_array_equal(slice_hu, hu[take])
        np.testing.assert_array_equal(slice_labels, labels[take])


def test_slice_routes_need_the_token_and_say_what_is_wrong(service, served_marker):
    base = f"/jobs/{served_marker}"
    assert service.get(f"{base}/slice?axis=axial&index=0").status_code == 401
    assert service.get(f"{base}/geometry").status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for query, words in (("axis=oblique&index=0", "axis must be one of"), ("axis=axial&index=30", "0 to 29"),
                         ("axis=axial&index=-1", "whole number"), ("axis=axial", "whole number")):
        response = service.get(f"{base}/slice?{query}", headers=headers)
        assert response.status_code == 400 and words in response.json()["detail"], (query, response.text)
    assert service.get("/jobs/0123abcd/geometry", headers=headers).status_code == 404


def test_the_viewer_reads_full_resolution_and_scaled_hu(tmp_path):
    """No 256-voxel cap; a fractional slope gives float32 HU; the volume cache keeps its budget."""
    raw = np.arange(300 * 6 * 4, dtype=np.int16).reshape(300, 6, 4) % 2000
    scan = nib.Nifti1Image(raw, np.diag([0.7, 0.7, 2.5, 1.0]))
    scan.header.set_slope_inter(0.5, -1024.0)
    nib.save(scan, tmp_path / "input.nii.gz")
    nib.save(nib.Nifti1Image((raw % 3).astype(np.uint8), scan.affine), tmp_path / "mask.nii.gz")

    volume = read_viewer_volume(tmp_path / "input.nii.gz", tmp_path / "mask.nii.gz")
    assert volume.geometry()["shape"] == [300, 6, 4] and volume.hu.dtype == np.float32
    content, headers = volume.slice(2, 3)
    assert headers == {"X-Shape": "300,6", "X-Spacing": "0.7,0.7", "X-Dtype": "float32"}
    np.testing.assert_array_equal(np.frombuffer(content, "<f4", 1800).reshape(300, 6), raw[:, :, 3] * 0.5 - 1024)
    np.testing.assert_array_equal(np.frombuffer(content, np.uint8, offset=1800 * 4), (raw[:, :, 3] % 3).ravel())

    cache = VolumeCache(budget=2 * volume.nbytes)
    reads = []
    for key in ("a", "b", "a", "c", "a", "b"):
        cache.get(key, lambda key=key: reads.append(key) or volume)
    assert reads == ["a", "b", "c", "b"]   # "a", used last, survives "c"; "b", the oldest, does not
