"""CLI smoke tests of phases 1 and 2: fit, resume, test, frozen upstream."""
from __future__ import annotations

import pytest
import torch

from microscope_pl.cli import main

from helpers import REPO, SHORT_RUN, TINY_FDE, TINY_LMAE, data_args, fit


def test_phase1_fast_dev_run_with_equivariance(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--model.init_args.equivariance_weight", "0.1", "--trainer.fast_dev_run", "1"]
    assert fit("phase1_fde.yaml", synth_root, *TINY_FDE, *extra) == 0
    # a smoke run leaves no last.ckpt that a later `make phase1` would resume from
    assert not (tmp_path / "checkpoints/synth/phase1/last.ckpt").exists()


def test_phase1_writes_best_and_last(trained):
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(trained / "checkpoints/synth/phase1" / name, weights_only=True)
        assert ckpt["microscope_phase"] == "phase1"
    assert not list((trained / "checkpoints/synth/phase1").glob("*.tmp"))


def test_checkpoint_of_another_network_version_is_refused_in_one_line(trained, tmp_path):
    from microscope_pl.checkpointing import CheckpointError
    from microscope_pl.phases import load_module

    ckpt = torch.load(trained / "checkpoints/synth/phase1/best.ckpt", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.dim() > 1)
    ckpt["state_dict"][name] = ckpt["state_dict"][name][:1]  # as if the layer had another width
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="does not fit this version") as err:
        load_module(tmp_path / "old.ckpt", "phase1")
    assert "\n" not in str(err.value) and name in str(err.value)


def test_phase2_keeps_fde_bitwise_and_optimises_only_lmae(trained):
    p1 = torch.load(trained / "checkpoints/synth/phase1/best.ckpt", weights_only=True)
    p2 = torch.load(trained / "checkpoints/synth/phase2/last.ckpt", weights_only=True)
    fde1 = {k: v for k, v in p1["state_dict"].items() if k.startswith("fde.")}
    fde2 = {k: v for k, v in p2["state_dict"].items() if k.startswith("fde.")}
    assert fde1.keys() == fde2.keys() and fde1
    assert all(torch.equal(fde1[k], fde2[k]) for k in fde1)
    lmae_params = [k for k in p2["state_dict"] if k.startswith("lmae.") and "running" not in k]
    optimised = sum(len(group["params"]) for group in p2["optimizer_states"][0]["param_groups"])
    from microscope_pl.phases import load_module

    module = load_module(trained / "checkpoints/synth/phase2/last.ckpt", "phase2")
    assert optimised == len(list(module.lmae.parameters())) == len([k for k in lmae_params])
    upstream = p2["hyper_parameters"]["upstream"]
    assert upstream["phase"] == "phase1" and p2["microscope"]["upstream"] == upstream
    assert upstream["path"].endswith("best.ckpt") and len(upstream["sha256"]) == 64


def test_phase2_refuses_mismatched_upstream(trained, synth_root, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    wrong_phase = ["--model.init_args.fde_ckpt_path", str(trained / "checkpoints/synth/phase2/last.ckpt")]
    assert fit("phase2_lmae.yaml", synth_root, *TINY_LMAE, *wrong_phase, "--trainer.fast_dev_run", "1") == 2
    assert "is a phase2 checkpoint, expected a phase1 checkpoint" in capsys.readouterr().err
    wrong_size = [*TINY_LMAE, "--model.init_args.image_size", "128"]
    assert fit("phase2_lmae.yaml", synth_root, *wrong_size, "--trainer.fast_dev_run", "1") == 2
    assert "incompatible image_size: this phase has 128, the upstream checkpoint has 64" in capsys.readouterr().err


def test_test_command_reports_compression_and_both_psnrs(trained, synth_root, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    code = main(["test", "--config", str(REPO / "configs/phase2_lmae.yaml"), *data_args(synth_root), *TINY_LMAE,
                 "--trainer.limit_test_batches", "1",
                 "--ckpt_path", str(trained / "checkpoints/synth/phase2/last.ckpt")])
    assert code == 0
    out = capsys.readouterr().out
    for key in ("test/compression_ratio", "test/fde_psnr", "test/mdcf_psnr", "test/copy_source_psnr"):
        assert key in out
    assert "768" in out


def test_fit_resumes_from_last_and_rejects_truncated(trained, synth_root, monkeypatch, capsys, tmp_path):
    work = tmp_path / "resume"
    work.mkdir()
    (work / "checkpoints/synth/phase1").mkdir(parents=True)
    last = work / "checkpoints/synth/phase1/last.ckpt"
    last.write_bytes((trained / "checkpoints/synth/phase1/last.ckpt").read_bytes())
    monkeypatch.chdir(work)
    more = [*SHORT_RUN, "--trainer.max_epochs", "2"]
    assert fit("phase1_fde.yaml", synth_root, *TINY_FDE, *more) == 0
    assert f"resuming from {last}" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["epoch"] == 1
    last.write_bytes(last.read_bytes()[:1000])
    assert fit("phase1_fde.yaml", synth_root, *TINY_FDE, *more) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {last} is truncated or corrupt")
    assert "\n" not in err
