"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real uvicorn process: the overlay and legend it shows are the API's answer
for the image picked; a dropped file that is not an image shows the API's error; a bundle with
a text encoder takes classes typed in; a server with a token asks for it."""

import base64
import os
import re
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CASES, case_image
from test_serve import Server, expected_labels

import httpx  # noqa: E402  (the [test] extra)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ANSWER_S = 120
# What the closed network needs: nothing the browser would fetch for itself, no GPU, and root
# (CI) cannot use the sandbox.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")
# A file made in the page and dropped on the drop zone, as a person's drag would deliver it.
DROP = """const [text, name] = arguments;
const files = new DataTransfer();
files.items.add(new File([text], name, {type: "text/plain"}));
document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));"""
LEGEND = """return [...document.querySelectorAll("#legend tbody tr")].map((row) => [
    row.cells[1].textContent, row.cells[2].textContent,
    getComputedStyle(row.querySelector(".swatch")).backgroundColor]);"""


# Session-scoped and autouse so that it runs before any bundle is exported or server started.
@pytest.fixture(scope="session", autouse=True)
def chromium_installed():
    """A missing browser fails the tests (a skip would pass CI unnoticed) unless asked off."""
    if os.environ.get("RESCLIP_NO_BROWSER") == "1":
        pytest.skip("RESCLIP_NO_BROWSER=1: the page test needs a browser")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: apt-get install -y chromium "
                    "chromium-driver (or RESCLIP_NO_BROWSER=1 to skip the page test)",
                    pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'", pytrace=False)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    # Selenium Manager must not go looking for a browser or a driver of its own.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(
        str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")))
    try:
        yield driver
    finally:
        driver.quit()    # the browser, then chromedriver (by its process)


@pytest.fixture(scope="module")
def server(bundle_for):
    server = Server(bundle_for(CASES[0]))
    try:
        yield server
    finally:
        server.stop()


def element(driver, id_):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, id_)


def state_of(driver):
    return driver.execute_script("return document.body.dataset.state")


def wait(driver, condition, seconds=30):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, seconds).until(condition)


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver, lambda d: state_of(d) != "loading")


def submit(driver, pick):
    """``pick()`` chooses the file, then Segment -> the page's state once it is answered."""
    answers = driver.execute_script("return Number(document.body.dataset.answers)")
    pick()
    element(driver, "segment").click()
    wait(driver, lambda d: d.execute_script("return Number(document.body.dataset.answers)")
         > answers, ANSWER_S)
    return state_of(driver)


def pick_file(driver, path):
    return lambda: element(driver, "file").send_keys(str(path))


def percent(fraction):
    """The page's "12.3%": JavaScript's toFixed rounds the exact binary value half up, where
    Python's format rounds half to even (they differ on a tie such as 12.25)."""
    pct = 100 * fraction
    if 0 < pct < 0.05:
        return "<0.1%"
    return f"{Decimal(pct).quantize(Decimal('0.1'), ROUND_HALF_UP)}%"


def css_rgb(hex_colour):
    return "rgb({}, {}, {})".format(*bytes.fromhex(hex_colour[1:]))


