"""Small parameter-free losses for the LMAE (stage 2) and PBNet.

Every function here is a plain callable with no ``nn.Parameter`` and no state,
so LightningModules can combine them with their own weights (paper eq. 9) and
tests can compare them with formulas written out by hand.

Shapes use einops letters: b batch, c channels, h/w height/width.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["kl_divergence", "dynamics_mse", "mouth_loss_weights", "mouth_crops"]


# --------------------------------------------------------------------------
# eq. 8: KL( q(z | [f; m]) || N(0, I) )
# --------------------------------------------------------------------------


def kl_divergence(
    mu: Tensor,
    logvar: Tensor,
    reduction: Literal["mean", "batchmean"] = "mean",
) -> Tensor:
    """KL divergence of the diagonal Gaussian ``N(mu, exp(logvar))`` to ``N(0, I)``.

    Per latent element: ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``, which is
    zero exactly at ``mu = 0, logvar = 0`` and positive elsewhere.

    Normalisation (the choice matters for the paper's ``lambda_KL = 1e-4``):

    - ``"mean"`` (default): the mean over **all** elements, batch included.
      The reconstruction terms of eq. 9 (MSE of eq. 6, VGG L1 of eq. 7) are
      means over elements too, so with this convention ``lambda_KL`` weighs
      the same "per element" quantity as the other two terms and does not
      change meaning when the resolution or the latent size changes. With it,
      ``1e-4`` is the light regulariser the paper describes (section 4.1): it
      only stops the posterior variance from collapsing.
    - ``"batchmean"``: the latent-diffusion (LDM) convention, the sum over
      latent elements divided by the batch size. It equals ``"mean"`` times
      the number of latent elements per sample (256 for 4 x 8 x 8), so the
      same ``lambda_KL`` regularises that many times more strongly; use it
      only together with summed reconstruction losses.

    Args:
        mu: posterior means, any shape ``b ...`` (e.g. ``b c h w`` or ``b d``).
        logvar: posterior log-variances, the same shape as ``mu``.
        reduction: ``"mean"`` or ``"batchmean"`` as described above.

    Returns:
        A scalar tensor.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu shape {tuple(mu.shape)} != logvar shape {tuple(logvar.shape)}")
    # Compute in float32: exp(logvar) overflows bf16/fp16 quickly.
    mu32, lv32 = mu.float(), logvar.float()
    per_element = 0.5 * (mu32.pow(2) + lv32.exp() - 1.0 - lv32)
    if reduction == "mean":
        return per_element.mean()
    if reduction == "batchmean":
        return per_element.sum() / mu.shape[0]
    raise ValueError(f"reduction must be 'mean' or 'batchmean', got {reduction!r}")


# --------------------------------------------------------------------------
# eq. 6: || D_LD(z) - [f; m] ||_2^2
# --------------------------------------------------------------------------


def dynamics_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between decoded and target dynamics (eq. 6).

    The paper writes a squared L2 norm; we take the mean over all elements
    (batch, the 3 channels and all positions) so the value does not depend on
    resolution or batch size and ``lambda_MSE = 1`` stays meaningful. Grid
    channels live in [-1, 1] and the occlusion channel in [0, 1], so they are
    compared in their own units, as in eq. 6.

    Args:
        pred: decoded dynamics ``b 3 h w``.
        target: dynamics from the frozen FDE ``b 3 h w``.

    Returns:
        A scalar tensor (float32).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).mean()


# --------------------------------------------------------------------------
# PSNR, a reporting metric for images in [0, 1]
# --------------------------------------------------------------------------


def mouth_loss_weights(boxes: torch.Tensor, image_size: int, latent_hw: tuple[int, int],
                       weight: float) -> torch.Tensor:
    """``b 1 1 h w`` loss weights: 1 + weight on the latent cells that the mouth box touches.

    Not in the paper: an option for data where the lips are a sliver of the
    motion, so that a plain loss gains little from the audio. ``boxes``: ``b 4``
    (x0, y0, x1, y1) in pixels; samples without one (-1s) weigh uniformly.
    """
    h, w = latent_hw
    cell = image_size / w
    tops = torch.arange(h, device=boxes.device) * cell  # cell i spans [i cell, (i + 1) cell)
    lefts = torch.arange(w, device=boxes.device) * cell
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    rows = (tops + cell > y0) & (tops < y1)  # b h: the cell overlaps the box
    cols = (lefts + cell > x0) & (lefts < x1)  # b w
    inside = rows[:, :, None] & cols[:, None, :] & (boxes >= 0).all(dim=1)[:, None, None]
    return (1.0 + weight * inside.float())[:, None, None]


def mouth_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """The mouth boxes of ``images`` resampled to ``size x size``: ``k 3 size size`` for the
    k samples that have a box (``boxes`` ``b 4`` (x0, y0, x1, y1) in pixels, -1s for none).

    Not in the paper: phases 1 and 2 report the PSNR of these crops (``mouth_psnr``), since
    the lips, a small share of the pixels, carry all of the audio's effect. Bilinear
    ``roi_align`` with an adaptive grid (a pixel-aligned box at its own size comes back exact).
    """
    keep = (boxes >= 0).all(dim=1)
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)
    rois = torch.cat([index[:, None], boxes], dim=1)[keep].to(images.device, torch.float32)
    return roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
