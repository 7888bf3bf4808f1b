"""The web page (GET /, btcv_unetr/web/index.html) in a real browser.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``), driven by selenium, uses the page
against a real ``btcv-unetr serve`` on loopback with a tiny model (random weights: the masks are
noise, which is all the page needs): the page asks for the server's token, uploads a phantom,
follows the job and shows the slices with the mask overlaid, the legend and the mask download; a
bad upload shows the server's one-line message; a 2D model's result is its overlay picture. Without
Chromium the tests are skipped (``.ci/run`` installs it where it can).
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

from serving import running_server, tiny_checkpoint

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium: apt-get install chromium chromium-driver (.ci/run does this)")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the project's test extra")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "web-test-token"
# The tiny model segments a 64-voxel phantom in seconds on CPU; the margin is for a loaded CI machine.
SEGMENT_TIMEOUT_S = 120
PAGE_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """One server for the module, with a token so that every fetch of the page must carry it."""
    folder = tmp_path_factory.mktemp("web")
    with running_server(tiny_checkpoint(folder), folder / "jobs", "--token", TOKEN) as url:
        yield url


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
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


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


def server_get(server: str, path: str, token: str | None = None) -> httpx.Response:
    response = httpx.get(server + path, headers={"Authorization": f"Bearer {token}"} if token else None)
    assert response.status_code == 200, response.text[:200]
    return response


# Counts, in a canvas, the pixels that are not black and those that are coloured (not grey: the overlay).
CANVAS_PIXELS_JS = """
const canvas = document.getElementById(arguments[0]);
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let lit = 0, coloured = 0;
for (let p = 0; p < data.length; p += 4) {
  if (data[p] || data[p + 1] || data[p + 2]) lit++;
  if (data[p] !== data[p + 1] || data[p + 1] !== data[p + 2]) coloured++;
}
const box = canvas.getBoundingClientRect();
return {width: canvas.width, height: canvas.height, lit, coloured, shownWidth: box.width, shownHeight: box.height};
"""


def canvas_pixels(driver, canvas_id: str) -> dict:
    return driver.execute_script(CANVAS_PIXELS_JS, canvas_id)


def wait_for_download(folder: Path, suffix: str, timeout: float = PAGE_TIMEOUT_S) -> Path:
    """The finished download (Chromium writes ``*.crdownload`` first and renames it when complete)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [path for path in folder.iterdir() if path.name.endswith(suffix)]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no *{suffix} in {folder} after {timeout} s: {sorted(p.name for p in folder.iterdir())}")


def preview_geometry(server: str, job_id: str) -> tuple[list[int], list[float]]:
    """X-Shape and X-Spacing of the job's preview, asked of the server directly."""
    response = server_get(server, f"/jobs/{job_id}/preview", TOKEN)
    shape = [int(n) for n in response.headers["X-Shape"].split(",")]
    spacing = [float(s) for s in response.headers["X-Spacing"].split(",")]
    return shape, spacing


# ---------- tests ----------

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
    expected = [f"{organ['name']}\n{organ['volume_ml']:.1f} mL" for organ in organs if organ["volume_ml"] > 0]
    assert expected and legend_lines(browser) == expected

    assert_views_show_the_overlay_in_proportion(browser, *preview_geometry(server, job_id))

    browser.find_element(By.ID, "download").click()
    mask = wait_for_download(downloads, "_seg.nii.gz")
    assert mask.name == f"{scan.name.removesuffix('.nii.gz')}_seg.nii.gz"
    assert nib.Nifti1Image.from_bytes(gzip.decompress(mask.read_bytes())).shape == nib.load(scan).shape

    screenshot = tmp_path / "page.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000

    # ?job=ID in the address: reloading shows the same result without a new upload (sessionStorage
    # keeps the token for the tab, so the page does not ask again).
    browser.refresh()
    assert wait_until_finished(browser, PAGE_TIMEOUT_S) == "done"
    assert legend_lines(browser) == expected
    assert_no_script_errors(browser)


def assert_views_show_the_overlay_in_proportion(browser, shape: list[int], spacing: list[float]) -> None:
    """Each view starts on a labelled slice (so it shows overlay colour) and has the scan's physical aspect."""
    (nx, ny, nz), (sx, sy, sz) = shape, spacing
    # view -> (canvas width, height in voxels), (its width, height in mm): the contract's display rule
    expected = {"axial": ((nx, ny), (nx * sx, ny * sy)),
                "coronal": ((nx, nz), (nx * sx, nz * sz)),
                "sagittal": ((ny, nz), (ny * sy, nz * sz))}
    for view, ((width, height), (width_mm, height_mm)) in expected.items():
        pixels = canvas_pixels(browser, view)
        assert (pixels["width"], pixels["height"]) == (width, height), (view, pixels)
        assert pixels["lit"] > 0 and pixels["coloured"] > 0, (view, pixels)
        shown_aspect = pixels["shownWidth"] / pixels["shownHeight"]
        assert shown_aspect == pytest.approx(width_mm / height_mm, rel=0.05), (view, pixels, spacing)


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

    organs = server_get(picture_server, f"/jobs/{current_job_id(browser)}/volumes").json()["organs"]
    expected = [f"{organ['name']}\n{organ['voxels']:,} px" for organ in organs if organ["voxels"] > 0]
    assert legend_lines(browser) == (expected or ["No organ found in this scan."])

    browser.find_element(By.ID, "download").click()
    assert wait_for_download(downloads, "_seg.png").name == "photo_seg.png"
    assert_no_script_errors(browser)
