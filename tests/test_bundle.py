"""`microscope export`: a generation bundle that generates what its checkpoint does, carries
PBNet, describes itself in a model card, and loads without unpickling anything."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_run, write_speech

from microscope_pl.checkpointing import file_sha256
from microscope_pl.cli import main

BASE = ["--steps", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundle")
    files = tiny_run(root)
    files["speech"] = write_speech(root / "speech.wav", 0.8)
    files["metrics"] = root / "metrics.json"
    files["metrics"].write_text(json.dumps({"videos": 3, "metrics": {"psnr": 21.5, "sync_corr": 0.25}}))
    files["bundle"] = root / "shipped" / "bundle"
    assert main(["export", "--checkpoint", str(files["diffusion"]), "--out", str(files["bundle"]),
                 "--metrics", str(files["metrics"])]) == 0
    return files


def _frames(path: Path) -> np.ndarray:
    from microscope_pl.data.video_io import read_video

    return read_video(path)


def test_bundle_holds_only_what_sampling_needs(env: dict[str, Path]) -> None:
    bundle = env["bundle"]
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "model.safetensors"]
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]  # no temporary folder left
    weights = (bundle / "model.safetensors").stat().st_size
    assert weights < env["diffusion"].stat().st_size  # no training copy, no optimizer state
    from safetensors import safe_open

    with safe_open(str(bundle / "model.safetensors"), framework="pt") as handle:
        parts = {key.split(".")[0] for key in handle.keys()}
        meta = handle.metadata()
    assert parts == {"pipeline", "pbnet"} and meta["format"] == "microscope-bundle/1"
    card = (bundle / "README.md").read_text()
    upstream = torch.load(env["diffusion"], weights_only=True)["microscope"]["upstream"]
    for needle in (file_sha256(env["diffusion"]), file_sha256(env["pbnet"]), upstream["sha256"],
                   "| psnr | 21.5000 |", "3D U-Net denoiser (EMA)", "PBNet (pose and blink)"):
        assert needle in card, needle


def test_bundle_generates_what_the_checkpoint_does(env: dict[str, Path], tmp_path: Path) -> None:
    """PBNet comes from inside the bundle (nothing lies beside it), and the frames are the checkpoint's."""
    outs = {}
    for name, source in (("ckpt", env["diffusion"]), ("bundle", env["bundle"]),
                         ("file", env["bundle"] / "model.safetensors")):
        outs[name] = tmp_path / f"{name}.mp4"
        assert main(["generate", "--checkpoint", str(source), "--image", "astronaut", "--audio", str(env["speech"]),
                     "--out", str(outs[name]), "--seed", "4", *BASE]) == 0
    reference = _frames(outs["ckpt"])
    np.testing.assert_array_equal(_frames(outs["bundle"]), reference)
    np.testing.assert_array_equal(_frames(outs["file"]), reference)


def test_loading_a_bundle_never_unpickles(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from microscope_pl.inference.loading import load_model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bundle load went through pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    model = load_model(env["bundle"])
    net, where = model.pbnet()
    assert model.pipeline.image_size == 64 and net.audio_dim == 80 and "bundle" in where


def test_bundle_without_pbnet_says_so(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle = tmp_path / "nopb"
    assert main(["export", "--checkpoint", str(env["diffusion"]), "--out", str(bundle), "--no-pbnet"]) == 0
    capsys.readouterr()
    out = tmp_path / "x.mp4"
    argv = ["generate", "--checkpoint", str(bundle), "--image", "astronaut", "--audio", str(env["speech"]),
            "--out", str(out), *BASE]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the notes on the portrait and audio
    assert err.startswith("error: the bundle") and "holds no PBNet" in err and not out.exists()
    assert main([*argv, "--pose", "still"]) == 0  # the rest of it works


BAD = {
    "junk safetensors": ("junk", "is not a readable safetensors file"),
    "foreign safetensors": ("foreign", "is not a microscope generation bundle"),
    "missing bundle": ("missing", "bundle not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundles_are_refused_in_one_line(case: str, env: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    kind, expected = BAD[case]
    path = tmp_path / f"{kind}.safetensors"
    if kind == "junk":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    elif kind == "foreign":
        save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    out = tmp_path / "x.mp4"
    assert main(["generate", "--checkpoint", str(path), "--image", "astronaut", "--audio", str(env["speech"]),
                 "--out", str(out), "--pose", "still", *BASE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


def test_export_refusals(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--checkpoint", str(env["diffusion"]), "--out", str(env["bundle"])]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(env["phase1"]), "--out", str(tmp_path / "b")]) == 2
    assert "expected a diffusion checkpoint" in capsys.readouterr().err
    bad = tmp_path / "metrics.json"
    bad.write_text("[1, 2]")
    assert main(["export", "--checkpoint", str(env["diffusion"]), "--out", str(tmp_path / "c"),
                 "--metrics", str(bad)]) == 2
    assert "not a readable metrics.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # nothing half-written
