"""The web app's job logic without a browser: page fields to generation options, one model
load per checkpoint, progress, and one-line errors. The page itself: test_app_browser.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import tiny_run, write_speech

from microscope_pl.inference.app_jobs import AppRequest, AppRunner, find_checkpoints, request_options


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("app")
    files = tiny_run(root / "checkpoints")
    files["speech"] = write_speech(root / "speech.wav", 0.8)
    files["root"] = root
    return files


def test_page_fields_become_generation_options() -> None:
    options = request_options(AppRequest(seed=3.0, steps=0, sampler="DPM-Solver++", audio_scale=" 2.5 ",
                                         pose="still", pose_scale=0.5, blink="PBNet", paste_back=True))
    assert options == {"seed": 3, "steps": None, "sampler": "dpm", "audio_scale": 2.5, "pose": "still",
                       "pose_video": None, "blink": "pbnet", "blink_video": None, "pose_scale": 0.5,
                       "paste_back": True}
    defaults = request_options(AppRequest(audio_scale="", sampler="the checkpoint's"))
    assert defaults["audio_scale"] is None and defaults["sampler"] is None and defaults["pose"] == "pbnet"
    assert request_options(AppRequest(pose="pose file (.npy/.csv)", pose_file="/x/t.npy"))["pose"] == "/x/t.npy"
    video = request_options(AppRequest(pose="reference video", pose_video="/x/ref.mp4", blink="reference video"))
    assert video["pose"] == "video" and video["pose_video"] == "/x/ref.mp4" and video["blink"] == "video"
    for request, message in ((AppRequest(pose="pose file (.npy/.csv)"), "needs a .npy or .csv file"),
                             (AppRequest(pose="reference video"), "needs a reference video"),
                             (AppRequest(audio_scale="loud"), "audio guidance must be a number"),
                             (AppRequest(pose="still", blink="reference video"), "need a blink or pose")):
        with pytest.raises(ValueError, match=message):
            request_options(request)


def test_runner_loads_each_checkpoint_once_and_reports_progress(env: dict[str, Path], tmp_path: Path) -> None:
    runner = AppRunner(tmp_path / "out", str(env["diffusion"]), device="cpu")
    seen: list[tuple[float, str]] = []
    first, line = runner.run(AppRequest(audio=str(env["speech"]), steps=1, pose="still"),
                             lambda fraction, what: seen.append((fraction, what)))
    second, _ = runner.run(AppRequest(text="Hello there.", steps=1, seed=2))  # espeak-ng speech, PBNet pose
    assert first.is_file() and second.is_file() and first != second and runner.cache.loads == 1
    assert "20 frames" in line and "1 dpm steps" in line  # the config default sampler
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert seen[0][1] == "loading the model" and seen[-1][1] == "decode 20/20"
    assert any(what.startswith("denoise") for _, what in seen)


def test_runner_errors_are_one_line_and_leave_nothing(env: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    runner = AppRunner(tmp_path / "out", str(env["diffusion"]), device="cpu")
    cases = [(AppRequest(portrait=str(junk), audio=str(env["speech"])), "cannot read image"),
             (AppRequest(), "no speech: upload or record audio"),
             (AppRequest(audio=str(env["speech"]), checkpoint=str(tmp_path / "none.ckpt")), "not found"),
             (AppRequest(audio=str(env["speech"]), steps=-2), "--steps must be at least 1")]
    for request, expected in cases:
        path, line = runner.run_for_page(request)
        assert path is None and line.startswith("error: ") and expected in line and "\n" not in line, line
    assert list((tmp_path / "out").iterdir()) == []


def test_checkpoints_and_bundles_are_found(env: dict[str, Path], tmp_path: Path) -> None:
    from microscope_pl.inference.export import export_bundle

    export_bundle(env["diffusion"], env["root"] / "checkpoints" / "bundles" / "tiny")
    found = find_checkpoints(env["root"] / "checkpoints")
    assert str(env["diffusion"]) in found and str(env["root"] / "checkpoints" / "bundles" / "tiny") in found
    assert find_checkpoints(tmp_path / "nothing") == []


def test_the_page_builds(env: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
    from microscope_pl.inference.app import build_app

    demo = build_app(AppRunner(tmp_path / "out", str(env["diffusion"])), checkpoints=[str(env["diffusion"])])
    assert (tmp_path / "out" / "astronaut.png").is_file()
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"portrait", "speech", "generate", "status", "result", "download"} <= ids
