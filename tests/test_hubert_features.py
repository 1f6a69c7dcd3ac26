"""The HuBERT feature path end to end, offline, with a tiny randomly initialised model saved to a folder."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("transformers")

HIDDEN = 32


@pytest.fixture(scope="module")
def tiny_hubert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer, 32-wide HuBERT (conv stride 10: 1600 features a second) saved with save_pretrained."""
    import torch
    from transformers import HubertConfig, HubertModel

    folder = tmp_path_factory.mktemp("tiny_hubert")
    config = HubertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                          conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    HubertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub: a local folder must be enough."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _speechlike(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.2 * np.sin(2 * np.pi * (150 + 80 * np.sin(2 * np.pi * 2 * t)) * t) * (t % 0.5 < 0.3)).astype(np.float32)


def test_extractor_gives_one_row_per_frame(tiny_hubert: Path, capsys: pytest.CaptureFixture) -> None:
    from microscope_pl.data.audio import AudioFeatureExtractor

    extractor = AudioFeatureExtractor(f"hubert:{tiny_hubert}")
    assert "no preprocessor_config.json" in capsys.readouterr().out
    assert extractor.dim == HIDDEN and extractor._receptive_field() == 20
    wave = _speechlike(2.0)
    feats = extractor(wave, 50)
    assert feats.shape == (50, HIDDEN) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert feats.std(axis=0).mean() > 1e-3, "features change over time"
    np.testing.assert_array_equal(feats, extractor(wave, 50))  # deterministic (eval mode)
    assert extractor(wave[:100], 3).shape == (3, HIDDEN)  # shorter than a frame: padded, held
    chunked = AudioFeatureExtractor(f"hubert:{tiny_hubert}", chunk_seconds=1.0)
    assert chunked(wave, 50).shape == (50, HIDDEN)


def test_extractor_reads_a_saved_preprocessor_config(tiny_hubert: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import shutil

    from transformers import Wav2Vec2FeatureExtractor

    from microscope_pl.data.audio import AudioFeatureExtractor

    folder = tmp_path / "with_processor"
    shutil.copytree(tiny_hubert, folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=False).save_pretrained(folder)
    extractor = AudioFeatureExtractor(f"hubert:{folder}")
    assert "no preprocessor_config.json" not in capsys.readouterr().out
    assert extractor._processor.do_normalize is False
    assert extractor(_speechlike(1.0), 25).shape == (25, HIDDEN)


def test_missing_model_folder_is_one_clear_error(tmp_path: Path) -> None:
    from microscope_pl.data.audio import AudioFeatureExtractor

    with pytest.raises(RuntimeError, match="cannot load HuBERT weights"):
        AudioFeatureExtractor(f"hubert:{tmp_path / 'nothing_here'}")


def _face_video(path: Path, shift: int, seconds: float = 2.0) -> None:
    """The astronaut photo (a face the detectors find), slowly panned, with a 44.1 kHz stereo tone."""
    from skimage.data import astronaut

    photo = cv2.resize(astronaut(), (320, 320), interpolation=cv2.INTER_AREA)
    n = int(seconds * 25)
    frames = np.stack([photo[10:210, shift + i // 5:shift + i // 5 + 240] for i in range(n)])
    cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "240x200",
           "-r", "25", "-i", "pipe:0", "-f", "lavfi", "-i", f"sine=frequency={220 + shift}:sample_rate=44100",
           "-t", str(seconds), "-ac", "2", "-c:a", "aac", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True)


def test_prepare_cli_with_hubert_features(tiny_hubert: Path, tmp_path: Path) -> None:
    from microscope_pl.cli import main

    src = tmp_path / "raw"
    src.mkdir()
    for i, shift in enumerate((20, 40)):
        _face_video(src / f"speaker{i}.mp4", shift)
    out = tmp_path / "prepared"
    kind = f"hubert:{tiny_hubert}"
    assert main(["data", "prepare", "--src", str(src), "--out-dir", str(out), "--size", "64",
                 "--audio-features", kind, "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["audio_features"] == kind and manifest["audio_dim"] == HIDDEN
    assert sorted(manifest["train"] + manifest["test"]) == ["speaker0", "speaker1"]
    for name in ("speaker0", "speaker1"):
        meta = json.loads((out / "videos" / name / "meta.json").read_text())
        feats = np.load(out / "videos" / name / "audio_feats.npy")
        assert feats.shape == (meta["frames"], HIDDEN) and feats.dtype == np.float32 and np.isfinite(feats).all()
    # Resuming with another feature kind would mix widths: refused.
    assert main(["data", "prepare", "--src", str(src), "--out-dir", str(out), "--size", "64", "--quiet"]) == 2
