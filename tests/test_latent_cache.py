"""`microscope latents cache`, training from it, and diffusion's TensorBoard video."""
from __future__ import annotations

import pytest
import torch
from test_diffusion_cli import CLIPS, TINY_UNET

from helpers import REPO, data_args
from microscope_pl.cli import main
from microscope_pl.data.datasets import ClipDataset
from microscope_pl.data.latent_cache import load_cache, reference_indices
from microscope_pl.modules.media import gif_bytes
from microscope_pl.phases import load_module


@pytest.fixture(scope="module")
def cache_file(trained, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "latents.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        assert main(["latents", "cache", "--data", str(synth_root), "--out", str(out), "--references", "3",
                     "--quiet"]) == 0
    return out


def test_reference_indices_start_at_zero_and_spread():
    assert reference_indices(50, 3) == [0, 24, 49]
    assert reference_indices(2, 5) == [0, 1]
    assert reference_indices(10, 1) == [0]


def test_cache_holds_the_online_latents(cache_file, trained, synth_root):
    cache = load_cache(cache_file)
    assert cache["latent"] == "mdcf" and cache["image_size"] == 64 and len(cache["upstream"]["sha256"]) == 64
    assert not list(cache_file.parent.glob("*.tmp*"))  # written atomically
    module = load_module(trained / "checkpoints/synth/phase2/best.ckpt", "phase2")
    data = ClipDataset(synth_root, "train", num_frames=6, image_size=64, samples_per_video=1)
    name = data.names[0]
    entry = cache["videos"][name]
    assert entry["ref_indices"].tolist() == reference_indices(entry["frames"], 3)
    assert entry["mean"].shape == (3, entry["frames"], 4, 2, 2) and entry["logvar"].shape == entry["mean"].shape
    # the clip of video `name` starting at frame 0 with frame 0 as reference, encoded online
    frames = data._images(data.store.frames(name, list(range(6))))
    with torch.no_grad():
        mu, _ = module.lmae.encode(module.fde.dynamics(frames[:1].expand(6, -1, -1, -1), frames))
    torch.testing.assert_close(entry["mean"][0, :6].float(), mu, atol=2e-2, rtol=1e-2)  # stored in float16


def test_cached_clips_skip_frames_and_keep_the_curriculum(cache_file, synth_root):
    videos = load_cache(cache_file)["videos"]
    first = ClipDataset(synth_root, "train", num_frames=8, reference="first", image_size=64, samples_per_video=4,
                        latents=videos)
    for i in range(len(first)):
        item = first[i]
        assert "frames" not in item and item["latent_mean"].shape == (8, 4, 2, 2)
        assert item["start"] == item["ref_index"] and item["ref_index"] in videos[item["name"]]["ref_indices"]
        assert item["reference"].shape == (3, 64, 64) and item["pose"].shape == (8, 6)
    anywhere = ClipDataset(synth_root, "train", num_frames=8, reference="random", image_size=64,
                           samples_per_video=8, latents=videos)
    assert any(it["start"] != it["ref_index"] for it in (anywhere[i] for i in range(len(anywhere))))
    with pytest.raises(ValueError, match="lacks"):
        ClipDataset(synth_root, "train", num_frames=8, image_size=64, latents={})


def test_cached_clips_carry_their_reference_and_decode_no_video(cache_file, synth_root, monkeypatch):
    videos = load_cache(cache_file)["videos"]
    data = ClipDataset(synth_root, "train", num_frames=8, reference="random", image_size=64, samples_per_video=2,
                       latents=videos)
    decode = data.store.frames
    monkeypatch.setattr(data.store, "frames", lambda *a: pytest.fail("decoded video for a cached clip"))
    items = [data[i] for i in range(len(data))]
    monkeypatch.undo()
    for item in items:
        decoded = data._images(decode(item["name"], [item["ref_index"]]))[0]
        torch.testing.assert_close(item["reference"], decoded, atol=1 / 255, rtol=0)  # stored as uint8
    old = {name: {k: v for k, v in entry.items() if k != "ref_frames"} for name, entry in videos.items()}
    older = ClipDataset(synth_root, "train", num_frames=8, reference="random", image_size=64, samples_per_video=2,
                        latents=old)  # a cache from before ref_frames: the reference is decoded
    item = older[0]
    torch.testing.assert_close(item["reference"], data._images(decode(item["name"], [item["ref_index"]]))[0])


def _fit_args(trained, synth_root):
    """A one-step diffusion fit in the current directory, upstream named explicitly."""
    return ["fit", "--config", str(REPO / "configs/diffusion.yaml"), *data_args(synth_root), *TINY_UNET, *CLIPS,
            "--trainer.fast_dev_run", "1",
            "--model.init_args.mdcf_ckpt_path", str(trained / "checkpoints/synth/phase2/best.ckpt")]


def test_diffusion_trains_from_the_cache(cache_file, trained, synth_root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main([*_fit_args(trained, synth_root), "--data.init_args.latent_cache", str(cache_file)]) == 0


def test_cache_of_another_upstream_is_refused(cache_file, trained, synth_root, monkeypatch, tmp_path, capsys):
    cache = load_cache(cache_file)
    cache["upstream"]["sha256"] = "0" * 64
    stale = tmp_path / "stale.pt"
    torch.save(cache, stale)
    monkeypatch.chdir(tmp_path)
    code = main([*_fit_args(trained, synth_root), "--data.init_args.latent_cache", str(stale)])
    assert code == 2
    assert "rebuild the cache" in capsys.readouterr().err


def test_cache_command_rejects_bad_input(tmp_path, synth_root, capsys):
    assert main(["latents", "cache", "--data", str(synth_root), "--out", str(tmp_path / "x.pt"),
                 "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a cache")
    with pytest.raises(Exception, match="not a readable latent cache"):
        load_cache(tmp_path / "junk.pt")
    assert not (tmp_path / "x.pt").exists()


def test_gif_has_every_frame():
    from io import BytesIO

    from PIL import Image

    frames = torch.rand(5, 3, 16, 24)
    image = Image.open(BytesIO(gif_bytes(frames, fps=25)))
    assert image.size == (24, 16) and image.n_frames == 5


def test_demo_builds_its_cache_once_per_phase2_checkpoint(trained, synth_root, tmp_path, monkeypatch, capsys):
    """`make demo` trains diffusion from a latent cache: made after phase 2, kept while phase 2's
    checkpoint is the same file, rebuilt when it changes."""
    import shutil

    from microscope_pl import demo

    work = tmp_path / "work"
    shutil.copytree(trained / "checkpoints", work / "checkpoints")
    monkeypatch.chdir(work)
    monkeypatch.setattr(demo, "DATA_ROOT", synth_root)
    monkeypatch.setattr(demo, "LATENT_CACHE", tmp_path / "latents.pt")
    path = demo.ensure_latent_cache(references=1)
    cache = load_cache(path)
    assert cache["upstream"]["phase"] == "phase2" and len(next(iter(cache["videos"].values()))["ref_indices"]) == 1
    assert "MDCF latents of the training videos" in capsys.readouterr().out
    stamp = path.stat().st_mtime_ns
    demo.ensure_latent_cache(references=1)
    assert "kept" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp
    phase2 = demo.find_checkpoint("phase2")
    state = torch.load(phase2, weights_only=True)
    state["global_step"] += 1  # another phase-2 checkpoint
    torch.save(state, phase2)
    demo.ensure_latent_cache(references=1)
    assert "MDCF latents" in capsys.readouterr().out and path.stat().st_mtime_ns != stamp
