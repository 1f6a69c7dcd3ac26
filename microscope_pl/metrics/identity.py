"""CSIM: identity preservation as cosine similarity of face-identity embeddings.

``CSIM = mean_t cos(e(source), e(frame_t))`` between the source portrait and
the generated frames (higher is better). Published tables usually use an
ArcFace network; two offline back-ends are offered and the report names which
one produced the number (they are not interchangeable):

- "dlib": dlib's ResNet face-recognition model (128-d, the network behind the
  ``face_recognition`` package) with the weights the ``face_recognition_models``
  package ships, the HOG face detector and 5-point landmarks for alignment
  (the pairing dlib's own face-recognition example uses; the 68-point model
  is 10x larger to load for the same aligned chip).
  Needs ``dlib`` (or ``dlib-bin``) and ``face_recognition_models``.
- "arcface": an ArcFace network from a local file (argument or
  $MICROSCOPE_ARCFACE): ``.onnx`` (needs onnxruntime) or a TorchScript file,
  taking ``b 3 112 112`` RGB normalised as ``(x - 127.5) / 127.5``. We have
  no landmark aligner for it: the face box (``crop_box`` or the full frame) is
  resized to 112, so it suits tightly cropped talking-head frames only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from microscope_pl.metrics.common import ArrayLike, MetricUnavailable, load_torchscript, require_file, to_video_tensor

ARCFACE_ENV = "MICROSCOPE_ARCFACE"


class IdentityEmbedder(Protocol):
    """Maps ``n h w 3`` uint8 RGB faces to ``n d`` identity embeddings."""

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _uint8_hwc(x: ArrayLike) -> np.ndarray:
    """Any clip/image accepted by ``to_video_tensor`` -> ``n h w 3`` uint8 RGB."""
    t = to_video_tensor(x).clamp(0, 1)
    return (t.permute(0, 2, 3, 1) * 255.0 + 0.5).to(torch.uint8).numpy()


# ---------------------------------------------------------------- dlib back-end


def face_recognition_models_dir() -> Path:
    """The ``models/`` folder of the installed face_recognition_models package.

    Found with importlib without importing the package: its ``__init__`` needs
    pkg_resources, which recent setuptools no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise MetricUnavailable("CSIM (dlib): face_recognition_models is not installed (it ships the dlib weights)")
    return Path(spec.origin).parent / "models"


class DlibFaceEmbedder:
    """dlib ResNet face descriptors (128-d) with HOG detection and 5-point alignment.

    Args:
        upsample: times the HOG detector upsamples the image (finds smaller faces).
        jitters: descriptor re-samplings averaged by dlib (1 = none).

    Frames where no face is found use the full frame as the face box (the
    talking-head frames are face crops); ``misses`` counts them.
    """

    name = "dlib-resnet (face_recognition_models)"

    def __init__(self, upsample: int = 1, jitters: int = 1) -> None:
        try:
            import dlib
        except ImportError as e:
            raise MetricUnavailable(f"CSIM (dlib): dlib is not installed ({e}); pip install dlib-bin") from e
        d = face_recognition_models_dir()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(
            str(require_file(d / "shape_predictor_5_face_landmarks.dat", "CSIM (dlib): landmark model"))
        )
        self.encoder = dlib.face_recognition_model_v1(
            str(require_file(d / "dlib_face_recognition_resnet_model_v1.dat", "CSIM (dlib): ResNet model"))
        )
        self.upsample = upsample
        self.jitters = jitters
        self.misses = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``n h w 3`` uint8 RGB -> ``n 128`` float64."""
        out = []
        for img in images:
            img = np.ascontiguousarray(img)
            faces = self.detector(img, self.upsample)
            if len(faces) == 0:
                self.misses += 1
                rect = self._dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
            else:
                rect = max(faces, key=lambda r: r.width() * r.height())  # the speaker, not a background face
            shape = self.shape(img, rect)
            out.append(np.asarray(self.encoder.compute_face_descriptor(img, shape, self.jitters)))
        return np.stack(out)


# ---------------------------------------------------------------- ArcFace back-end


class ArcFaceEmbedder:
    """ArcFace embeddings from a local ``.onnx`` or TorchScript file.

    Args:
        path: model file; default $MICROSCOPE_ARCFACE.
        crop_box: ``(x0, y0, x1, y1)`` face box in pixels applied to every image; None = full frame.
        device: torch device for TorchScript models.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        crop_box: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        hint = f"pass a path or set ${ARCFACE_ENV} to an ArcFace .onnx or TorchScript file"
        self.path = require_file(path if path is not None else os.environ.get(ARCFACE_ENV), "CSIM: ArcFace", hint)
        self.crop_box = crop_box
        self.device = torch.device(device)
        self.name = f"arcface ({self.path.name})"
        if self.path.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError as e:
                raise MetricUnavailable(f"CSIM: {self.path} is ONNX but onnxruntime is not installed") from e
            self._session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self._net = None
        else:
            self._session = None
            self._net = load_torchscript(self.path, self.device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``n h w 3`` uint8 RGB -> ``n d`` float64."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if self.crop_box is not None:
            x0, y0, x1, y1 = (int(c) for c in self.crop_box)
            x = x[:, :, y0:y1, x0:x1]
        x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 127.5) / 127.5
        if self._session is not None:
            name = self._session.get_inputs()[0].name
            y = self._session.run(None, {name: x.numpy().astype(np.float32)})[0]
            return np.asarray(y, dtype=np.float64)
        assert self._net is not None
        return self._net(x.to(self.device)).double().cpu().numpy()


def build_identity_embedder(
    backend: str = "auto", arcface_path: str | os.PathLike | None = None, **kwargs: object
) -> IdentityEmbedder:
    """Pick an identity back-end.

    Args:
        backend: "auto" (ArcFace if a file is given or $MICROSCOPE_ARCFACE is
            set, else dlib), "arcface" or "dlib".
        arcface_path: ArcFace model file.

    Raises:
        MetricUnavailable: naming what is missing for the chosen back-end.
    """
    if backend == "auto":
        backend = "arcface" if (arcface_path is not None or os.environ.get(ARCFACE_ENV)) else "dlib"
    if backend == "arcface":
        return ArcFaceEmbedder(arcface_path, **kwargs)  # type: ignore[arg-type]
    if backend == "dlib":
        return DlibFaceEmbedder(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"backend must be 'auto', 'arcface' or 'dlib', got {backend!r}")


# ---------------------------------------------------------------- CSIM


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def csim(source: ArrayLike, frames: ArrayLike, embedder: IdentityEmbedder, stride: int = 1) -> float:
    """Mean cosine similarity between the source identity and the frames' identities.

    Args:
        source: the source portrait ``3 h w`` / ``h w 3`` (uint8 or float [0, 1]).
        frames: generated clip ``n 3 h w`` / ``n h w 3``.
        embedder: an identity back-end (see :func:`build_identity_embedder`).
        stride: use every ``stride``-th frame (identity changes slowly; dlib
            costs ~0.1 s a frame on CPU).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    src = _unit(embedder(_uint8_hwc(source))[:1])
    emb = _unit(embedder(_uint8_hwc(frames[::stride])))  # stride first: no full-clip float copy
    return float((emb @ src.T).mean())
