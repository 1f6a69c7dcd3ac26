"""The synthetic data set (via the session fixture ``synth_root``) and the audio / video IO it rests on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from microscope_pl.data.audio import (AudioFeatureExtractor, load_audio, logmel_features, loudness_envelope,
                                      mel_filterbank, read_wav)
from microscope_pl.data.synth import JAW_DROP, drop_jaw, make_portrait, synthesize
from microscope_pl.data.video_io import VideoWriter, read_video, video_info


def _names(root: Path) -> list[str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return manifest["train"] + manifest["test"]


def _probe_streams(path: Path) -> dict[str, dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                         capture_output=True, check=True).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}


# ---------------------------------------------------------------- layout


def test_layout_manifest_and_media(synth_root: Path) -> None:
    manifest = json.loads((synth_root / "manifest.json").read_text())
    assert manifest["format"] == "microscope-pl/1" and manifest["source"] == "synthetic"
    assert (manifest["fps"], manifest["sample_rate"], manifest["size"]) == (25, 16000, 64)
    assert manifest["audio_features"] == "logmel" and manifest["audio_dim"] == 80
    assert len(manifest["train"]) == 3 and len(manifest["test"]) == 1
    for name in _names(synth_root):
        folder = synth_root / "videos" / name
        meta = json.loads((folder / "meta.json").read_text())
        info = video_info(folder / "video.mp4")
        assert info.fps == pytest.approx(25.0) and (info.width, info.height) == (64, 64)
        assert abs(info.frames - 50) <= 1 and meta["frames"] == info.frames
        streams = _probe_streams(folder / "video.mp4")
        assert streams["video"]["codec_name"] == "h264" and streams["video"]["pix_fmt"] == "yuv420p"
        assert int(streams["audio"]["sample_rate"]) == 16000 and streams["audio"]["codec_name"] == "aac"
        assert abs(float(streams["audio"]["duration"]) - info.frames / 25) < 0.04
        wave, rate = read_wav(folder / "audio.wav")
        assert rate == 16000 and wave.size == meta["frames"] * 640
        t = meta["frames"]
        for fname, shape in (("audio_feats.npy", (t, 80)), ("pose.npy", (t, 6)), ("blink.npy", (t, 2))):
            array = np.load(folder / fname)
            assert array.shape == shape and array.dtype == np.float32 and np.isfinite(array).all()
        assert len(meta["mouth_open"]) == t and meta["size"] == 64 and meta["fps"] == 25
        x0, y0, x1, y1 = meta["mouth_box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        pose = np.load(folder / "pose.npy")
        assert np.abs(pose[:, :3]).max() < 30 and 0.15 < pose[:, 3].mean() < 0.7
        assert not list(folder.parent.glob(".*")), "no temporary folders left behind"


def test_test_identities_never_in_train(synth_root: Path) -> None:
    manifest = json.loads((synth_root / "manifest.json").read_text())

    def identity(name: str) -> str:
        return json.loads((synth_root / "videos" / name / "meta.json").read_text())["identity"]

    train_ids = {identity(n) for n in manifest["train"]}
    test_ids = {identity(n) for n in manifest["test"]}
    assert test_ids and not train_ids & test_ids


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    runs = [synthesize(tmp_path / f"run{i}", videos=2, size=32, seconds=1.0, seed=3, verbose=False)
            for i in range(2)]
    other = synthesize(tmp_path / "other", videos=2, size=32, seconds=1.0, seed=4, verbose=False)
    for name in _names(runs[0]):
        for fname in ("audio_feats.npy", "pose.npy", "blink.npy", "meta.json"):
            a, b = (r / "videos" / name / fname for r in runs)
            assert a.read_bytes() == b.read_bytes(), fname
    assert _names(runs[0]) == _names(runs[1])
    first = _names(runs[0])[0]
    assert (runs[0] / "videos" / first / "pose.npy").read_bytes() != \
        (other / "videos" / _names(other)[0] / "pose.npy").read_bytes()


def test_syllable_fallback_and_bad_arguments(tmp_path: Path) -> None:
    root = synthesize(tmp_path / "syl", videos=2, size=32, seconds=1.0, speech="syllables", verbose=False)
    assert json.loads((root / "manifest.json").read_text())["speech"] == "syllables"
    with pytest.raises(ValueError, match="videos"):
        synthesize(tmp_path / "bad", videos=1)
    with pytest.raises(ValueError, match="size"):
        synthesize(tmp_path / "bad", videos=2, size=33)


# ---------------------------------------------------------------- audio-motion correlation


def test_mouth_moves_with_loudness(synth_root: Path) -> None:
    for name in _names(synth_root):
        folder = synth_root / "videos" / name
        meta = json.loads((folder / "meta.json").read_text())
        mouth_open = np.asarray(meta["mouth_open"])
        wave, _ = read_wav(folder / "audio.wav")
        loud = loudness_envelope(wave, meta["frames"])
        assert np.corrcoef(mouth_open, loud)[0, 1] > 0.6, name
        x0, y0, x1, y1 = meta["mouth_box"]
        region = read_video(folder / "video.mp4")[:, y0:y1, x0:x1].astype(np.float32)
        change = np.abs(np.diff(region, axis=0)).mean(axis=(1, 2, 3))  # frame t vs t-1, for t >= 1
        talking = np.maximum(mouth_open[1:], mouth_open[:-1]) > 0.4
        silent = np.maximum(mouth_open[1:], mouth_open[:-1]) < 0.05
        if talking.sum() >= 3 and silent.sum() >= 3:
            assert change[talking].mean() > 1.5 * change[silent].mean(), name
        # The widest-open frame looks clearly different from the most-closed one.
        widest, shut = int(np.argmax(mouth_open)), int(np.argmin(mouth_open))
        assert np.abs(region[widest] - region[shut]).mean() > 8.0, name


def test_the_jaw_drops_as_the_mouth_opens() -> None:
    """The chin below the mouth moves down by JAW_DROP face widths at full opening; the eyes stay."""
    p = make_portrait("procedural", 1, np.random.default_rng(0), 128)
    cx, cy, _, _ = p.mouth
    fw = p.face_width
    rows = np.broadcast_to(np.arange(p.template.shape[0], dtype=np.float32)[:, None, None], p.template.shape)
    for openness in (0.0, 0.5, 1.0):
        layer = rows.copy()  # each pixel holds its own row: the output shows where it came from
        drop_jaw(layer, p, openness)
        chin, brow = int(cy + 0.3 * fw), int(cy - 0.5 * fw)
        assert layer[chin, int(cx), 0] == pytest.approx(chin - JAW_DROP * fw * openness, abs=0.05)
        assert layer[brow, int(cx), 0] == brow
        assert layer[chin, int(cx + 0.95 * fw), 0] == chin  # beside the jaw: nothing moves
        assert np.all(np.diff(layer[:, int(cx), 0]) >= 0)  # no fold: rows keep their order


def test_blinks_close_the_eyes(synth_root: Path) -> None:
    for name in _names(synth_root):
        folder = synth_root / "videos" / name
        meta = json.loads((folder / "meta.json").read_text())
        blink = np.load(folder / "blink.npy")
        closed = blink[:, 0] < 0.12
        assert closed.any() and blink.max() > 0.25 and blink.min() < 0.1, "every clip >= 1 s has a blink"
        frames = read_video(folder / "video.mp4").astype(np.float32)
        eyes = np.concatenate([frames[:, y0:y1, x0:x1].reshape(len(frames), -1)
                               for x0, y0, x1, y1 in meta["eye_boxes"]], axis=1)
        lag = 4
        diff = np.abs(eyes[lag:] - eyes[:-lag]).mean(axis=1)
        across = closed[lag:] != closed[:-lag]
        both_open = (blink[lag:, 0] > 0.25) & (blink[:-lag, 0] > 0.25)
        assert across.any() and both_open.any()
        assert diff[across].mean() > 1.5 * diff[both_open].mean(), name


# ---------------------------------------------------------------- audio / video IO


def test_audio_helpers(tmp_path: Path) -> None:
    sr = 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    feats = logmel_features(tone, 25)
    assert feats.shape == (25, 80) and feats.dtype == np.float32
    quiet = logmel_features(np.zeros(sr, np.float32), 25)
    assert feats.max() > quiet.max() + 0.5 and quiet.max() == pytest.approx(-1.0)
    bank = mel_filterbank()
    assert bank.shape == (80, 257) and (bank.sum(1) > 0).all()
    loud = loudness_envelope(np.concatenate([np.zeros(sr // 2, np.float32), tone[: sr // 2]]), 25)
    assert loud[:12].max() == 0.0 and loud[13:].min() > 0.5
    # 44.1 kHz stereo in -> 16 kHz mono out.
    path = tmp_path / "stereo.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=44100:duration=1",
                    "-ac", "2", str(path)], check=True)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and abs(wave.size - sr) < 50
    (tmp_path / "text.mp4").write_text("not media")
    with pytest.raises(ValueError, match="text.mp4"):
        load_audio(tmp_path / "text.mp4")
    with pytest.raises(ValueError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="logmel"):
        AudioFeatureExtractor("mfcc")


def test_hubert_extractor_with_a_tiny_local_model(tmp_path: Path) -> None:
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    HubertModel(config).save_pretrained(tmp_path / "tiny-hubert")
    extractor = AudioFeatureExtractor(f"hubert:{tmp_path / 'tiny-hubert'}", chunk_seconds=1.0)
    assert extractor.dim == 16
    wave = np.random.default_rng(0).standard_normal(int(2.5 * 16000)).astype(np.float32) * 0.1
    feats = extractor(wave, 62)
    assert feats.shape == (62, 16) and feats.dtype == np.float32 and np.isfinite(feats).all()
    with pytest.raises(RuntimeError, match="missing-model.*logmel"):
        AudioFeatureExtractor(f"hubert:{tmp_path / 'missing-model'}")


def test_video_writer_streams_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    wave = np.zeros(int(1.3 * 16000), np.float32)  # longer than the video: must be kept
    with VideoWriter(path, 25, (48, 32), audio=wave) as writer:
        for i in range(3):
            writer.write(np.full((10, 32, 48, 3), 40 * i, np.uint8))
    frames = read_video(path)
    assert frames.shape == (30, 32, 48, 3) and frames.dtype == np.uint8
    assert abs(float(_probe_streams(path)["audio"]["duration"]) - 1.3) < 0.04
    broken = tmp_path / "broken.mp4"
    with pytest.raises(KeyError):
        with VideoWriter(broken, 25, 32) as writer:
            writer.write(np.zeros((2, 32, 32, 3), np.uint8))
            raise KeyError("boom")
    assert not broken.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    writer = VideoWriter(tmp_path / "x.mp4", 25, 32)
    with pytest.raises(ValueError, match="uint8"):
        writer.write(np.zeros((1, 32, 32, 3), np.float32))
    writer.abort()
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "y.mp4", 25, 33)
    (tmp_path / "fake.mp4").write_text("plain text")
    with pytest.raises(ValueError, match="cannot read video"):
        read_video(tmp_path / "fake.mp4")
