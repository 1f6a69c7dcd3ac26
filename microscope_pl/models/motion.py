"""Motion network of the FDE: regions, background affine and dense flow.

This is the part of stage 1 that produces the dynamics ``[f; m]`` of paper
eq. 5 (the MRAA motion model that LFDM and DAWN reuse). Everything runs at the motion resolution ``H * motion_scale``
(0.25 by default), on anti-aliased downscaled images. Shapes use einops
letters: b batch, k regions, h/w the motion resolution.

Coordinates are the normalised [-1, 1] ``align_corners=False`` coordinates of
``blocks.identity_grid`` (x then y); shifts, covariances and affines are all
expressed in them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvBlock, DownBlock, Hourglass, apply_affine, identity_grid, warp

__all__ = [
    "covariance_to_affine",
    "region_gaussians",
    "RegionPredictor",
    "BackgroundPredictor",
    "PixelwiseFlowPredictor",
    "lucas_kanade_affine",
    "compose_affines",
]

# Floor on covariance eigenvalues (normalised units^2): a region narrower than
# ~0.01 (half a pixel at 128 px, 32 px motion maps) would make A_dri^{-1} blow up.
_MIN_EIGENVALUE = 1e-4
# Relative regulariser of the principal-axis angle (see covariance_to_affine).
_ISOTROPY_EPS = 0.05
# Output gain of the dense residual flow head (PixelwiseFlowPredictor(refine=True)).
# Adam moves the output of a wide zero-initialised conv by about lr * fan-in
# per step, so an undamped head leaps to offsets of many pixels within a few
# steps; the gain brings its updates down to the scale of pixel corrections.
RESIDUAL_GAIN = 0.01
# Gauss-Newton steps of the global affine registration (lucas_kanade_affine).
# Talking-head camera and head motion is small, so a few steps from the
# identity converge.
LK_ITERATIONS = 8


# --------------------------------------------------------------------------
# region affines from the heatmap covariance (MRAA's PCA-based affine)
# --------------------------------------------------------------------------


def covariance_to_affine(covar: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form PCA of ``... 2 2`` covariances: ``A = U diag(sqrt(lambda))``.

    MRAA takes the SVD of each region's heatmap covariance and uses
    ``U sqrt(S)`` as the region's affine, so the relative transform
    ``A_src A_dri^{-1} = U_src sqrt(S_src / S_dri) U_dri^T`` is a rotation by
    the change of the principal-axis angle times a per-axis scaling. Instead
    of ``torch.svd`` (whose backward divides by ``lambda_1 - lambda_2`` and
    turns NaN for round regions, and whose eigenvector signs are arbitrary)
    the 2 x 2 symmetric case is solved in closed form with the sign chosen
    smoothly: ``U`` is always a proper rotation by an angle ``theta`` taken
    from the half-angle vector ``(r - y, x)`` where ``x = a - c``,
    ``y = 2 b`` (``[[a, b], [b, c]]`` the covariance) and
    ``r = sqrt(x^2 + y^2 + (eps * trace)^2)``. Its first component is always
    positive, so ``theta`` is a continuous function of the covariance; for
    round regions (``x, y -> 0``) every region tends to the same angle,
    -45 degrees, so the relative rotation between two round regions is the
    identity instead of noise. The price is a fast (but continuous) 180
    degree turn for elongated regions oriented near +45 degrees.

    Args:
        covar: ``... 2 2`` symmetric positive semi-definite matrices.

    Returns:
        ``(u, sqrt_eig)``: rotations ``... 2 2`` (columns are the principal
        axes, major first) and ``... 2`` square roots of the eigenvalues,
        floored at ``sqrt(_MIN_EIGENVALUE)``. The affine is
        ``u * sqrt_eig[..., None, :]``.
    """
    a = covar[..., 0, 0]
    c = covar[..., 1, 1]
    b = 0.5 * (covar[..., 0, 1] + covar[..., 1, 0])
    x, y = a - c, 2.0 * b
    trace = a + c
    r0 = torch.sqrt(x * x + y * y + 1e-12)
    lam1 = (0.5 * (trace + r0)).clamp_min(_MIN_EIGENVALUE)
    lam2 = (0.5 * (trace - r0)).clamp_min(_MIN_EIGENVALUE)
    # phi = 2 theta + 90 deg has (cos, sin) ~ (-y, x); its half angle has
    # (cos, sin) ~ (1 + cos phi, sin phi) ~ (r - y, x).
    reg = _ISOTROPY_EPS * trace.abs() + 1e-6
    r = torch.sqrt(x * x + y * y + reg * reg)
    vx, vy = r - y, x
    norm = torch.sqrt(vx * vx + vy * vy + 1e-12)
    ch, sh = vx / norm, vy / norm  # cos / sin of theta + 45 deg
    s = math.sqrt(0.5)
    cos_t, sin_t = s * (ch + sh), s * (sh - ch)  # rotate back by -45 deg
    u = torch.stack([torch.stack([cos_t, -sin_t], -1), torch.stack([sin_t, cos_t], -1)], -2)
    return u, torch.stack([lam1.sqrt(), lam2.sqrt()], -1)


