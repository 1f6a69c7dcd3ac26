"""CLI smoke tests of the diffusion phase, PBNet, the ablation configs and the orchestrator."""
from __future__ import annotations

import pytest
import torch

from helpers import REPO, TINY_FDE, TINY_LMAE, data_args, fit
from microscope_pl.cli import main

TINY_UNET = [
    "--model.init_args.image_size", "64", "--model.init_args.denoiser.base_channels", "16",
    "--model.init_args.denoiser.channel_mult", "[1]", "--model.init_args.denoiser.attn_levels", "[0]",
    "--model.init_args.denoiser.num_heads", "2", "--model.init_args.denoiser.cond_dim", "16",
    "--model.init_args.denoiser.image_cond_channels", "8", "--model.init_args.sampling.steps", "2",
    "--model.init_args.sampling.decode_chunk", "4", "--model.init_args.lpips", "off",
]
CLIPS = ["--data.init_args.num_frames", "8"]
ONE_STEP = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.check_val_every_n_epoch", "1"]


@pytest.fixture(scope="module")
def diffusion_ckpt(trained, synth_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        assert fit("diffusion.yaml", synth_root, *TINY_UNET, *CLIPS, *ONE_STEP) == 0
    return trained / "checkpoints/synth/diffusion/last.ckpt"


def test_diffusion_fit_records_upstream_and_freezes_mdcf(diffusion_ckpt, trained):
    ckpt = torch.load(diffusion_ckpt, weights_only=True)
    assert ckpt["microscope_phase"] == "diffusion"
    hp = ckpt["hyper_parameters"]
    assert hp["upstream"]["phase"] == "phase2" and hp["upstream"]["path"].endswith(".ckpt")
    assert ckpt["microscope"]["networks"]["lmae"]["num_down"] == 3
    p2 = torch.load(trained / "checkpoints/synth/phase2/best.ckpt", weights_only=True)["state_dict"]
    for key, value in p2.items():
        if key.startswith(("fde.", "lmae.")):
            assert torch.equal(ckpt["state_dict"]["pipeline.codec." + key], value), key
    assert float(ckpt["state_dict"]["pipeline.codec.scale"]) != 1.0  # calibrated on the first batch


def test_diffusion_validation_logs_a_video(diffusion_ckpt, trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags, scalars = set(), {}
    for events in (trained / "logs/synth/diffusion").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"])
        scalars.update({tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]})
    assert "val/video_generated|ground_truth" in tags and "val/generated_over_ground_truth" in tags
    assert -1.0 < scalars["val/audio_gain"] < 1.0  # (shuffled-audio loss - own-audio loss) / shuffled


def test_diffusion_test_reports_sync_and_fs(diffusion_ckpt, trained, synth_root, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    code = main(["test", "--config", str(REPO / "configs/diffusion.yaml"), *data_args(synth_root), *TINY_UNET, *CLIPS,
                 "--trainer.limit_test_batches", "1", "--ckpt_path", str(diffusion_ckpt)])
    assert code == 0
    out = capsys.readouterr().out
    for key in ("test/psnr", "test/fs_error", "test/sync_corr", "test/sync_corr_gt", "test/sync_corr_noaudio",
                "test/sync_corr_codec", "test/codec_psnr"):
        assert key in out, key


def test_test_time_settings_on_the_command_line_beat_the_checkpoint(diffusion_ckpt, trained, synth_root,
                                                                     monkeypatch):
    # Lightning applies the checkpoint's hyper-parameters over the config; the guidance
    # scale named here must still be the one the test samples with
    from microscope_pl.cli import model_args_named
    from microscope_pl.modules.diffusion_module import LatentDiffusionModule

    assert model_args_named(["--model.init_args.audio_scale", "3", "--model.sampler=dpm", "--model.class_path",
                             "x", "--data.init_args.num_frames", "8"]) == ["audio_scale", "sampler"]
    seen = []
    monkeypatch.setattr(LatentDiffusionModule, "on_test_start",
                        lambda self: seen.append((self.settings["sampling"].audio_scale, self.settings["denoiser"].cond_dim)), raising=False)
    monkeypatch.chdir(trained)
    code = main(["test", "--config", str(REPO / "configs/diffusion.yaml"), *data_args(synth_root), *TINY_UNET, *CLIPS,
                 "--model.init_args.sampling.audio_scale", "3", "--trainer.limit_test_batches", "1",
                 "--ckpt_path", str(diffusion_ckpt)])
    assert code == 0 and seen == [(3.0, 16)]


def test_dawn_baseline_config_diffuses_h4_dynamics(trained, synth_root, monkeypatch):
    monkeypatch.chdir(trained)
    baseline = ["--config", str(REPO / "configs/ablations/dawn_baseline.yaml")]
    code = main(["fit", "--config", str(REPO / "configs/diffusion.yaml"), *baseline, *data_args(synth_root),
                 *TINY_UNET, *CLIPS, "--model.init_args.mdcf_ckpt_path", "checkpoints/synth/phase1/best.ckpt",
                 "--trainer.fast_dev_run", "1"])
    assert code == 0


def test_pbnet_fast_dev_run(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--model.init_args.network.d_model", "16", "--model.init_args.network.num_heads", "2",
             "--model.init_args.network.latent_dim", "8"]
    assert fit("pbnet.yaml", synth_root, *small, *CLIPS, "--trainer.fast_dev_run", "1") == 0


ABLATIONS = {
    "fde_d4.yaml": ("phase1_fde.yaml", TINY_FDE),
    "fde_d8.yaml": ("phase1_fde.yaml", TINY_FDE),
    "mdcf_d16.yaml": ("phase2_lmae.yaml", [*TINY_LMAE, "--model.init_args.network.num_down", "2",
                                           "--model.init_args.network.channel_mult", "[1, 1, 2]"]),
    "mdcf_d32.yaml": ("phase2_lmae.yaml", TINY_LMAE),
    "mdcf_no_igc.yaml": ("phase2_lmae.yaml", TINY_LMAE),
    "mdcf_no_tpc.yaml": ("phase2_lmae.yaml", TINY_LMAE),
    "vae_d32.yaml": ("phase1_fde.yaml", ["--model.init_args.image_size", "64",
                                         "--model.init_args.network.base_channels", "8",
                                         "--model.init_args.network.channel_mult", "[1, 1, 1, 1, 1, 1]",
                                         "--model.init_args.network.norm_groups", "4",
                                         "--model.init_args.lpips", "off"]),
}


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_config_runs_one_step(variant, trained, synth_root, monkeypatch):
    base, tiny = ABLATIONS[variant]
    monkeypatch.chdir(trained)
    needs_phase1 = variant.startswith("mdcf") and variant != "mdcf_no_tpc.yaml"
    upstream = ["--model.init_args.fde_ckpt_path", "checkpoints/synth/phase1/best.ckpt"] if needs_phase1 else []
    args = ["fit", "--config", str(REPO / "configs" / base), "--config", str(REPO / "configs/ablations" / variant),
            *data_args(synth_root), *tiny, *upstream, "--trainer.fast_dev_run", "1"]
    assert main(args) == 0


def test_run_skips_finished_phases(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    assert main(["run", "--until", "phase2"]) == 0
    out = capsys.readouterr().out
    assert "[phase1]" in out and "[phase2]" in out and out.count("skipped") == 2


def test_run_stops_with_a_clear_message_when_a_phase_fails(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = main(["run", "--only", "pbnet", "--force", "--", "--trainer.no_such_option", "1"])
    assert code != 0
    assert "phase pbnet failed" in capsys.readouterr().err
