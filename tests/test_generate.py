"""Generation end to end on tiny untrained checkpoints: the video file, chunked
decoding, and one-line errors for every bad input."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from microscope_pl.cli import main
from microscope_pl.data.audio import write_wav
from microscope_pl.inference.generate import frame_count, generate, resolve_audio_features
from microscope_pl.inference.inputs import load_portrait

SR = 16000
SECONDS = 1.2


def _save(module: Any, path: Path) -> Path:
    """A checkpoint in the Lightning layout, written by hand (no Trainer)."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # adds the phase tag and the record
    torch.save(ckpt, path)
    return path


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like tone: loud enough, not silent."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * envelope * np.sin(2 * np.pi * 170 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny phase-1, phase-2 and diffusion checkpoints at 64x64 plus audio files."""
    from microscope_pl.modules.diffusion_module import LatentDiffusionModule
    from microscope_pl.modules.fde_module import FDEModule
    from microscope_pl.modules.lmae_module import LMAEModule

    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    fde = FDEModule(image_size=64, network={"block_expansion": 8, "max_features": 16, "num_regions": 2,
                                            "motion_block_expansion": 8, "motion_max_features": 16,
                                            "motion_num_blocks": 2, "num_res_blocks": 1},
                    loss={"weights": "random"}, lpips="off")
    p1 = _save(fde, root / "phase1.ckpt")
    lmae = LMAEModule(image_size=64, network={"base_channels": 8, "channel_mult": [1, 1, 1, 1], "norm_groups": 4,
                                              "mid_attention": False},
                      loss={"weights": "random"}, lpips="off", fde_ckpt_path=str(p1))
    p2 = _save(lmae, root / "phase2.ckpt")
    diffusion = LatentDiffusionModule(image_size=64, denoiser={"base_channels": 16, "channel_mult": [1, 2],
                                                               "attn_levels": [1], "num_heads": 2, "cond_dim": 16,
                                                               "image_cond_channels": 8},
                                      sampling={"steps": 2}, mdcf_ckpt_path=str(p2), lpips="off")
    files = {"phase1": p1, "diffusion": _save(diffusion, root / "diffusion.ckpt"), "root": root}
    files["speech"] = root / "speech.wav"
    write_wav(files["speech"], _speech(SECONDS))
    files["silent"] = root / "silent.wav"
    write_wav(files["silent"], np.zeros(SR, np.float32))
    files["bad_image"] = root / "broken.png"
    files["bad_image"].write_text("not an image")
    return files


def _ffprobe_audio_seconds(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=duration",
                          "-of", "json", str(path)], capture_output=True, check=True, text=True).stdout
    return float(json.loads(out)["streams"][0]["duration"])