def region_gaussians(shift: Tensor, covar: Tensor, h: int, w: int) -> Tensor:
    """Gaussian heatmaps ``exp(-0.5 (z - mu)^T Sigma^-1 (z - mu))``: ``b k h w``.

    Args:
        shift: region centres ``b k 2``.
        covar: region covariances ``b k 2 2`` (floored by ``_MIN_EIGENVALUE``).
    """
    z = identity_grid(h, w, shift.device, shift.dtype)[0]  # 2 h w
    d = z[None, None] - shift[..., None, None]  # b k 2 h w
    a = covar[..., 0, 0] + _MIN_EIGENVALUE
    c = covar[..., 1, 1] + _MIN_EIGENVALUE
    b = 0.5 * (covar[..., 0, 1] + covar[..., 1, 0])
    det = (a * c - b * b).clamp_min(_MIN_EIGENVALUE ** 2)
    dx, dy = d[:, :, 0], d[:, :, 1]
    q = (c[..., None, None] * dx * dx - 2 * b[..., None, None] * dx * dy
         + a[..., None, None] * dy * dy) / det[..., None, None]
    return torch.exp(-0.5 * q)


# --------------------------------------------------------------------------
# region predictor
# --------------------------------------------------------------------------


class RegionPredictor(nn.Module):
    """Soft region heatmaps and their shift / covariance / affine.

    Hourglass over the (already downscaled) image, a 7 x 7 conv to
    ``num_regions`` logits, a spatial softmax at ``temperature`` (0.1 in
    MRAA: sharp but differentiable regions). Shift = heatmap-weighted mean
    coordinate; covariance = heatmap-weighted second moment around it;
    affine = PCA of the covariance (``covariance_to_affine``) - the
    covariance variant of MRAA, not a predicted jacobian.
    """

    def __init__(self, in_channels: int, num_regions: int, temperature: float,
                 block_expansion: int, max_features: int, num_blocks: int,
                 norm: str = "group") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"region_temperature must be > 0, got {temperature}")
        self.hourglass = Hourglass(in_channels, block_expansion, max_features, num_blocks, norm)
        self.head = nn.Conv2d(self.hourglass.out_channels, num_regions, 7, padding=3)
        self.temperature = temperature

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x: b c h w`` -> heatmaps ``b k h w``, shift ``b k 2``,
        covar ``b k 2 2``, u ``b k 2 2``, sqrt_eig ``b k 2``, affine ``b k 2 2``."""
        logits = self.head(self.hourglass(x))
        b, k, h, w = logits.shape
        # region statistics in float32 even under autocast: shifts are
        # coordinates, and covariances of ~1e-3 lose their meaning in bf16
        with torch.autocast(device_type=x.device.type, enabled=False):
            heat = F.softmax(logits.float().flatten(2) / self.temperature, dim=-1).view(b, k, h, w)
            z = identity_grid(h, w, x.device, torch.float32)[0]  # 2 h w
            shift = torch.einsum("bkhw,chw->bkc", heat, z)
            d = z[None, None] - shift[..., None, None]  # b k 2 h w
            covar = torch.einsum("bkhw,bkihw,bkjhw->bkij", heat, d, d)
            u, sqrt_eig = covariance_to_affine(covar)
        return {"heatmaps": heat, "shift": shift, "covar": covar, "u": u,
                "sqrt_eig": sqrt_eig, "affine": u * sqrt_eig[..., None, :]}


# --------------------------------------------------------------------------
# background affine predictor
# --------------------------------------------------------------------------


class BackgroundPredictor(nn.Module):
    """Global affine ``b 2 3`` mapping driving coordinates to source ones.

    Small encoder on ``concat(src, dri)``, global average pooling, a linear
    layer initialised to output the identity so training starts from "the
    camera did not move".
    """

    def __init__(self, in_channels: int, block_expansion: int, max_features: int,
                 num_blocks: int, norm: str = "group") -> None:
        super().__init__()
        chans = [min(max_features, block_expansion * 2 ** i) for i in range(num_blocks + 1)]
        self.first = ConvBlock(2 * in_channels, chans[0], 7, norm)
        self.down = nn.Sequential(*(DownBlock(chans[i], chans[i + 1], norm)
                                    for i in range(num_blocks)))
        self.fc = nn.Linear(chans[-1], 6)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, src: Tensor, dri: Tensor) -> Tensor:
        """``src, dri: b c h w`` -> ``b 2 3`` (``z_src = M[:, :2] z_dri + M[:, 2]``)."""
        h = self.down(self.first(torch.cat([src, dri], dim=1)))
        return self.fc(h.mean(dim=(2, 3))).view(-1, 2, 3)


# --------------------------------------------------------------------------
# classical global alignment (optional prior for the background affine)
# --------------------------------------------------------------------------


def compose_affines(outer: Tensor, inner: Tensor) -> Tensor:
    """``b 2 3`` affine of ``z -> outer(inner(z))``."""
    return torch.cat([outer[:, :, :2] @ inner[:, :, :2],
                      (outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:])], dim=2)


@torch.no_grad()
def lucas_kanade_affine(src: Tensor, dri: Tensor, iterations: int = LK_ITERATIONS) -> Tensor:
    """Global affine ``b 2 3`` (driving -> source coordinates) by Gauss-Newton.

    Forward-additive Lucas-Kanade on the photometric error
    ``sum (src(M z) - dri(z))^2`` over all channels, from the identity, with
    Levenberg damping. Not differentiable (no gradient flows through it); a
    sample whose registered residual is not below the identity's keeps the
    identity, so a flat or unrelated pair cannot get a wild affine.
    """
    with torch.autocast(device_type=src.device.type, enabled=False):
        src, dri = src.float(), dri.float()
        b, _, h, w = src.shape
        eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=src.device)
        affine = eye.expand(b, 2, 3).clone()
        z = identity_grid(h, w, src.device, torch.float32)[0]
        if h < 3 or w < 3:
            return affine
        xs, ys = z[0, 1:-1, 1:-1], z[1, 1:-1, 1:-1]
        damping = torch.eye(6, device=src.device)

        def warped(m: Tensor) -> Tensor:
            return warp(src, apply_affine(m, z))

        def error(m: Tensor) -> Tensor:
            return (warped(m) - dri).square().flatten(1).mean(1)

        for _ in range(iterations):
            moved = warped(affine)
            # central differences in normalised units (a pixel is 2/w wide)
            gx = (moved[..., 1:-1, 2:] - moved[..., 1:-1, :-2]) * (w / 4)
            gy = (moved[..., 2:, 1:-1] - moved[..., :-2, 1:-1]) * (h / 4)
            r = (moved - dri)[..., 1:-1, 1:-1]
            jac = torch.stack([gx * xs, gx * ys, gx, gy * xs, gy * ys, gy], dim=-1)  # b c h w 6
            hess = torch.einsum("bchwi,bchwj->bij", jac, jac)
            grad = torch.einsum("bchwi,bchw->bi", jac, r)
            lam = 1e-3 * hess.diagonal(dim1=1, dim2=2).mean(1) + 1e-8
            step = torch.linalg.solve(hess + lam[:, None, None] * damping, -grad[..., None])[..., 0]
            affine = affine + torch.nan_to_num(step).view(b, 2, 3)

        better = error(affine) < (src - dri).square().flatten(1).mean(1)
        return torch.where(better[:, None, None], affine, eye.expand(b, 2, 3))


# --------------------------------------------------------------------------
# pixelwise flow predictor: sparse motions -> dense flow f and occlusion m
# --------------------------------------------------------------------------


class PixelwiseFlowPredictor(nn.Module):
    """Combine ``k + 1`` sparse motions into a dense flow and an occlusion map.

    Sparse motion of region ``i`` (for every driving-frame coordinate z):
    ``mu_src + A_src A_dri^{-1} (z - mu_dri)``; motion ``k`` (the last) is the
    background affine (or the identity). The source is warped with every
    sparse motion; these ``k + 1`` deformed sources and the Gaussian heatmap
    differences (driving minus source, zero for the background) go through an
    hourglass; a 7 x 7 conv + softmax over ``k + 1`` gives per-pixel weights of
    the sparse motions, another 7 x 7 conv + sigmoid the occlusion map.

    The mask starts biased towards the background motion (the identity at
    initialisation), so training starts from "nothing moved" rather than from
    an average of random region motions, which collapses onto one region.

    ``refine`` (not in MRAA) also feeds the driving image to the hourglass and
    adds a dense residual flow (a zero-initialised 7 x 7 conv) to the mixture
    of sparse motions. The sparse motions give the large displacements; the
    residual corrects what ``k`` affine regions cannot express and learns
    sooner, because its gradient comes straight from the photometric error.
    MICROSCOPE never drives one identity with another's regions, so seeing
    the driving frame costs nothing at inference.
    """

    def __init__(self, in_channels: int, num_regions: int, block_expansion: int,
                 max_features: int, num_blocks: int, norm: str = "group",
                 refine: bool = False) -> None:
        super().__init__()
        k1 = num_regions + 1
        self.refine = refine
        self.hourglass = Hourglass(k1 * (in_channels + 1) + (in_channels if refine else 0),
                                   block_expansion, max_features, num_blocks, norm)
        self.mask = nn.Conv2d(self.hourglass.out_channels, k1, 7, padding=3)
        self.occlusion = nn.Conv2d(self.hourglass.out_channels, 1, 7, padding=3)
        with torch.no_grad():  # background first: weight ~0.9 on the identity at start
            self.mask.bias[-1] += math.log(num_regions) + 2.0
        self.residual = nn.Conv2d(self.hourglass.out_channels, 2, 7, padding=3) if refine else None
        if self.residual is not None:
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)

    @staticmethod
    def sparse_motions(src: dict[str, Tensor], dri: dict[str, Tensor], bg: Tensor | None,
                       h: int, w: int) -> Tensor:
        """Sparse sampling grids ``b (k+1) 2 h w`` (regions first, background last)."""
        z = identity_grid(h, w, bg.device if bg is not None else src["shift"].device,
                          src["shift"].dtype)[0]  # 2 h w
        # A_src A_dri^{-1} = U_src diag(s_src / s_dri) U_dri^T  (no explicit inverse)
        rel = (src["u"] * (src["sqrt_eig"] / dri["sqrt_eig"])[..., None, :]) \
            @ dri["u"].transpose(-1, -2)  # b k 2 2
        d = z[None, None] - dri["shift"][..., None, None]  # b k 2 h w
        regions = torch.einsum("bkij,bkjhw->bkihw", rel, d) + src["shift"][..., None, None]
        b = regions.shape[0]
        if bg is None:
            background = z.expand(b, 2, h, w)
        else:
            background = apply_affine(bg, z)
        return torch.cat([regions, background[:, None]], dim=1)

    def forward(self, src_image: Tensor, src: dict[str, Tensor], dri: dict[str, Tensor],
                bg: Tensor | None, dri_image: Tensor | None = None) -> dict[str, Tensor]:
        """``src_image: b c h w`` at the motion resolution, region dicts from
        ``RegionPredictor`` for source and driving, ``bg: b 2 3`` or None,
        ``dri_image: b c h w`` (needed only with ``refine``).

        Returns flow ``b 2 h w`` (absolute grid, not clamped), occlusion
        ``b 1 h w``, mask ``b (k+1) h w``, sparse ``b (k+1) 2 h w``.
        """
        if self.refine and dri_image is None:
            raise ValueError("refine=True needs the driving image")
        b, c, h, w = src_image.shape
        # coordinates stay float32 under autocast (see RegionPredictor)
        with torch.autocast(device_type=src_image.device.type, enabled=False):
            bg = bg.float() if bg is not None else None
            sparse = self.sparse_motions(src, dri, bg, h, w)
            heat = region_gaussians(dri["shift"], dri["covar"], h, w) \
                - region_gaussians(src["shift"], src["covar"], h, w)
        k1 = sparse.shape[1]
        deformed = warp(src_image.repeat_interleave(k1, dim=0), sparse.flatten(0, 1))
        heat = torch.cat([heat, heat.new_zeros(b, 1, h, w)], dim=1)  # background: no heatmap
        inp = torch.cat([heat[:, :, None], deformed.view(b, k1, c, h, w)], dim=2).flatten(1, 2)
        if self.refine:
            inp = torch.cat([inp, dri_image], dim=1)
        feat = self.hourglass(inp)
        mask_logits, occ_logits = self.mask(feat), self.occlusion(feat)
        with torch.autocast(device_type=feat.device.type, enabled=False):
            mask = F.softmax(mask_logits.float(), dim=1)
            flow = torch.einsum("bkhw,bkchw->bchw", mask, sparse)
            if self.residual is not None:  # damped: Adam moves a wide conv's output by ~lr * fan-in per step
                flow = flow + RESIDUAL_GAIN * self.residual(feat).float()
            occlusion = torch.sigmoid(occ_logits.float())
        return {"flow": flow, "occlusion": occlusion, "mask": mask, "sparse": sparse}


@torch.no_grad()
def register_source(src: Tensor, dri: Tensor, size: int = 32) -> Tensor:
    """The parameter-free baseline for phase 1: ``src`` warped onto ``dri`` (``b 3 H W``) by one
    global Lucas-Kanade affine found at ``size`` px, i.e. what one affine can explain."""
    from .blocks import antialias_resize

    affine = lucas_kanade_affine(antialias_resize(src, (size, size)), antialias_resize(dri, (size, size)))
    h, w = src.shape[-2:]
    return warp(src, apply_affine(affine, identity_grid(h, w, src.device, src.dtype)[0]))
