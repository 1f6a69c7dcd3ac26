"""The controls of `microscope generate` on tiny untrained checkpoints: reference-video pose and
blinks, pose strength, sampler, paste-back, batch runs, and one-line refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import known_pose_clip, tiny_run, write_speech

from microscope_pl.cli import main

BASE = ["--steps", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controls")
    files = tiny_run(root)
    files["speech"] = write_speech(root / "speech.wav", 1.2)  # 30 frames
    files["long"] = write_speech(root / "long.wav", 2.0, seed=1)  # 50 frames
    return files


def _frames(path: Path) -> np.ndarray:
    from microscope_pl.data.video_io import read_video

    return read_video(path)


def _generate(env: dict[str, Path], out: Path, *extra: str, audio: str = "speech") -> int:
    return main(["generate", "--checkpoint", str(env["diffusion"]), "--image", "astronaut", "--audio",
                 str(env[audio]), "--out", str(out), *BASE, *extra])


def _needs_landmarks() -> None:
    from microscope_pl.data.prepare import FaceTools

    tools = FaceTools("auto")
    if not tools.has_landmarks:
        pytest.skip(f"reference-video pose needs 68-point landmarks: {tools.missing} "
                    "(pip install dlib-bin face_recognition_models, the 'prepare' extra)")


def test_pose_video_reproduces_the_known_track(env: dict[str, Path], tmp_path: Path) -> None:
    """A drawn clip with a known pose drives generation; the conditions used follow it, relative to
    its first frame, and a clip shorter than the speech is played back and forth."""
    _needs_landmarks()
    truth, closure = known_pose_clip(tmp_path / "ref.mp4", frames=40)
    motion = tmp_path / "motion.npy"
    assert _generate(env, tmp_path / "out.mp4", "--pose-video", str(tmp_path / "ref.mp4"), "--save-motion",
                     str(motion), audio="long") == 0
    used = np.load(motion)
    assert used.shape == (50, 8) and np.all(used[0] == 0)  # deltas from the reference video's first frame
    rel = (truth - truth[:1])[:40]
    got = used[:40]
    for k in (2, 3, 4, 5):  # roll, face width, centre x, centre y: recovered closely
        assert np.corrcoef(rel[:, k], got[:, k])[0, 1] > 0.95, k
        assert np.sqrt(np.mean((rel[:, k] - got[:, k]) ** 2)) < 0.15 * np.ptp(rel[:, k]), k
    # The drawn head is a flat photo: its turn is seen with the right sign and timing but
    # foreshortened, and its nod does not show in the landmarks at all, so pitch is not checked.
    assert np.corrcoef(rel[:, 0], got[:, 0])[0, 1] > 0.8
    closed, opened = used[21:25, 6:].mean(), used[np.r_[0:18, 28:40], 6:].mean()
    assert closed < opened - 0.08, (closed, opened)  # the blink drawn at frames 20-25
    np.testing.assert_allclose(used[40:50], used[38:28:-1])  # looped back and forth, no jump


def test_blink_video_with_still_pose(env: dict[str, Path], tmp_path: Path) -> None:
    _needs_landmarks()
    known_pose_clip(tmp_path / "ref.mp4", frames=40)
    motion = tmp_path / "motion.npy"
    assert _generate(env, tmp_path / "out.mp4", "--pose", "still", "--blink", "video", "--blink-video",
                     str(tmp_path / "ref.mp4"), "--save-motion", str(motion)) == 0
    used = np.load(motion)
    assert used.shape == (30, 8) and np.all(used[:, :6] == 0) and used[21:25, 6:].mean() < -0.08


def test_pose_scale_zero_equals_still(env: dict[str, Path], tmp_path: Path) -> None:
    assert _generate(env, tmp_path / "still.mp4", "--pose", "still") == 0
    assert _generate(env, tmp_path / "zero.mp4", "--pose", "pbnet", "--pose-scale", "0", "--blink", "none") == 0
    np.testing.assert_array_equal(_frames(tmp_path / "zero.mp4"), _frames(tmp_path / "still.mp4"))
    # Strength scales PBNet's head motion and leaves its blinks alone.
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    assert _generate(env, tmp_path / "a.mp4", "--save-motion", str(one)) == 0
    assert not np.array_equal(_frames(tmp_path / "a.mp4"), _frames(tmp_path / "still.mp4"))  # PBNet moves it
    assert _generate(env, tmp_path / "b.mp4", "--pose-scale", "2", "--save-motion", str(two)) == 0
    m1, m2 = np.load(one), np.load(two)
    assert np.abs(m1[:, :6]).max() > 0
    np.testing.assert_allclose(m2[:, :6], 2 * m1[:, :6], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(m2[:, 6:], m1[:, 6:])


def test_sampler_and_api_options(env: dict[str, Path], tmp_path: Path) -> None:
    from microscope_pl.inference.generate import run_generation

    # fp32 decoding: the tiny model's two samplers differ by less than bf16 keeps at 64 px
    report = run_generation(env["diffusion"], "astronaut", env["speech"], tmp_path / "dpm.mp4", sampler="dpm",
                            pose="still", steps=2, progress=False, device="cpu", precision="fp32")
    assert report.sampler == "dpm" and report.path.is_file() and "2 dpm steps" in report.summary()
    ddim = run_generation(env["diffusion"], "astronaut", env["speech"], tmp_path / "ddim.mp4", sampler="ddim",
                          pose="still", steps=2, progress=False, device="cpu", precision="fp32")
    assert not np.array_equal(_frames(report.path), _frames(ddim.path))
    stages: list[tuple[str, int, int]] = []
    run_generation(env["diffusion"], "astronaut", env["speech"], tmp_path / "p.mp4", pose="still", steps=2,
                   progress=False, device="cpu", on_progress=lambda *a: stages.append(a), decode_chunk=8)
    assert stages[0] == ("denoise", 0, 2) and ("denoise", 2, 2) in stages and stages[-1] == ("decode", 30, 30)
    with pytest.raises(ValueError, match="--sampler must be one of ddim, dpm"):
        run_generation(env["diffusion"], "astronaut", env["speech"], tmp_path / "x.mp4", sampler="euler")


def test_paste_back_keeps_the_photo_around_the_face(env: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image
    from skimage.data import astronaut

    from microscope_pl.inference.inputs import portrait_box

    photo = np.ascontiguousarray(astronaut()[:300, 40:441])  # 401 x 300: odd width is cut to 400
    Image.fromarray(photo).save(tmp_path / "photo.png")
    out = tmp_path / "pasted.mp4"
    assert main(["generate", "--checkpoint", str(env["diffusion"]), "--image", str(tmp_path / "photo.png"),
                 "--audio", str(env["speech"]), "--out", str(out), "--pose", "still", "--paste-back", *BASE]) == 0
    frames = _frames(out).astype(np.float32)
    assert frames.shape == (30, 300, 400, 3)
    (x0, y0, side), _ = portrait_box(photo)
    outside = np.ones((300, 400), bool)
    outside[y0:y0 + side, x0:x0 + side] = False
    assert outside.sum() > 0.3 * outside.size
    error = np.abs(frames - photo[None, :, :400].astype(np.float32))
    assert error[:, outside].mean() < 3.0  # the still photo (H.264 noise only)
    centre = error[:, y0 + side // 3:y0 + 2 * side // 3, x0 + side // 3:x0 + 2 * side // 3]
    assert centre.mean() > 3 * error[:, outside].mean()  # the generated face (random weights: unlike the photo)


def test_paste_back_blends_only_inside_the_crop() -> None:
    from microscope_pl.inference.paste import PasteBack

    photo = np.full((100, 160, 3), 50, np.uint8)
    paste = PasteBack(photo, (40, 0, 80), feather=0.25)  # top edge on the photo border: no ramp there
    out = paste(np.full((2, 32, 32, 3), 250, np.uint8))
    assert out.shape == (2, 100, 160, 3) and paste.size == (160, 100)
    assert np.all(out[:, :, :40] == 50) and np.all(out[:, 80:] == 50) and np.all(out[:, :, 120:] == 50)
    assert np.all(out[:, 40, 80] == 250) and np.all(out[:, 0, 80] == 250)  # full inside, and at the photo border
    assert 50 < out[0, 40, 42, 0] < 150  # ramping in at the crop's left edge


def test_batch_with_one_bad_row(env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    import microscope_pl.inference.loading as loading

    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda path: loads.append(path) or real(path))
    jobs = tmp_path / "jobs.csv"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "speech.wav").write_bytes(env["speech"].read_bytes())
    jobs.write_text("portrait,audio,out,seed\n"
                    "astronaut,in/speech.wav,first.mp4,3\n"
                    "astronaut,in/missing.wav,bad.mp4,\n"
                    f"astronaut,{env['long']},sub/second.mp4,\n")
    out_dir = tmp_path / "videos"
    code = main(["generate", "--batch", str(jobs), "--checkpoint", str(env["diffusion"]), "--pose", "still",
                 "--out-dir", str(out_dir), *BASE])
    captured = capsys.readouterr()
    assert code == 1 and len(loads) == 1
    assert captured.out.split() == [str(out_dir / "first.mp4"), str(out_dir / "sub" / "second.mp4")]
    failed = [line for line in captured.err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "row 3" in failed[0] and "audio not found" in failed[0], captured.err
    assert "1 failed" in captured.err.splitlines()[-1]
    assert len(_frames(out_dir / "first.mp4")) == 30 and len(_frames(out_dir / "sub" / "second.mp4")) == 50
    leftovers = sorted(p.name for p in out_dir.rglob("*") if p.is_file())
    assert leftovers == ["first.mp4", "second.mp4"]  # nothing half-written, nothing for the bad row


BAD = {
    "missing pose video": (["--pose-video", "{tmp}/nope.mp4"], "pose video {tmp}/nope.mp4 not found"),
    "junk pose video": (["--pose-video", "{tmp}/junk.mp4"], "is unreadable"),
    "blink video without a video": (["--pose", "still", "--blink", "video"], "--blink video needs --blink-video"),
    "negative pose scale": (["--pose-scale", "-1"], "--pose-scale must be a finite number >= 0"),
    "pose video and another pose": (["--pose", "still", "--pose-video", "{tmp}/junk.mp4"], "--pose-video is given"),
    "save motion not npy": (["--pose", "still", "--save-motion", "{tmp}/m.txt"], "must end in .npy"),
    "batch with image": (["--batch", "{tmp}/jobs.csv"], "--image does not go with --batch"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_control_options_give_one_line_errors(case: str, env: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "junk.mp4").write_text("not a video")
    extra, expected = BAD[case]
    extra = [a.format(tmp=tmp_path) for a in extra]
    assert _generate(env, tmp_path / "out.mp4", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected.format(tmp=tmp_path) in err[0], err
    assert not (tmp_path / "out.mp4").exists()


def test_bad_batch_files_are_refused_whole(env: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,speech\nastronaut,x.wav\n")
    assert main(["generate", "--batch", str(jobs), "--checkpoint", str(env["diffusion"]), *BASE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: batch file") and "missing portrait, audio, out" in err


def test_out_dir_names_a_single_video(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--checkpoint", str(env["diffusion"]), "--image", "astronaut", "--audio",
                 str(env["speech"]), "--out-dir", str(tmp_path / "videos"), "--pose", "still", *BASE]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "videos" / "astronaut.mp4")]
    assert main(["generate", "--checkpoint", str(env["diffusion"]), "--image", "astronaut", "--audio",
                 str(env["speech"]), "--pose", "still", *BASE]) == 2
    assert "--out (or --out-dir) is required" in capsys.readouterr().err