def test_cli_generates_video_with_audio(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import decord

    out = tmp_path / "clip.mp4"
    code = main(["generate", "--checkpoint", str(env["diffusion"]), "--image", "astronaut", "--audio",
                 str(env["speech"]), "--out", str(out), "--pose", "still", "--steps", "2", "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    reader = decord.VideoReader(str(out))
    assert reader.get_avg_fps() == pytest.approx(25.0)
    assert abs(len(reader) - SECONDS * 25) <= 1
    assert reader[0].shape == (64, 64, 3)
    assert _ffprobe_audio_seconds(out) == pytest.approx(SECONDS, abs=0.04)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary files left behind


def test_api_with_pose_file_and_timings(env: dict[str, Path], tmp_path: Path) -> None:
    from microscope_pl.inference.generate import run_generation

    n = frame_count(int(SECONDS * SR), 25)
    track = np.zeros((n + 5, 8), np.float32)
    track[:, 0] = np.linspace(10, 20, n + 5)  # absolute yaw: "first" makes it start at the portrait's pose
    np.save(tmp_path / "pose.npy", track)
    messages: list[str] = []
    report = run_generation(env["diffusion"], "astronaut", env["speech"], tmp_path / "a.mkv",
                            pose=str(tmp_path / "pose.npy"), steps=1, progress=False, device="cpu",
                            log=messages.append)
    assert report.path.is_file() and report.frames == n
    assert report.denoise_s > 0 and report.decode_s > 0 and report.audio_features == "logmel"
    assert any("face crop (haar box" in m for m in messages)  # the synthetic set's recipe
    path = generate(env["diffusion"], "astronaut", env["speech"], tmp_path / "b.mp4", pose="still", steps=1,
                    progress=False, device="cpu", precision="bf16", log=messages.append)  # the GPU default's path
    assert path == tmp_path / "b.mp4" and path.is_file()
    assert "denoise" in messages[-1] and "decode" in messages[-1]
    with pytest.raises(ValueError, match="precision must be one of"):
        run_generation(env["diffusion"], "astronaut", env["speech"], tmp_path / "c.mp4", precision="fp8")
    assert not (tmp_path / "c.mp4").exists()


def test_chunked_decoding_equals_unchunked(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from microscope_pl.inference.loading import load_pipeline
    from microscope_pl.models import mdcf

    codec = load_pipeline(env["diffusion"])[0].codec
    side = 64 // codec.latent_down
    z = torch.randn(1, codec.latent_channels, 7, side, side, generator=torch.Generator().manual_seed(0))
    features = codec.fde.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    chunked = torch.cat(list(codec.decode_chunks(features, z, 3)))
    whole = torch.cat(list(codec.decode_chunks(features, z, 1000)))
    assert chunked.shape == (7, 3, 64, 64)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(mdcf, "CPU_DECODE_PIXELS", 1)  # the CPU's passes: 2 frames each
    parts = list(codec.decode_chunks(features, z, 5))
    assert [len(p) for p in parts] == [5, 2]  # what is yielded is still the chunk
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)


def test_bf16_copy_decodes_like_float32(env: dict[str, Path]) -> None:
    from microscope_pl.inference.loading import load_pipeline

    codec = load_pipeline(env["diffusion"])[0].codec
    side = 64 // codec.latent_down
    z = torch.randn(1, codec.latent_channels, 5, side, side, generator=torch.Generator().manual_seed(0))
    features = codec.fde.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    ref = codec.decode(features, z, 2)
    out = codec.decode(features, z, 2, dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 10 * torch.log10(1 / (out - ref).square().mean()) > 40  # dB
    copy = codec.decoder_copy(torch.bfloat16)
    assert copy.fde.region_predictor is None and copy.fde.flow_predictor is None  # decoding does not use them
    assert copy.fde.final.weight.dtype == torch.bfloat16 and copy.scale.dtype == torch.float32
    assert torch.equal(copy.scale, codec.scale) and codec.fde.final.weight.dtype == torch.float32


def test_decode_precision_copies_for_bf16_and_autocasts_fp16() -> None:
    from contextlib import nullcontext

    from microscope_pl.inference import generate as gen

    cpu = torch.device("cpu")
    context, dtype = gen.decode_precision("bf16", cpu)
    assert isinstance(context, nullcontext) and dtype == torch.bfloat16
    context, dtype = gen.decode_precision("fp16", cpu)
    assert isinstance(context, torch.autocast) and dtype is None
    context, dtype = gen.decode_precision("fp32", cpu)
    assert isinstance(context, nullcontext) and dtype is None


BAD_INPUTS = {
    "missing image": (["--image", "{root}/nope.png"], "image not found"),
    "unreadable image": (["--image", "{bad_image}"], "cannot read image"),
    "missing audio": (["--audio", "{root}/nope.wav"], "audio not found"),
    "silent audio": (["--audio", "{silent}"], "is silent"),
    "too-long audio": (["--max-seconds", "1"], "more than --max-seconds 1"),
    "phase-1 checkpoint": (["--checkpoint", "{phase1}"], "is a phase1 checkpoint, expected a diffusion checkpoint"),
    "wrong resolution": (["--resolution", "128"], "--resolution 128 does not match the checkpoint's image_size 64"),
    "guidance every 0": (["--guidance-every", "0"], "--guidance-every must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_line_errors(case: str, env: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    extra, expected = BAD_INPUTS[case]
    defaults = {"--checkpoint": str(env["diffusion"]), "--image": "astronaut", "--audio": str(env["speech"])}
    extra = [a.format(**{k: str(v) for k, v in env.items()}) for a in extra]
    for flag, value in zip(extra[::2], extra[1::2]):
        defaults[flag] = value
    out = tmp_path / "out.mp4"
    argv = ["generate", *[x for kv in defaults.items() for x in kv], "--out", str(out), "--pose", "still",
            "--steps", "1", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_pbnet_suggests_still(env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # no checkpoints/synth/pbnet here
    argv = ["generate", "--checkpoint", str(env["diffusion"]), "--image", "astronaut", "--audio", str(env["speech"]),
            "--out", "x.mp4", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no pbnet checkpoint" in err and "--pose still" in err and not (tmp_path / "x.mp4").exists()


def test_rgba_grayscale_and_odd_sized_portraits(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((80, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:40, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((30, 40), 90, np.uint8), "L").save(tmp_path / "gray.webp", lossless=True)
    Image.fromarray(np.full((33, 21, 3), 10, np.uint8)).save(tmp_path / "small.bmp")
    notes: list[str] = []
    img = load_portrait(tmp_path / "rgba.png", 64, log=notes.append)
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert torch.allclose(img[:, -1, 32], torch.ones(3))  # transparency composited on white
    assert img[0, 0, 32] == pytest.approx(200 / 255, abs=0.01) and img[1, 0, 32] == pytest.approx(0, abs=0.01)
    assert "centre crop" in notes[-1]
    gray = load_portrait(tmp_path / "gray.webp", 64, log=None)
    assert gray.shape == (3, 64, 64) and torch.allclose(gray, torch.full_like(gray, 90 / 255), atol=0.01)
    assert load_portrait(tmp_path / "small.bmp", 64, log=None).shape == (3, 64, 64)
    astronaut = load_portrait("astronaut", 32, log=notes.append)
    assert astronaut.shape == (3, 32, 32) and "face crop (haar box" in notes[-1]


def test_audio_feature_kind_comes_from_the_checkpoint(env: dict[str, Path]) -> None:
    from microscope_pl.inference.loading import load_pipeline

    record = load_pipeline(env["diffusion"])[1]
    assert resolve_audio_features(record) == "logmel"  # the diffusion module's audio_features, recorded
    unrecorded = {**record, "audio_features": None}
    assert resolve_audio_features(unrecorded) == "logmel"  # 80-d can only be the fallback
    wide = {**unrecorded, "networks": {"denoiser": {"audio_dim": 1024}}}
    assert resolve_audio_features(wide, override="hubert:y") == "hubert:y"
    with pytest.raises(ValueError, match="1024-d audio features.*--audio-features"):
        resolve_audio_features(wide)


def test_generation_leaves_lightning_unimported(env: dict[str, Path], tmp_path: Path) -> None:
    import sys

    code = ("import sys\nfrom microscope_pl.inference.generate import generate\n"
            f"generate({str(env['diffusion'])!r}, 'astronaut', {str(env['speech'])!r}, {str(tmp_path / 'g.mp4')!r}, "
            "pose='still', steps=1, progress=False, device='cpu', log=None)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]" and (tmp_path / "g.mp4").is_file()


def test_pose_file_relative_to_reference(tmp_path: Path) -> None:
    from microscope_pl.inference.generate import motion_conditions

    rows = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    path = tmp_path / "track.csv"
    path.write_text("yaw,pitch,roll,scale,tx,ty,left,right\n" + "\n".join(",".join(map(str, r)) for r in rows))
    audio = torch.zeros(1, 5, 80)
    gen = torch.Generator().manual_seed(0)
    pose, blink, _ = motion_conditions(str(path), "first", audio, 80, "unused.ckpt", None, gen, print)
    assert pose.shape == (1, 5, 6) and blink.shape == (1, 5, 2)
    assert torch.equal(pose[0, 0], torch.zeros(6)) and torch.equal(blink[0, 3], torch.full((2,), 24.0))
    pose, blink, _ = motion_conditions(str(path), "zero", audio, 80, "unused.ckpt", None, gen, print)
    assert torch.equal(pose[0, 1], torch.from_numpy(rows[1, :6]))  # used as given
    with pytest.raises(ValueError, match="has 6 frames, the audio needs 9"):
        motion_conditions(str(path), "first", torch.zeros(1, 9, 80), 80, "unused.ckpt", None, gen, print)


def test_pbnet_pose(env: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("microscope_pl.models.pbnet")
    from microscope_pl.modules.pbnet_module import PBNetModule

    pbnet = PBNetModule(network={"audio_dim": 80, "d_model": 16, "num_heads": 2, "num_layers": 1, "latent_dim": 8})
    ckpt = _save(pbnet, tmp_path / "pbnet.ckpt")
    out = generate(env["diffusion"], "astronaut", env["speech"], tmp_path / "p.mp4", pbnet_checkpoint=str(ckpt),
                   steps=1, progress=False, device="cpu", log=None)
    assert out.is_file()


def test_demo_budgets_fit_the_plan() -> None:
    from microscope_pl.demo import BUDGETS, max_time

    # + ~3 min of start-up, data, latent cache and generation: 22.4 min measured at 19.5, inside 25
    assert sum(full for full, _ in BUDGETS.values()) <= 20.0
    assert sum(quick for _, quick in BUDGETS.values()) <= 2.0
    assert max_time(6) == "00:00:06:00" and max_time(0.4) == "00:00:00:24"


def test_demo_refuses_a_seed_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --seed stops the demo in one line before any data or training."""
    from microscope_pl.demo import parse_args

    assert parse_args(["--seed", "7"]).seed == 7 and parse_args([]).seed is None
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--seed", "-1"])
    assert exit_info.value.code == 2 and "--seed must be in [0, 2**32), got -1" in capsys.readouterr().err


def test_generation_frames_and_levels_like_the_checkpoints_data(env: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint trained on prepared data carries its framing recipe and loudness target:
    generation crops the portrait with that recipe and brings the speech to that level."""
    from microscope_pl.data.framing import SYNTH_FRAMING
    from microscope_pl.inference.generate import run_generation
    from microscope_pl.inference.inputs import portrait_box, read_image

    ckpt = torch.load(env["diffusion"], weights_only=True)
    assert ckpt["microscope"]["data"] is None  # built without a data module: the synthetic recipe applies
    prepared = {"framing": {"detector": "haar", "scale": 1.6, "offset": [0.0, 0.0], "reference": "box"},
                "loudness_dbfs": -23.0, "source": "prepared"}
    ckpt["microscope"]["data"] = prepared
    path = tmp_path / "prepared.ckpt"
    torch.save(ckpt, path)
    messages: list[str] = []
    run_generation(path, "astronaut", env["speech"], tmp_path / "p.mp4", pose="still", steps=1, progress=False,
                   device="cpu", log=messages.append)
    rgb = read_image("astronaut")
    box, _ = portrait_box(rgb, prepared["framing"])
    synth_box, _ = portrait_box(rgb, SYNTH_FRAMING)
    assert box[2] < synth_box[2]  # 1.6 x the face box instead of 2.44 x
    assert any(f"{box[2]}x{box[2]} at ({box[0]}, {box[1]})" in m for m in messages), messages
    assert any("heard at -23 dBFS like the training data" in m for m in messages), messages


def test_auto_precision_decodes_in_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from microscope_pl.inference import generate as gen

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(gen, "cpu_has_bf16", lambda native=native: native)
        assert gen.resolve_precision("auto", cpu, "denoise") == "fp32"
        assert gen.resolve_precision("auto", cpu, "decode") == ("bf16" if native else "fp32")
        assert gen.resolve_precision("fp32", cpu, "decode") == "fp32" and gen.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="stage must be"):
        gen.resolve_precision("auto", cpu, "encode")
