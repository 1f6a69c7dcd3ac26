"""VDM-style 3D U-Net denoiser for the latent video diffusion (paper eq. 10).

    z^_1:N = DM(E(x_src), y_1:N, rho_1:N)                         (eq. 10)

The network predicts the noise (or v) of a noisy latent clip ``x: b c n h w``
given the diffusion step ``t``, the source-image features ``E(x_src)`` (already
at the latent resolution; concatenated to ``x`` on every frame), per-frame audio
features ``y`` and per-frame motion ``rho = [pose; blink]``. The same class
serves both stage-3 set-ups: MDCF latents (``c = 4`` at H/32) and the
DAWN-style baseline on FDE dynamics (``c = 3`` at H/4).

Design (VDM, Ho et al. 2022, "space-time factorised" U-Net):

- every spatial operation (3x3 conv, GroupNorm, spatial attention, down and
  up sampling) runs per frame on the frame-major layout ``(b n) c h w``, so
  frames never mix except in the explicitly temporal layers and the network
  accepts any ``n`` (odd, 1, thousands) and any ``h, w`` (down-sampling rounds
  up, up-sampling returns to the skip's exact size);
- frames mix through a zero-initialised kernel-3 temporal conv in each
  ResBlock and a rotary temporal self-attention after every ResBlock (global
  via SDPA, or banded with ``temporal_window``), both linear in ``n`` in memory;
- per-frame normalisation (not VDM's clip-wide GroupNorm) keeps statistics
  independent of the clip length, so a model trained on 20-40 frame clips sees
  the same activations on a 2000-frame inference clip, and keeps windowed
  models strictly local (see :meth:`UNet3D.temporal_receptive_field`);
- conditions enter either by per-frame cross-attention of the spatial tokens
  to an audio token and a motion token (DAWN, ``cond_mode="cross_attn"``) or
  by per-frame FiLM added to the ResBlocks' time modulation (``"film"``).

Classifier-free guidance: ``drop_audio`` / ``drop_motion`` swap the
corresponding tokens for learned null embeddings. The guided combination of
the branches lives in :func:`microscope_pl.diffusion.samplers.guided_model_fn`
(kept out of the network so training and sampling share one forward).

Shapes use einops letters: b batch, c channels, n frames, h/w height/width,
k condition tokens per frame, d feature width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from microscope_pl.models.attention import CrossAttention, SpatialAttention, TemporalAttention
from microscope_pl.models.blocks import Downsample, SiLUResBlock, Upsample, group_count

__all__ = ["ConditionEncoder", "SpaceTimeResBlock", "UNet3D", "timestep_embedding"]

CondMode = Literal["cross_attn", "film"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoidal embedding of (possibly fractional) steps.

    Args:
        t: ``b`` diffusion steps in ``[0, T)``.
        dim: embedding width (odd widths get a zero last channel).

    Returns:
        ``b dim`` float32: ``[cos(t f_i), sin(t f_i)]`` with geometric ``f_i``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


@dataclass
class _FrameContext:
    """What every block may need besides its input ``(b n) c h w``."""

    b: int
    n: int
    emb: Tensor  # b n' d, n' = 1 (time only) or n (time + per-frame FiLM)
    tokens: Tensor | None  # (b n) k cond_dim for cross-attention, else None


# --------------------------------------------------------------------------
# Conditions: per-frame tokens for audio y_1:N and motion rho_1:N (eq. 10)
# --------------------------------------------------------------------------


class ConditionEncoder(nn.Module):
    """Embeds per-frame audio and motion into condition tokens.

    ``audio: b n audio_dim``, ``pose: b n pose_dim``, ``blink: b n blink_dim``
    -> ``b n k cond_dim`` with ``k = 2`` (audio token, motion token), or
    ``k = 1`` when ``pose_dim + blink_dim == 0``. Dropped samples (classifier-
    free guidance) get a learned null token instead of their embedding, so a
    fully dropped sample carries no trace of the condition values.
    """

    def __init__(self, audio_dim: int, motion_dim: int, cond_dim: int, audio_context: int = 0) -> None:
        """
        Args:
            audio_dim: per-frame audio feature width (80 log-mel, 1024 HuBERT).
            motion_dim: ``pose_dim + blink_dim`` (0 disables the motion token).
            cond_dim: token width.
            audio_context: frames of audio on each side that each frame's
                audio token sees (a temporal conv of width ``2 k + 1``); 0 =
                the frame's own features only.
        """
        super().__init__()
        # Audio features are homogeneous (mel bins / HuBERT channels) but of
        # arbitrary scale: LayerNorm makes log-mel and HuBERT interchangeable.
        # It also removes each frame's level, which for log-mel *is* the
        # loudness that opens the mouth, so the level (mean) and spread (std)
        # go in beside it.
        self.audio_norm = nn.LayerNorm(audio_dim)
        # A mouth shape depends on the sounds around its frame, not one 40 ms
        # slice: with audio_context the first layer reads a window of frames
        # (replicate-padded, so clip ends see their nearest audio).
        self.audio_in = nn.Conv1d(audio_dim + 2, cond_dim, 2 * audio_context + 1,
                                  padding=audio_context, padding_mode="replicate")
        self.audio_out = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.null_audio = nn.Parameter(torch.randn(cond_dim) * 0.02)
        self.motion_dim = motion_dim
        if motion_dim > 0:
            self.motion = nn.Sequential(
                nn.Linear(motion_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
            self.null_motion = nn.Parameter(torch.randn(cond_dim) * 0.02)

    @property
    def num_tokens(self) -> int:
        return 2 if self.motion_dim > 0 else 1

    def forward(self, audio: Tensor, pose: Tensor | None, blink: Tensor | None,
                drop_audio: Tensor | None = None,
                drop_motion: Tensor | None = None) -> Tensor:
        level = torch.cat([audio.mean(-1, keepdim=True), audio.std(-1, correction=0, keepdim=True)], dim=-1)
        feats = rearrange(torch.cat([self.audio_norm(audio), level], dim=-1), "b n d -> b d n")
        tok_a = self.audio_out(rearrange(self.audio_in(feats), "b d n -> b n d"))
        if drop_audio is not None:
            tok_a = torch.where(drop_audio.view(-1, 1, 1), self.null_audio.to(tok_a.dtype), tok_a)
        if self.motion_dim == 0:
            return tok_a[:, :, None]
        parts = [p for p in (pose, blink) if p is not None and p.shape[-1] > 0]
        tok_m = self.motion(torch.cat(parts, dim=-1))
        if drop_motion is not None:
            tok_m = torch.where(drop_motion.view(-1, 1, 1), self.null_motion.to(tok_m.dtype), tok_m)
        return torch.stack([tok_a, tok_m], dim=2)


# --------------------------------------------------------------------------
# Blocks (all per frame except the temporal conv / attention)
# --------------------------------------------------------------------------

#: frames per chunk of the per-frame layers at inference, so that a long clip's
#: intermediates stay in the CPU cache (docs/results.md, denoiser cost per frame)
FRAME_CHUNK = 128


def per_frame(fn: Callable[..., Tensor], x: Tensor, *args: Tensor) -> Tensor:
    """``fn(x, *args)`` for a layer that treats every frame on its own (``(b n) ...`` tensors),
    run in chunks of :data:`FRAME_CHUNK` frames when no gradient is taken; the same result."""
    if torch.is_grad_enabled() or x.shape[0] <= FRAME_CHUNK:
        return fn(x, *args)
    return torch.cat([fn(x[i:i + FRAME_CHUNK], *(a[i:i + FRAME_CHUNK] for a in args))
                      for i in range(0, x.shape[0], FRAME_CHUNK)])


class SpaceTimeResBlock(SiLUResBlock):
    """ADM ResBlock with scale-shift time modulation, plus a temporal conv.

    ``(b n) cin h w -> (b n) cout h w``::

        h = conv3x3(SiLU(GN(x)))
        h = GN(h) * (1 + scale) + shift          # (scale, shift) from emb
        h = skip(x) + conv3x3(dropout(SiLU(h)))  # zero-initialised conv
        h = h + tconv3(SiLU(GN(h)))              # kernel 3 along n, zero-init

    The first three lines are :class:`~microscope_pl.models.blocks.SiLUResBlock`
    run per frame; ``emb`` is ``b 1 d`` (time) or ``b n d`` (time + per-frame
    FiLM) and is broadcast to the frames here.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0,
                 temporal_conv: bool = True) -> None:
        """
        Args:
            cin, cout: input and output widths.
            emb_dim: width of the modulation embedding.
            dropout: dropout before the second conv.
            temporal_conv: add the kernel-3 temporal conv (1 frame of reach).
        """
        super().__init__(cin, cout, groups=None, dropout=dropout, emb_dim=emb_dim)
        self.tconv: nn.Conv3d | None = None
        if temporal_conv:
            self.tnorm = nn.GroupNorm(group_count(cout), cout, eps=1e-6)
            # Zero-init: the block starts purely spatial (VDM / Make-A-Video
            # practice), temporal mixing is learned from there.
            self.tconv = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0))
            nn.init.zeros_(self.tconv.weight)
            nn.init.zeros_(self.tconv.bias)

    def forward(self, x: Tensor, ctx: _FrameContext) -> Tensor:  # type: ignore[override]
        assert self.emb is not None
        ss = self.emb(F.silu(ctx.emb))  # b n' 2c
        ss = ss.expand(ctx.b, ctx.n, ss.shape[-1]).reshape(ctx.b * ctx.n, -1, 1, 1)
        h = per_frame(super().forward, x, ss)
        if self.tconv is not None:
            t = rearrange(per_frame(lambda y: F.silu(self.tnorm(y)), h), "(b n) c h w -> b c n h w", b=ctx.b)
            h = h + rearrange(self.tconv(t), "b c n h w -> (b n) c h w")
        return h


