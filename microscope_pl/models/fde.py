"""FDE: the flow-aware dynamics extractor (stage 1 of MDCF, paper eq. 5).

``frame = D( A(E(x_src), f) * m )`` where ``[f; m] = dynamics(x_src, x_dri)``
is a ``b 3 H/d W/d`` map: an absolute sampling grid f (x, y in [-1, 1], for
``F.grid_sample(align_corners=False)``) and an occlusion map m in [0, 1].
The motion network (regions + background + pixelwise flow, see
``motion.py``) follows MRAA/LFDM/DAWN; the generator is the LFDM one with
warped, occlusion-blended skip connections. Shapes use einops letters:
b batch, k regions, H/W the image size, h/w = H/d, W/d.

Phase 2 (LMAE) and inference call ``encode`` once per source and
``decode(features, dynamics)`` with dynamics the FDE did not produce, possibly
for a chunk of k frames against one source (features of batch 1 broadcast).

Choices where MRAA/LFDM leave room (all documented where implemented):
- region affines come from the heatmap covariance (PCA, closed form 2 x 2,
  ``motion.covariance_to_affine``), not from a predicted jacobian;
- the background affine is predicted from the motion-resolution images and
  is an independent (k+1)-th sparse motion, not composed with the regions;
- warps use bilinear ``grid_sample`` with border padding and
  ``align_corners=False``; f is clamped to [-1, 1] (lossless with border
  padding), m is a sigmoid;
- skip features are blended as ``m * A(skip, f) + (1 - m) * up``;
- coordinates (shifts, covariances, sparse motions, f) are computed in
  float32 even under autocast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .blocks import (ConvBlock, DownBlock, ReLUResBlock, UpBlock, antialias_resize, identity_grid,
                     resize_grid, resize_map, warp)
from .motion import (BackgroundPredictor, PixelwiseFlowPredictor, RegionPredictor, compose_affines,
                     lucas_kanade_affine)

__all__ = ["FDE", "identity_grid", "warp", "resize_grid", "resize_map"]

# registration_init: +2 on the background logit (its weight ~0.9 -> ~0.98 with 10 regions),
# occlusion logit 2 (m = sigmoid(2) ~ 0.88: visible pixels mostly copied from the source)
REGISTRATION_BACKGROUND_LOGIT, REGISTRATION_OCCLUSION_LOGIT = 2.0, 2.0


class FDE(nn.Module):
    """Flow-aware dynamics extractor: motion network + warping generator.

    Args:
        image_channels: channels of the input images (3).
        downsample: spatial factor d of the dynamics and of the generator
            bottleneck, a power of two (4 in the paper, 8 for the d/8 ablation).
        block_expansion: generator width after the first 7 x 7 conv (64).
        max_features: cap on generator channels (256).
        num_regions: number of soft regions K (10).
        region_temperature: softmax temperature of the region heatmaps (0.1).
        motion_block_expansion: width of the motion hourglasses (32).
        motion_max_features: cap on motion hourglass channels (1024).
        motion_num_blocks: depth of the motion hourglasses (5); the motion
            input (``H * motion_scale``) must be at least ``2**depth`` pixels.
        motion_scale: the motion network runs on images downscaled (with
            anti-aliasing) by this factor (0.25). Its flow is resized to
            ``H/d`` when ``motion_scale != 1/d`` (e.g. d = 8 at 0.25).
        num_res_blocks: residual blocks at the generator bottleneck (6).
        norm: ``"group"`` (GroupNorm, default: batch-size independent and
            DDP-safe) or ``"batch"`` (the baseline's BatchNorm).
        estimate_background: predict a global background affine as the
            (k+1)-th sparse motion; if False that motion is the identity.
        source_skip: also blend the warped source *image* into the output,
            ``m * A(x_src, f) + (1 - m) * D(...)`` at full resolution, so
            visible pixels are copied from the source instead of being
            rebuilt from features, which a briefly trained decoder cannot yet
            do. Not in the paper's eq. 5 (off by default).
        flow_refinement: the pixelwise flow predictor also sees the driving
            image and adds a dense residual flow to the region mixture, which
            corrects what ``K`` affine regions cannot express (see
            ``PixelwiseFlowPredictor``). Not in MRAA (off by default).
        global_alignment: start the background affine from a classical
            Lucas-Kanade registration of the motion-resolution images
            (``motion.lucas_kanade_affine``, no parameters, no gradient); the
            background predictor then learns a correction composed onto it.
            A CNN regressing global motion from scratch needs long training;
            the registration gives it from the first step. Not in MRAA (off
            by default).
        registration_init: (needs ``global_alignment``) initialise the mask
            head so the background motion takes ~0.98 of the mixture and the
            occlusion head so visible pixels are copied (m ~ 0.88): the
            untrained FDE then renders the registration, and training starts
            at its PSNR instead of below it. Not in MRAA (off by default).
    """

    def __init__(self, image_channels: int = 3, downsample: int = 4, block_expansion: int = 64,
                 max_features: int = 256, num_regions: int = 10, region_temperature: float = 0.1,
                 motion_block_expansion: int = 32, motion_max_features: int = 1024,
                 motion_num_blocks: int = 5, motion_scale: float = 0.25, num_res_blocks: int = 6,
                 norm: str = "group", estimate_background: bool = True, source_skip: bool = False,
                 flow_refinement: bool = False, global_alignment: bool = False,
                 registration_init: bool = False) -> None:
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        if not 0 < motion_scale <= 1:
            raise ValueError(f"motion_scale must be in (0, 1], got {motion_scale}")
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}")
        if registration_init and not global_alignment:
            raise ValueError("registration_init needs global_alignment (it starts from that registration)")
        self._downsample = downsample
        self.motion_scale = motion_scale
        self.num_regions = num_regions
        self.image_channels = image_channels

        # ---- motion network: [f; m] = dynamics(x_src, x_dri) ----
        self.region_predictor = RegionPredictor(
            image_channels, num_regions, region_temperature, motion_block_expansion,
            motion_max_features, motion_num_blocks, norm)
        self.bg_predictor = (BackgroundPredictor(image_channels, motion_block_expansion,
                                                 motion_max_features, motion_num_blocks, norm)
                             if estimate_background else None)
        self.flow_predictor = PixelwiseFlowPredictor(
            image_channels, num_regions, motion_block_expansion, motion_max_features,
            motion_num_blocks, norm, refine=flow_refinement)
        if registration_init:
            with torch.no_grad():
                self.flow_predictor.mask.bias[-1] += REGISTRATION_BACKGROUND_LOGIT
                self.flow_predictor.occlusion.bias.fill_(REGISTRATION_OCCLUSION_LOGIT)

        # ---- generator: encoder E, decoder D ----
        levels = int(math.log2(downsample))
        chans = [min(max_features, block_expansion * 2 ** i) for i in range(levels + 1)]
        self.first = ConvBlock(image_channels, chans[0], 7, norm)
        self.down_blocks = nn.ModuleList(DownBlock(chans[i], chans[i + 1], norm)
                                         for i in range(levels))
        self.res_blocks = nn.Sequential(*(ReLUResBlock(chans[-1], norm) for _ in range(num_res_blocks)))
        self.up_blocks = nn.ModuleList(UpBlock(chans[i + 1], chans[i], norm)
                                       for i in reversed(range(levels)))
        self.final = nn.Conv2d(chans[0], image_channels, 7, padding=3)
        self.feature_channels = chans
        self.source_skip = source_skip
        self.global_alignment = global_alignment

    @property
    def downsample(self) -> int:
        """Spatial factor d between the image and the dynamics ``[f; m]``."""
        return self._downsample

    # ----------------------------------------------------------------------
    # motion network: [f; m] (the input of eq. 5 and the LMAE target, eq. 6)
    # ----------------------------------------------------------------------

    def _motion_size(self, h: int, w: int) -> tuple[int, int]:
        return max(1, round(h * self.motion_scale)), max(1, round(w * self.motion_scale))

    def regions(self, image: Tensor) -> dict[str, Tensor]:
        """Region parameters of ``image: b c H W`` (heatmaps ``b k h' w'`` at
        the motion resolution, shift ``b k 2``, covar/u/affine ``b k 2 2``).
        Used by the optional equivariance loss."""
        return self.region_predictor(antialias_resize(image, self._motion_size(*image.shape[-2:])))

    def motion(self, src: Tensor, dri: Tensor) -> dict[str, Tensor]:
        """All motion outputs for ``src, dri: b c H W`` (see ``forward``)."""
        if src.shape != dri.shape:
            raise ValueError(f"source shape {tuple(src.shape)} != driving shape {tuple(dri.shape)}")
        b, _, hh, ww = src.shape
        if hh % self._downsample or ww % self._downsample:
            raise ValueError(f"image size {hh}x{ww} is not divisible by downsample={self._downsample}")
        size = self._motion_size(hh, ww)
        small = antialias_resize(torch.cat([src, dri]), size)
        # one region-predictor pass for source and driving together
        reg = self.region_predictor(small)
        reg_src = {key: v[:b] for key, v in reg.items()}
        reg_dri = {key: v[b:] for key, v in reg.items()}
        bg = self.bg_predictor(small[:b], small[b:]) if self.bg_predictor is not None else None
        if self.global_alignment:  # the learned affine corrects the registration: z -> lk(bg(z))
            lk = lucas_kanade_affine(small[:b], small[b:])
            bg = lk if bg is None else compose_affines(lk, bg.float())
        out = self.flow_predictor(small[:b], reg_src, reg_dri, bg, small[b:])
        target = (hh // self._downsample, ww // self._downsample)
        # clamp: with border padding, coordinates beyond [-1, 1] sample the same
        # edge pixels, so clamping is lossless and gives the interface's range
        flow = resize_grid(out["flow"], target).clamp(-1.0, 1.0)
        occlusion = resize_map(out["occlusion"], target).clamp(0.0, 1.0)
        return {
            "dynamics": torch.cat([flow, occlusion], dim=1),
            "heatmaps": reg_dri["heatmaps"], "heatmaps_source": reg_src["heatmaps"],
            "shift": reg_dri["shift"], "shift_source": reg_src["shift"],
            "affine": reg_dri["affine"], "affine_source": reg_src["affine"],
            "bg_affine": bg if bg is not None else _identity_affine(b, src),
            "mask": out["mask"], "sparse": out["sparse"],
        }

    def dynamics(self, src: Tensor, dri: Tensor) -> Tensor:
        """``[f; m]`` for ``src, dri: b c H W``: ``b 3 H/d W/d`` (grid x, y; occlusion)."""
        return self.motion(src, dri)["dynamics"]

    # ----------------------------------------------------------------------
    # generator: E(x_src), then D(A(E(x_src), f) * m)  (eq. 5)
    # ----------------------------------------------------------------------

    def encode(self, src: Tensor) -> list[Tensor]:
        """Source features ``[b c0 H W, b c1 H/2 W/2, ..., b cL H/d W/d]``.

        The list holds the skip feature of every level and, last, the
        bottleneck at ``H/d``; it is what ``decode`` expects and what the
        inference loop caches once per source image. With ``source_skip`` the
        source image itself comes first.
        """
        feats = [self.first(src)]
        for block in self.down_blocks:
            feats.append(block(feats[-1]))
        return [src, *feats] if self.source_skip else feats

    def decode(self, features: list[Tensor], dynamics: Tensor) -> Tensor:
        """Render ``b 3 H W`` in [0, 1] from source features and ``[f; m]``.

        ``dynamics: k 3 h w`` need not come from this FDE (LMAE output in
        phase 2 and at inference) nor be at ``H/d`` (it is resized). The grid
        warps the bottleneck, which is then multiplied by m (eq. 5); after the
        residual blocks, each up block's output is blended with the warped
        skip feature of its level: ``m * A(skip, f) + (1 - m) * up``, so
        visible regions copy source detail and occluded ones are inpainted.

        Broadcasting: if every feature has batch 1 and ``dynamics`` batch k,
        ``warp`` expands the features (no copy) to batch k, so a chunk of k
        frames decodes against one cached source. Any other batch mismatch
        raises ValueError.
        """
        if dynamics.dim() != 4 or dynamics.shape[1] != 3:
            raise ValueError(f"dynamics must be b 3 h w, got {tuple(dynamics.shape)}")
        fb, db = features[0].shape[0], dynamics.shape[0]
        if fb != db and fb != 1:
            raise ValueError(f"features batch {fb} != dynamics batch {db} "
                             "(only features of batch 1 broadcast)")
        image = None
        if self.source_skip:
            image, features = features[0], features[1:]
        if len(features) != len(self.up_blocks) + 1:
            raise ValueError(f"expected {len(self.up_blocks) + 1} feature maps from encode, "
                             f"got {len(features)}")
        grid, occ = dynamics[:, :2], dynamics[:, 2:]
        dtype = self.final.weight.dtype  # bf16 for `DynamicsCodec.decoder_copy`, float32 under autocast
        out = (warp(features[-1], grid) * resize_map(occ, features[-1].shape[-2:])).to(dtype)
        out = self.res_blocks(out)
        for block, skip in zip(self.up_blocks, reversed(features[:-1])):
            out = block(out, skip.shape[-2:])
            m = resize_map(occ, skip.shape[-2:]).to(out.dtype)
            out = torch.lerp(out, warp(skip, grid).to(out.dtype), m)  # m * A(skip, f) + (1 - m) * up
        frame = torch.sigmoid(self.final(out).float())  # fp32 from here: uint8 needs 8 exact bits
        if image is not None:
            m = resize_map(occ, frame.shape[-2:])
            frame = m * warp(image, grid) + (1.0 - m) * frame
        return frame

    # ----------------------------------------------------------------------
    # full stage-1 forward (eq. 5)
    # ----------------------------------------------------------------------

    def forward(self, src: Tensor, dri: Tensor) -> dict[str, Tensor]:
        """Reconstruct ``dri`` from ``src`` (both ``b c H W`` in [0, 1]).

        Returns a dict with:
            frame ``b c H W`` - the decoded driving frame (the eq. 5 output),
            dynamics ``b 3 h w`` - ``[f; m]``,
            heatmaps / heatmaps_source ``b k h' w'`` (motion resolution),
            shift / shift_source ``b k 2``, affine / affine_source ``b k 2 2``,
            bg_affine ``b 2 3``, mask ``b (k+1) h' w'``,
            sparse ``b (k+1) 2 h' w'``,
            deformed ``b c H W`` - the source image warped by f, detached
            (for visualisation only).
        """
        out = self.motion(src, dri)
        out["frame"] = self.decode(self.encode(src), out["dynamics"])
        with torch.no_grad():
            out["deformed"] = warp(src, out["dynamics"][:, :2].detach())
        return out


def _identity_affine(b: int, like: Tensor) -> Tensor:
    """``b 2 3`` identity affines on ``like``'s device/dtype."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=like.device, dtype=like.dtype)
    return eye.expand(b, 2, 3)
