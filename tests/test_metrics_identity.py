"""CSIM with stand-in, TorchScript ArcFace-shaped and (if installed) dlib embedders."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from microscope_pl.metrics.common import MetricUnavailable
from microscope_pl.metrics.identity import ArcFaceEmbedder, build_identity_embedder, csim


class MeanColour:
    """Stand-in identity: the mean colour of the image (3-d)."""

    name = "mean colour"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += len(images)
        return images.reshape(len(images), -1, 3).mean(1).astype(np.float64)


def test_csim_stand_in() -> None:
    src = np.zeros((16, 16, 3), np.uint8)
    src[..., 0] = 200
    frames = np.repeat(src[None], 10, axis=0)
    emb = MeanColour()
    assert csim(src, frames, emb) == pytest.approx(1.0)
    assert emb.calls == 11
    other = frames.copy()
    other[..., 0], other[..., 2] = 0, 200  # orthogonal colour
    assert csim(src, other, emb) == pytest.approx(0.0, abs=1e-9)
    emb2 = MeanColour()
    assert csim(torch.from_numpy(src).permute(2, 0, 1), frames, emb2, stride=4) == pytest.approx(1.0)
    assert emb2.calls == 1 + 3
    with pytest.raises(ValueError, match="stride"):
        csim(src, frames, emb, stride=0)


def test_arcface_missing_gives_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MICROSCOPE_ARCFACE", raising=False)
    with pytest.raises(MetricUnavailable, match="MICROSCOPE_ARCFACE"):
        build_identity_embedder("arcface")
    with pytest.raises(MetricUnavailable, match="file not found"):
        build_identity_embedder(arcface_path=tmp_path / "arcface.onnx")
    with pytest.raises(ValueError, match="backend"):
        build_identity_embedder("vggface")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_arcface_torchscript_file(tmp_path) -> None:
    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # b 3 112 112 -> b 3
            assert x.shape[-2:] == (112, 112)
            return x.mean(dim=(2, 3)) + 2.0

    path = tmp_path / "arcface.pt"
    torch.jit.script(Tiny()).save(str(path))
    emb = ArcFaceEmbedder(path, crop_box=(0, 0, 8, 8))
    frames = np.full((3, 20, 20, 3), 128, np.uint8)
    assert emb(frames).shape == (3, 3)
    assert csim(frames[0], frames, emb) == pytest.approx(1.0)
    assert "arcface.pt" in emb.name


@pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None,
    reason="dlib / face_recognition_models not installed",
)
def test_dlib_backend_on_a_real_face() -> None:
    from skimage import data
    from skimage.transform import resize

    face = (resize(data.astronaut()[:256, 96:352], (128, 128)) * 255).astype(np.uint8)
    emb = build_identity_embedder("dlib")
    assert "dlib" in emb.name
    same = csim(face, face[None], emb)
    noise = np.random.default_rng(0).integers(0, 255, (1, 128, 128, 3), dtype=np.uint8)
    assert same == pytest.approx(1.0, abs=1e-6)
    assert csim(face, noise, emb) < same - 0.05
