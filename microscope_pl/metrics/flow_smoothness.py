"""Flow Smoothness (FS), the paper's jitter metric (Appendix A.3, eq. 11-13).

For an optical-flow field u(x, y) = (u, v) between two consecutive frames,

    grad u = [[du/dx, du/dy], [dv/dx, dv/dy]]                       (eq. 12)
    FS     = sqrt( 1/(H W) * sum_i ||grad u(x_i, y_i)||_F^2 )        (eq. 13)

i.e. the root mean square over pixels of the Frobenius norm of the flow's
spatial Jacobian. Jitter shows up as small spikes in the flow field, which
raise FS; since talking heads move naturally, the paper compares the FS of a
generated video with that of the ground truth: ``fs_error = |FS_gen - FS_gt|``.

Choices the paper leaves open, made here:

- Optical flow: OpenCV's Farneback (dense, weight-free, deterministic) on
  grayscale frames, with OpenCV's tutorial parameters. It is a fallback: the
  paper does not name its flow estimator, so absolute FS values are
  comparable between our runs, not with the paper's figure.
- Derivatives: second-order finite differences (central inside, second-order
  one-sided at the borders; ``torch.gradient(edge_order=2)``) with a spacing of
  one pixel, so FS is in pixels of displacement per pixel. They are exact for
  linear and quadratic flows, which the tests check.
- A video's FS is the mean of eq. 13 over its consecutive frame pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from microscope_pl.metrics.common import ArrayLike, to_video_tensor


@dataclass(frozen=True)
class FarnebackParams:
    """Parameters of ``cv2.calcOpticalFlowFarneback`` (OpenCV tutorial values)."""

    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2


# ---------------------------------------------------------------- eq. 12-13


def fs_per_field(flow: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Eq. 13 for each flow field.

    Args:
        flow: ``n 2 h w`` displacement fields in pixels (channel 0 = u
            horizontal, channel 1 = v vertical); h, w >= 3 for second-order
            border differences.

    Returns:
        ``n`` float64 tensor of FS values.
    """
    f = torch.as_tensor(flow, dtype=torch.float64)
    if f.ndim != 4 or f.shape[1] != 2:
        raise ValueError(f"flow must be n 2 h w, got {tuple(f.shape)}")
    if f.shape[-1] < 3 or f.shape[-2] < 3:
        raise ValueError(f"flow must be at least 3x3 for second-order differences, got {tuple(f.shape)}")
    # d/dy is along dim 2 (rows), d/dx along dim 3 (columns).
    d_dy, d_dx = torch.gradient(f, dim=(2, 3), edge_order=2)
    # ||grad u||_F^2 = (du/dx)^2 + (du/dy)^2 + (dv/dx)^2 + (dv/dy)^2: summing the
    # squares of both channels' x and y derivatives covers all four entries.
    frob2 = (d_dx**2 + d_dy**2).sum(dim=1)  # n h w
    return frob2.mean(dim=(1, 2)).sqrt()


def fs_of_flow(flow: torch.Tensor | np.ndarray) -> float:
    """Mean over fields of eq. 13; ``flow`` is ``n 2 h w`` (see :func:`fs_per_field`)."""
    return float(fs_per_field(flow).mean())


# ---------------------------------------------------------------- optical flow


def _gray_uint8(frames: ArrayLike) -> np.ndarray:
    """Any clip accepted by ``to_video_tensor`` -> ``n h w`` uint8 grayscale (BT.601 luma).

    Converted 64 frames at a time so a long uint8 video is never held as float.
    """
    out = []
    for i in range(0, len(frames), 64):
        x = to_video_tensor(frames[i : i + 64]).clamp(0, 1)
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        out.append((luma * 255.0 + 0.5).to(torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.uint8)


def farneback_flow(frames: ArrayLike, params: FarnebackParams | None = None) -> np.ndarray:
    """Dense optical flow between consecutive frames with OpenCV's Farneback.

    Args:
        frames: ``n 3 h w`` / ``n h w 3``, uint8 or float in [0, 1].
        params: Farneback parameters.

    Returns:
        ``(n-1) 2 h w`` float32, flow from frame t to frame t+1 in pixels.
    """
    import cv2  # lazy: only this metric needs OpenCV

    p = params or FarnebackParams()
    gray = _gray_uint8(frames)
    flows = []
    for a, b in zip(gray[:-1], gray[1:]):
        fl = cv2.calcOpticalFlowFarneback(
            a, b, None, p.pyr_scale, p.levels, p.winsize, p.iterations, p.poly_n, p.poly_sigma, 0
        )
        flows.append(fl.transpose(2, 0, 1))  # h w 2 -> 2 h w
    if not flows:
        raise ValueError(f"flow smoothness needs at least 2 frames, got {gray.shape[0]}")
    return np.stack(flows).astype(np.float32)


def flow_smoothness(frames: ArrayLike, params: FarnebackParams | None = None) -> float:
    """FS of a video: mean over consecutive pairs of eq. 13 on Farneback flow.

    Args:
        frames: ``n 3 h w`` / ``n h w 3`` clip (n >= 2), uint8 or float in [0, 1].
            Resize videos to a common size first (the paper uses 256): FS
            depends on resolution.
    """
    return fs_of_flow(farneback_flow(frames, params))


def fs_error(generated: ArrayLike, ground_truth: ArrayLike, params: FarnebackParams | None = None) -> float:
    """``|FS(generated) - FS(ground_truth)|`` (lower is better)."""
    return abs(flow_smoothness(generated, params) - flow_smoothness(ground_truth, params))