def screenshot(driver, tmp_path, name):
    """The whole page as a PNG in tmp_path, and in $RESCLIP_SCREENSHOT_DIR when it is set."""
    # DevTools, because WebDriver's screenshot stops at the window's edge
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True})
    path = tmp_path / name
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("RESCLIP_SCREENSHOT_DIR"):
        folder = Path(os.environ["RESCLIP_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)


def api_answer(url, data, name, **params):
    r = httpx.post(url + "/v1/segment", params={"format": "json", "overlay": "true", **params},
                   files={"image": (name, data)}, timeout=ANSWER_S)
    return r.json()


def test_the_page_shows_the_apis_overlay_and_legend(server, browser, bundle_for, tmp_path):
    image = case_image(CASES[0])
    answer = api_answer(server.url, image.read_bytes(), image.name)
    # the server against the segmenter once here (test_serve does it in every format)
    want = expected_labels(bundle_for(CASES[0]), image.read_bytes())
    assert answer["classes"] == list(want.class_names)
    for name, fraction in answer["fractions"].items():
        assert fraction == pytest.approx((want.labels == want.class_names.index(name)).mean(),
                                         abs=1e-6)

    open_page(browser, server.url)
    assert state_of(browser) == "ready"
    assert "preset ade20k, 150 classes" in element(browser, "model").text
    assert not element(browser, "classes-row").is_displayed()    # a fixed vocabulary
    assert not element(browser, "token-row").is_displayed()
    assert submit(browser, pick_file(browser, image)) == "done", element(browser, "error").text

    overlay = element(browser, "overlay")
    assert overlay.is_displayed() and overlay.size["width"] > 0
    assert overlay.get_attribute("src") == "data:image/jpeg;base64," + answer["overlay_jpeg"]
    jpeg = cv2.imdecode(np.frombuffer(base64.b64decode(answer["overlay_jpeg"]), np.uint8),
                        cv2.IMREAD_COLOR)
    natural = browser.execute_script("const i = arguments[0]; "
                                     "return [i.complete, i.naturalWidth, i.naturalHeight]",
                                     overlay)
    # the image's height; its width and the legend panel the overlay attaches on the right
    assert natural == [True, jpeg.shape[1], jpeg.shape[0]]
    assert jpeg.shape[0] == want.labels.shape[0] and jpeg.shape[1] > want.labels.shape[1]
    assert browser.execute_script(LEGEND) == [
        [name, percent(fraction), css_rgb(answer["colors"][name])]
        for name, fraction in answer["fractions"].items()]
    h, w = want.labels.shape
    assert re.fullmatch(rf"{w} × {h} px, answered in \d+\.\d\d s",
                        element(browser, "elapsed").text)
    assert not element(browser, "error").is_displayed()
    # nothing refused by the page's CSP, no script error, no request failed
    assert [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    screenshot(browser, tmp_path, "page.png")


def test_a_dropped_file_that_is_not_an_image_shows_the_apis_error(server, browser, tmp_path):
    text = "a shopping list, not a photo\n"
    want = api_answer(server.url, text.encode(), "notes.txt")["error"]
    open_page(browser, server.url)
    assert submit(browser, lambda: browser.execute_script(DROP, text, "notes.txt")) == "error"
    assert element(browser, "file-name").text == f"notes.txt ({len(text)} bytes)"
    box = element(browser, "error")
    assert box.is_displayed() and box.text == want and "not an image" in want
    assert not element(browser, "result").is_displayed()
    screenshot(browser, tmp_path, "page-error.png")


def test_classes_typed_in_reach_a_text_encoder_bundle(tiny_bundle, browser):
    image = case_image(CASES[0])
    server = Server(tiny_bundle)
    try:
        open_page(browser, server.url)
        field = element(browser, "classes")
        assert field.is_displayed() and field.get_attribute("placeholder") == "cat, sofa"
        field.send_keys("dog, grass|lawn, sky")
        assert submit(browser, pick_file(browser, image)) == "done", \
            element(browser, "error").text
        answer = api_answer(server.url, image.read_bytes(), image.name,
                            classes="dog, grass|lawn, sky")
        assert answer["classes"] == ["dog", "grass", "sky"]
        assert browser.execute_script(LEGEND) == [
            [name, percent(fraction), css_rgb(answer["colors"][name])]
            for name, fraction in answer["fractions"].items()]
    finally:
        server.stop()


def test_a_token_is_asked_for_and_kept_in_the_tab_only(bundle_for, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    token = "page-test-" + "k" * 20
    (tmp_path / "token").write_text(token + "\n")
    server = Server(bundle_for(CASES[0]), "--token-file", str(tmp_path / "token"))
    try:
        open_page(browser, server.url)
        assert state_of(browser) == "locked"
        assert "bearer token" in element(browser, "error").text
        element(browser, "token").send_keys(token, Keys.TAB)
        wait(browser, lambda d: state_of(d) == "ready")
        assert not element(browser, "error").is_displayed()
        assert submit(browser, pick_file(browser, case_image(CASES[0]))) == "done", \
            element(browser, "error").text
        assert browser.execute_script("return [sessionStorage.getItem('resclip-token'), "
                                      "localStorage.length]") == [token, 0]
    finally:
        server.stop()
