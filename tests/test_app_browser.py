"""The web app in a real browser: headless Chromium (Debian's `chromium`) driven by
playwright against `microscope app` on 127.0.0.1 with a tiny checkpoint.

Run by `make test-browser` (marker `browser`, deselected from `make test`). It skips
with the reason when chromium or playwright is missing, except under CI=true, where
that is a failure. Screenshots stay in the test's tmp folder; MICROSCOPE_DOCS_SHOT=1
also copies the first to docs/app.png, and MICROSCOPE_APP_TEST_CKPT names another
checkpoint or bundle to show (the README's picture).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from tiny_models import tiny_run, write_speech

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]
SECONDS = 1.2
START_TIMEOUT_S = 120
JOB_TIMEOUT_MS = 240_000


def _missing(reason: str) -> None:
    """Skip, or fail under CI (where the browser test must run)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser test (make install installs it)")
    pytest.skip(reason)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    _missing("headless Chromium not found (sudo apt-get install -y chromium)")
    return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the app did not answer at {url} within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`microscope app` in a subprocess on a free loopback port, stopped at the end."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[app]')")
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing("gradio is not installed (pip install -e '.[app]')")
    chromium = _chromium()
    root = tmp_path_factory.mktemp("app_browser")
    checkpoint = os.environ.get("MICROSCOPE_APP_TEST_CKPT") or str(tiny_run(root)["diffusion"])
    port = _free_port()
    log = root / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "microscope_pl", "app", "--checkpoint", checkpoint,
                                 "--host", "127.0.0.1", "--port", str(port), "--out-dir", str(root / "videos"),
                                 "--device", "cpu"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, proc, log)
        yield {"url": url, "root": root, "chromium": chromium, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def page(app: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=app["chromium"], headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(60_000)
        tab.goto(app["url"])
        tab.wait_for_selector("#generate")
        try:
            yield tab
        finally:
            browser.close()


def _generate(page: Any, portrait: Path, speech: Path) -> str:
    """Upload both files, click Generate, wait for the status line; returns it."""
    page.locator("#portrait input[type=file]").set_input_files(str(portrait))
    page.locator("#speech input[type=file]").set_input_files(str(speech))
    page.wait_for_selector("#speech audio, #speech [data-testid='waveform-controls'], #speech .waveform-container",
                           state="attached")
    page.locator("#generate").click()
    page.wait_for_function("() => { const t = document.querySelector('#status textarea');"
                           " return t && t.value.length > 0; }", timeout=JOB_TIMEOUT_MS)
    return page.locator("#status textarea").input_value()


def _screenshot(page: Any, app: dict[str, Any], name: str) -> Path:
    shot = app["root"] / name
    page.screenshot(path=str(shot), full_page=True)
    return shot


def _ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                         capture_output=True, check=True, text=True).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}


def test_upload_generate_play_and_download(app: dict[str, Any], page: Any) -> None:
    import decord
    from PIL import Image
    from skimage.data import astronaut

    from microscope_pl.inference.generate import frame_count

    portrait = app["root"] / "portrait.png"
    Image.fromarray(astronaut()).save(portrait)
    speech = write_speech(app["root"] / "speech.wav", SECONDS)
    status = _generate(page, portrait, speech)
    assert not status.startswith("error"), status
    expected = frame_count(int(SECONDS * 16000), 25)
    assert f"{expected} frames" in status, status
    video = page.locator("#result video")
    video.wait_for(state="attached")
    page.wait_for_function("() => { const v = document.querySelector('#result video');"
                           " return v && v.readyState >= 2 && v.duration > 0; }")
    playable = video.evaluate("v => v.canPlayType('video/mp4; codecs=\"avc1.64001e, mp4a.40.2\"')")
    assert playable in ("probably", "maybe")
    assert video.evaluate("v => v.duration") == pytest.approx(SECONDS, abs=0.1)
    shot = _screenshot(page, app, "app.png")
    if os.environ.get("MICROSCOPE_DOCS_SHOT") == "1":
        shutil.copy(shot, REPO / "docs" / "app.png")
    href = page.locator("#download a").first.get_attribute("href")
    answer = page.request.get(href)
    assert answer.ok
    downloaded = app["root"] / "downloaded.mp4"
    downloaded.write_bytes(answer.body())
    assert len(decord.VideoReader(str(downloaded))) == expected
    streams = _ffprobe(downloaded)
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
    assert float(streams["audio"]["duration"]) == pytest.approx(SECONDS, abs=0.05)
    assert np.asarray(Image.open(shot)).shape[0] > 500  # a full-page picture was taken


def test_junk_portrait_shows_the_error_line(app: dict[str, Any], page: Any) -> None:
    junk = app["root"] / "junk.png"
    junk.write_text("this is not a picture")
    speech = write_speech(app["root"] / "speech2.wav", 0.8)
    status = _generate(page, junk, speech)
    assert status.startswith("error: cannot read image") and "junk.png" in status, status
    assert "Traceback" not in page.content() and "\n" not in status
    assert page.locator("#result video").count() == 0
    _screenshot(page, app, "app_error.png")