class _Stage(nn.ModuleList):
    """SpaceTimeResBlock followed by its attention layers; routes each its inputs."""

    def forward(self, x: Tensor, ctx: _FrameContext) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, SpaceTimeResBlock):
                x = layer(x, ctx)
            elif isinstance(layer, SpatialAttention):
                x = per_frame(layer, x)
            elif isinstance(layer, CrossAttention):
                assert ctx.tokens is not None
                x = per_frame(layer, x, ctx.tokens)
            elif isinstance(layer, TemporalAttention):
                x = layer(x, ctx.b, ctx.n)
            else:
                raise TypeError(f"unexpected layer {type(layer).__name__}")
        return x


# --------------------------------------------------------------------------
# The denoiser, eq. 10: eps_theta(z_t, t | E(x_src), y_1:N, rho_1:N)
# --------------------------------------------------------------------------


class UNet3D(nn.Module):
    """Space-time factorised 3D U-Net denoiser over ``b c n h w`` latents."""

    def __init__(
        self,
        in_channels: int = 4,
        image_cond_channels: int = 256,
        audio_dim: int = 80,
        pose_dim: int = 6,
        blink_dim: int = 2,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_levels: Sequence[int] = (1,),
        num_heads: int = 4,
        temporal_window: int | None = None,
        cond_mode: CondMode = "cross_attn",
        cond_dim: int = 128,
        dropout: float = 0.0,
        temporal_conv: bool = True,
        audio_context: int = 0,
    ) -> None:
        """
        Args:
            in_channels: latent channels ``c`` (4 for MDCF at H/32, 3 for the
                DAWN-style baseline on ``[f; m]`` at H/4); also the output width.
            image_cond_channels: channels of the source-image features
                ``E(x_src)``, given at the latent resolution (0: no image cond).
            audio_dim: per-frame audio feature width.
            pose_dim: per-frame pose width (yaw, pitch, roll, scale, tx, ty).
            blink_dim: per-frame blink width (left, right eye aspect ratio).
            base_channels: width of the first level.
            channel_mult: width multiplier per level; one 2x spatial
                down-sampling between consecutive levels.
            num_res_blocks: ResBlocks per level on the way down (one more up).
            attn_levels: levels (0 = full resolution) with spatial
                self-attention; the middle block always has it.
            num_heads: heads of every attention layer; each level's width
                divided by it must be even (rotary embeddings).
            temporal_window: half-width ``w`` of local temporal attention
                (frame i attends to ``|i - j| <= w``) for very long clips;
                None for global attention.
            cond_mode: "cross_attn" (spatial tokens attend to the frame's
                audio and motion tokens) or "film" (per-frame scale / shift).
            cond_dim: width of the condition tokens.
            dropout: ResBlock dropout.
            temporal_conv: add a kernel-3 temporal conv inside every ResBlock.
            audio_context: audio frames on each side seen by a frame's audio
                token (see :class:`ConditionEncoder`).
        """
        super().__init__()
        if cond_mode not in ("cross_attn", "film"):
            raise ValueError(f"cond_mode must be 'cross_attn' or 'film', got {cond_mode!r}")
        if not channel_mult:
            raise ValueError("channel_mult must name at least one level")
        bad = [lvl for lvl in attn_levels if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise ValueError(f"attn_levels={tuple(attn_levels)} has levels outside "
                             f"channel_mult={tuple(channel_mult)} (0..{len(channel_mult) - 1})")
        if audio_context < 0:
            raise ValueError(f"audio_context must be >= 0, got {audio_context}")
        if temporal_window is not None and temporal_window < 0:
            raise ValueError(f"temporal_window must be >= 0 or None, got {temporal_window}")
        for mult in channel_mult:
            width = base_channels * mult
            if width % num_heads or (width // num_heads) % 2:
                raise ValueError(
                    f"base_channels*mult={width} must split into num_heads={num_heads} "
                    "heads of even width (rotary embeddings)")
        self.in_channels = in_channels
        self.image_cond_channels = image_cond_channels
        self.audio_dim = audio_dim
        self.pose_dim = pose_dim
        self.blink_dim = blink_dim
        self.cond_mode = cond_mode
        self.temporal_window = temporal_window
        emb_dim = 4 * base_channels
        self.base_channels = base_channels

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = ConditionEncoder(audio_dim, pose_dim + blink_dim, cond_dim, audio_context)
        self.film: nn.Module | None = None
        if cond_mode == "film":
            self.film = nn.Sequential(
                nn.SiLU(), nn.Linear(self.cond.num_tokens * cond_dim, emb_dim))

        def stage(cin: int, cout: int, spatial: bool) -> _Stage:
            layers: list[nn.Module] = [SpaceTimeResBlock(cin, cout, emb_dim, dropout, temporal_conv)]
            if spatial:
                layers.append(SpatialAttention(cout, num_heads))
            if cond_mode == "cross_attn":
                layers.append(CrossAttention(cout, cond_dim, num_heads))
            layers.append(TemporalAttention(cout, num_heads, temporal_window))
            return _Stage(layers)

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels + image_cond_channels, ch, 3, padding=1)
        skip_ch = [ch]
        self.down = nn.ModuleList()
        last = len(channel_mult) - 1
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, base_channels * mult, lvl in attn_levels))
                ch = base_channels * mult
                skip_ch.append(ch)
            if lvl != last:
                self.down.append(Downsample(ch))
                skip_ch.append(ch)

        self.mid = _Stage([*stage(ch, ch, True),
                           SpaceTimeResBlock(ch, ch, emb_dim, dropout, temporal_conv)])

        self.up = nn.ModuleList()
        for lvl in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                cout = base_channels * channel_mult[lvl]
                self.up.append(stage(ch + skip_ch.pop(), cout, lvl in attn_levels))
                ch = cout
            if lvl != 0:
                self.up.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(group_count(ch), ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero output: the untrained model predicts eps = 0 (the mean), the
        # loss starts at E[eps^2] = 1 and nothing explodes in the first steps.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ----------------------------------------------------------------------

    def temporal_receptive_field(self) -> int | None:
        """Largest ``|i - j|`` such that output frame i can depend on input j.

        None for global temporal attention. With a window it is the sum of
        every temporal layer's reach (``w`` per attention, 1 per temporal
        conv): all other layers act on one frame at a time.
        """
        if self.temporal_window is None:
            return None
        total = 0
        for m in self.modules():
            if isinstance(m, TemporalAttention):
                total += m.window or 0
            elif isinstance(m, SpaceTimeResBlock) and m.tconv is not None:
                total += 1
        return total

    def _check(self, x: Tensor, image_cond: Tensor | None, audio: Tensor,
               pose: Tensor | None, blink: Tensor | None) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be b c n h w with c={self.in_channels}, "
                             f"got shape {tuple(x.shape)}")
        b, _, n, h, w = x.shape
        checks = [("audio", audio, self.audio_dim), ("pose", pose, self.pose_dim),
                  ("blink", blink, self.blink_dim)]
        for name, val, dim in checks:
            if dim == 0 and val is None:
                continue
            if val is None or tuple(val.shape) != (b, n, dim):
                got = None if val is None else tuple(val.shape)
                raise ValueError(f"{name} must have shape {(b, n, dim)} to match "
                                 f"x {tuple(x.shape)}, got {got}")
        if self.image_cond_channels:
            ok = image_cond is not None and (
                (image_cond.ndim == 4 and tuple(image_cond.shape) == (b, self.image_cond_channels, h, w))
                or (image_cond.ndim == 5 and tuple(image_cond.shape)
                    == (b, self.image_cond_channels, n, h, w)))
            if not ok:
                got = None if image_cond is None else tuple(image_cond.shape)
                raise ValueError(
                    f"image_cond must be {(b, self.image_cond_channels, h, w)} (or with n={n} "
                    f"after the channels) to match x {tuple(x.shape)}, got {got}")

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        image_cond: Tensor | None,
        audio: Tensor,
        pose: Tensor | None,
        blink: Tensor | None,
        drop_audio: Tensor | None = None,
        drop_motion: Tensor | None = None,
    ) -> Tensor:
        """Predict the model output (eps or v) for a noisy latent clip.

        Args:
            x: ``b c n h w`` noisy latents z_t.
            t: ``b`` (or scalar) diffusion steps.
            image_cond: ``b c' h w`` source-image features at the latent
                resolution, shared by all frames (``b c' n h w`` also accepted).
            audio: ``b n audio_dim``; pose: ``b n pose_dim``; blink: ``b n blink_dim``.
            drop_audio, drop_motion: ``b`` bool, True replaces that sample's
                audio (resp. pose + blink) tokens by the learned null token.

        Returns:
            ``b c n h w``.
        """
        self._check(x, image_cond, audio, pose, blink)
        b, _, n, h, w = x.shape
        if t.ndim == 0:
            t = t.expand(b)

        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))[:, None]
        tokens = self.cond(audio, pose, blink, drop_audio, drop_motion)  # b n k d
        ctx_tokens: Tensor | None = None
        if self.film is not None:
            emb = emb + self.film(rearrange(tokens, "b n k d -> b n (k d)"))
        else:
            ctx_tokens = rearrange(tokens, "b n k d -> (b n) k d")
        ctx = _FrameContext(b=b, n=n, emb=emb, tokens=ctx_tokens)

        if self.image_cond_channels:
            assert image_cond is not None
            if image_cond.ndim == 4:
                image_cond = image_cond[:, :, None].expand(-1, -1, n, -1, -1)
            x = torch.cat([x, image_cond.to(x.dtype)], dim=1)
        hid = self.conv_in(rearrange(x, "b c n h w -> (b n) c h w"))

        skips = [hid]
        for block in self.down:
            hid = block(hid) if isinstance(block, Downsample) else block(hid, ctx)
            skips.append(hid)
        hid = self.mid(hid, ctx)
        for block in self.up:
            if isinstance(block, Upsample):
                hid = block(hid, skips[-1].shape[-2:])
            else:
                hid = block(torch.cat([hid, skips.pop()], dim=1), ctx)

        out = self.conv_out(F.silu(self.norm_out(hid)))
        return rearrange(out, "(b n) c h w -> b c n h w", b=b)
