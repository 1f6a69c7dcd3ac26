"""The GPU paths: bf16 autocast against fp32, every phase's `fit` with
bf16-mixed on one GPU, generation on CUDA and the benchmark on CUDA.

Marked `gpu`: `make test` skips them; run `pytest -m gpu` on a machine with CUDA.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY_FDE, TINY_LMAE, fit
from test_diffusion_cli import CLIPS
from test_diffusion_cli import TINY_UNET as SMALL_UNET
from microscope_pl.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BF16 = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]
TINY_UNET = [*SMALL_UNET, *CLIPS, "--model.init_args.denoiser.extras.audio_context", "2"]
STEPS = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--trainer.check_val_every_n_epoch", "1"]


def test_unet_bf16_autocast_is_close_to_fp32_and_cuda_to_cpu() -> None:
    from microscope_pl.models.unet3d import UNet3D

    torch.manual_seed(0)
    net = UNet3D(in_channels=4, image_cond_channels=8, audio_dim=80, base_channels=32, channel_mult=(1, 2),
                 attn_levels=(1,), num_heads=2, cond_dim=32, audio_context=2)
    for p in net.parameters():  # the zero-initialised output layers would make every comparison trivial
        p.data.normal_(0, 0.05)
    args = [torch.randn(2, 4, 33, 8, 8), torch.tensor([10, 900]), torch.randn(2, 8, 8, 8),
            torch.randn(2, 33, 80), torch.randn(2, 33, 6), torch.randn(2, 33, 2)]
    with torch.no_grad():
        cpu = net(*args)
        net.cuda()
        gpu_args = [a.cuda() for a in args]
        fp32 = net(*gpu_args).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net(*gpu_args).float().cpu()
    scale = cpu.abs().mean()
    assert (fp32 - cpu).abs().mean() < 1e-2 * scale  # TF32 at most
    assert (bf16 - fp32).abs().mean() < 5e-2 * scale


@pytest.fixture(scope="module")
def gpu_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phases 1, 2 and diffusion, each fitted a few steps on the GPU with bf16-mixed."""
    made = REPO / "data/synth"  # `make data`, if there (making one needs ffmpeg)
    data = made if (made / "manifest.json").is_file() else request.getfixturevalue("synth_root")
    work = tmp_path_factory.mktemp("gpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert fit("phase1_fde.yaml", data, *TINY_FDE, *STEPS, *GPU_BF16) == 0
        assert fit("phase2_lmae.yaml", data, *TINY_LMAE, *STEPS, *GPU_BF16) == 0
        assert fit("diffusion.yaml", data, *TINY_UNET, *STEPS, *GPU_BF16) == 0
    return work / "checkpoints/synth/diffusion/last.ckpt"


def test_every_phase_fits_with_bf16_mixed(gpu_checkpoint: Path) -> None:
    state = torch.load(gpu_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="writing the video needs ffmpeg")
def test_generates_on_cuda_in_bf16(gpu_checkpoint: Path, tmp_path: Path) -> None:
    from microscope_pl.data.audio import write_wav
    from microscope_pl.inference.generate import run_generation

    t = torch.arange(16000 * 2) / 16000  # 2 s of a syllable-like tone: 50 frames at 25 fps
    speech = 0.3 * torch.sin(2 * torch.pi * 170 * t) * (0.5 + 0.5 * torch.sin(8 * t))
    write_wav(tmp_path / "speech.wav", speech.numpy())
    report = run_generation(gpu_checkpoint, "astronaut", tmp_path / "speech.wav", tmp_path / "out.mp4", pose="still",
                            device="cuda", precision="auto", progress=False)
    assert report.path.is_file() and report.frames == 50 and report.device.startswith("cuda")


def test_bench_smoke_runs_on_cuda_with_bf16(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "generate", "--smoke", "--device", "cuda", "--precision", "bf16", "--out", str(out)]) == 0
    cases = json.loads((out / "report.json").read_text())["cases"]
    assert all(c["status"] == "ok" for c in cases), [c.get("error") for c in cases]
    assert all(c["denoise"]["peak_gpu_gb"] > 0 for c in cases if c["kind"] == "generate")
    assert "precision bf16" in (out / "report.md").read_text()


GPU_FP16 = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "16-mixed"]
PBNET_SMALL = ["--model.init_args.network.d_model", "16", "--model.init_args.network.num_heads", "2",
               "--model.init_args.network.latent_dim", "8", *CLIPS]
FP16_STEPS = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "12", "--trainer.limit_val_batches", "1",
              "--trainer.check_val_every_n_epoch", "1", "--data.init_args.samples_per_video", "8"]


def test_every_phase_fits_with_16_mixed_and_the_loss_scale_settles(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The V100 setting: fp16 autocast with a GradScaler. After a dozen steps of each phase the
    weights are finite and the scale has settled (still large: it halves on every overflow, so a
    scale driven down to ~1 would mean fp16 overflows at every step)."""
    made = REPO / "data/synth"
    data = made if (made / "manifest.json").is_file() else request.getfixturevalue("synth_root")
    phases = [("phase1_fde.yaml", "phase1", TINY_FDE), ("phase2_lmae.yaml", "phase2", TINY_LMAE),
              ("pbnet.yaml", "pbnet", PBNET_SMALL), ("diffusion.yaml", "diffusion", TINY_UNET)]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        for config, phase, tiny in phases:
            assert fit(config, data, *tiny, *FP16_STEPS, *GPU_FP16) == 0, phase
            ckpt = torch.load(tmp_path / f"checkpoints/synth/{phase}/last.ckpt", weights_only=True)
            floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
            assert all(torch.isfinite(v).all() for v in floats), phase
            scale = float(ckpt["MixedPrecision"]["scale"])  # torch.amp.GradScaler.state_dict
            assert 2.0 ** 6 <= scale <= 2.0 ** 24, (phase, scale)
