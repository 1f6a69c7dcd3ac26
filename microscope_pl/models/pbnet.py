"""PBNet: pose (6) and blink (2) sequences from audio, a transformer CVAE.

MICROSCOPE (section 3.3) borrows PBNet from DAWN to drive the diffusion model
with natural head poses and blinks when only audio is given. This is our own
implementation of that idea: a conditional VAE whose encoder (training only)
summarises a clip's motion into a sequence-level latent, and whose decoder
turns per-frame audio features plus that latent into per-frame motion.

Motion is ``(yaw, pitch, roll, scale, tx, ty, blink_left, blink_right)``
expressed as deltas from the first frame (docs/interfaces.md); callers may
scale each channel (PBNetModule divides by the per-channel spread).

Shapes use einops letters: b batch, n frames, d feature width, h heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .losses import kl_divergence

__all__ = ["PBNet", "pbnet_loss"]

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


# --------------------------------------------------------------------------
# Rotary position embedding (relative positions: works for any n)
# --------------------------------------------------------------------------


def _rotary(n: int, dim: int, device: torch.device, offset: int = 0) -> tuple[Tensor, Tensor]:
    """``cos, sin`` tables ``n dim`` for positions ``offset .. offset + n - 1``.

    Computed on the fly, so there is no ``max_len``: attention scores depend
    only on relative positions, which is what lets a decoder trained on short
    clips run on 1600-frame sequences.
    """
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    pos = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``b h n e`` queries or keys by the position tables ``n e``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)


def _band_mask(n: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean ``n n`` mask, True where ``|i - j| <= window`` (None: full attention)."""
    if window is None or window >= n - 1:
        return None
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= window


# --------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block with rotary self-attention: ``b n d -> b n d``.

    Uses ``F.scaled_dot_product_attention`` (memory-efficient kernels), so
    1600 frames at d_model 128 are cheap.
    """

    def __init__(self, d_model: int, num_heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff_mult * d_model), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(ff_mult * d_model, d_model), nn.Dropout(dropout),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h e) -> three b h n e", three=3, h=self.num_heads)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(rearrange(att, "b h n e -> b n (h e)")))
        return x + self.ff(self.norm2(x))


class Transformer(nn.Module):
    """A stack of ``Block`` with a final LayerNorm: ``b n d -> b n d``."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.head_dim = d_model // num_heads
        self.blocks = nn.ModuleList([Block(d_model, num_heads, ff_mult, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, window: int | None = None) -> Tensor:
        n = x.shape[1]
        cos, sin = _rotary(n, self.head_dim, x.device)
        mask = _band_mask(n, window, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x)


def _audio_embed(audio_dim: int, d_model: int) -> nn.Sequential:
    # LayerNorm first: log-mel (about -10..2) and HuBERT features have very
    # different scales; per-frame normalisation makes either work unchanged.
    return nn.Sequential(nn.LayerNorm(audio_dim), nn.Linear(audio_dim, d_model), nn.SiLU(),
                         nn.Linear(d_model, d_model))


# --------------------------------------------------------------------------
# PBNet
# --------------------------------------------------------------------------


class PBNet(nn.Module):
    """Transformer conditional VAE for pose and blink sequences given audio.

    Encoder q(z | audio, motion), training only: tokens
    ``audio_embed(audio) + motion_embed(motion)`` with a learned distribution
    token in front; full self-attention; the distribution token's output gives
    ``(mu, logvar)`` of a sequence-level latent ``b latent_dim`` (the clip's
    "style": how much the head moves, how often the eyes blink).

    Decoder p(motion | audio, z): tokens ``audio_embed(audio) + latent_embed(z)``
    (the latent is added to every frame rather than used as a prefix token, so
    its influence does not dilute over long sequences); self-attention within
    a band of ``attn_window`` frames; a zero-initialised linear head to
    ``motion_dim`` per frame. The head's output for frame 0 is subtracted from
    every frame, so frame 0 is exactly zero and the network only has to get
    the trajectory right up to an offset, which is what a delta is.

    Positions are rotary (relative), with no maximum length. With a band
    narrower than the training clips, every interior frame of a long sequence
    sees exactly the context it saw in training; the default 16 (2 layers:
    +-32 frames, 1.3 s at 25 fps) suits the 40-frame clips of configs/pbnet.yaml.

    Args:
        audio_dim: per-frame audio feature width (80 log-mel, 1024 HuBERT).
        motion_dim: motion channels per frame (6 pose + 2 blink).
        d_model: transformer width; must be divisible by ``num_heads``, with
            an even head width (rotary embedding).
        num_heads: attention heads.
        num_layers: layers of the encoder and of the decoder each.
        latent_dim: width of the sequence-level latent.
        dropout: dropout in attention and feed-forward layers.
        ff_mult: feed-forward width as a multiple of ``d_model``.
        attn_window: decoder attention half-width in frames (None: full
            attention; keep it below about half the training clip length).
    """

    def __init__(
        self,
        audio_dim: int,
        motion_dim: int = 8,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        latent_dim: int = 64,
        dropout: float = 0.1,
        ff_mult: int = 4,
        attn_window: int | None = 16,
    ) -> None:
        super().__init__()
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into num_heads={num_heads} heads of even width")
        if attn_window is not None and attn_window < 1:
            raise ValueError(f"attn_window must be None or >= 1, got {attn_window}")
        if min(audio_dim, motion_dim, latent_dim, num_layers) < 1:
            raise ValueError(f"audio_dim={audio_dim}, motion_dim={motion_dim}, latent_dim={latent_dim} and "
                             f"num_layers={num_layers} must be positive")
        self.audio_dim = audio_dim
        self.motion_dim = motion_dim
        self.latent_dim = latent_dim
        self.attn_window = attn_window

        # ---- encoder q(z | audio, motion) --------------------------------
        self.enc_audio = _audio_embed(audio_dim, d_model)
        self.enc_motion = nn.Sequential(nn.Linear(motion_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.dist_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.encoder = Transformer(d_model, num_heads, num_layers, ff_mult, dropout)
        self.to_dist = nn.Linear(d_model, 2 * latent_dim)

        # ---- decoder p(motion | audio, z) --------------------------------
        self.dec_audio = _audio_embed(audio_dim, d_model)
        self.dec_latent = nn.Linear(latent_dim, d_model)
        self.decoder = Transformer(d_model, num_heads, num_layers, ff_mult, dropout)
        self.head = nn.Linear(d_model, motion_dim)
        # zero head: the untrained model predicts "no motion", the mean delta
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # per-channel spread of the training motion: the network works in units of it
        self.register_buffer("motion_std", torch.ones(motion_dim))

    def _check(self, audio: Tensor, motion: Tensor | None = None) -> None:
        if audio.ndim != 3 or audio.shape[-1] != self.audio_dim:
            raise ValueError(f"audio must be b n {self.audio_dim}, got shape {tuple(audio.shape)}")
        if motion is not None and (motion.ndim != 3 or motion.shape[:2] != audio.shape[:2]
                                   or motion.shape[-1] != self.motion_dim):
            raise ValueError(f"motion shape {tuple(motion.shape)} does not match audio shape "
                             f"{tuple(audio.shape)} with motion_dim={self.motion_dim}")

    # ------------------------------------------------------------- encoder

    def encode(self, audio: Tensor, motion: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of the sequence latent.

        Args:
            audio: ``b n audio_dim`` per-frame audio features.
            motion: ``b n motion_dim``; re-based to frame 0 here, so absolute
                tracks and deltas give the same result.

        Returns:
            ``(mu, logvar)``, each ``b latent_dim``; logvar clamped to [-30, 20].
        """
        self._check(audio, motion)
        motion = motion - motion[:, :1]
        tokens = self.enc_audio(audio) + self.enc_motion(motion)
        tokens = torch.cat([self.dist_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], dim=1)
        h = self.encoder(tokens)[:, 0]
        mu, logvar = self.to_dist(h).chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    # ------------------------------------------------------------- decoder

    def decode(self, audio: Tensor, z: Tensor) -> Tensor:
        """Motion deltas from audio and a latent.

        Args:
            audio: ``b n audio_dim``.
            z: ``b latent_dim``.

        Returns:
            ``b n motion_dim`` with frame 0 exactly zero.
        """
        self._check(audio)
        if z.shape != (audio.shape[0], self.latent_dim):
            raise ValueError(f"z shape {tuple(z.shape)} != ({audio.shape[0]}, {self.latent_dim})")
        tokens = self.dec_audio(audio) + self.dec_latent(z)[:, None]
        raw = self.head(self.decoder(tokens, self.attn_window))
        return raw - raw[:, :1]

    # ------------------------------------------------------------- API

    def forward(self, audio: Tensor, motion: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training pass: encode the clip, draw ``z = mu + sigma * eps``, decode.

        Args:
            audio: ``b n audio_dim``.
            motion: ``b n motion_dim`` target motion (deltas from frame 0).
            generator: optional generator for ``eps``.

        Returns:
            ``dict(motion=b n motion_dim, mu=b latent_dim, logvar=b latent_dim,
            z=b latent_dim)``.
        """
        mu, logvar = self.encode(audio, motion)
        z = mu + torch.exp(0.5 * logvar) * self._noise(mu.shape, mu, generator)
        return {"motion": self.decode(audio, z), "mu": mu, "logvar": logvar, "z": z}

    @torch.no_grad()
    def sample(self, audio: Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> Tensor:
        """Draw motion from the prior: ``z ~ N(0, temperature^2 I)``, decode.

        Reproducible for a seeded generator (drawn on the generator's device,
        so a CPU generator gives the same ``z`` everywhere); call in eval mode
        (dropout would add unseeded noise). Any ``n`` works.

        Args:
            audio: ``b n audio_dim``.
            generator: optional ``torch.Generator``.
            temperature: scale of the prior noise (0 gives the prior mean).

        Returns:
            ``b n motion_dim`` deltas from frame 0, in data units (times ``motion_std``).
        """
        self._check(audio)
        ref = audio[:, 0, :1]  # device and dtype reference
        z = self._noise((audio.shape[0], self.latent_dim), ref, generator) * temperature
        return self.decode(audio, z) * self.motion_std

    @staticmethod
    def _noise(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
        dev = generator.device if generator is not None else like.device
        eps = torch.randn(tuple(shape), generator=generator, device=dev, dtype=torch.float32)
        return eps.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------
# CVAE loss: reconstruction + KL (eq. 8 applied to the sequence latent)
# --------------------------------------------------------------------------


def pbnet_loss(out: dict[str, Tensor], target: Tensor, kl_weight: float) -> dict[str, Tensor]:
    """ELBO-style loss for PBNet.

    ``rec`` is the MSE over frames 1..n-1 (frame 0 is zero by construction on
    both sides, so counting it would only dilute the mean) in the units the
    caller uses (PBNetModule passes per-channel unit-spread motion); ``kl`` is
    ``kl_divergence(mu, logvar)``, the mean over latent elements.

    Args:
        out: ``PBNet.forward`` output with ``motion b n c``, ``mu``, ``logvar``.
        target: ``b n c`` target motion; re-based to frame 0 here.
        kl_weight: weight of the KL term.

    Returns:
        ``dict(loss, rec, kl)`` plus ``pose`` and ``blink`` (the MSE of
        channels 0-5 and 6-7) when ``c == 8``; all scalars.
    """
    pred = out["motion"].float()
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target = (target - target[:, :1]).float()
    frames = slice(1, None) if target.shape[1] > 1 else slice(None)
    err = (pred[:, frames] - target[:, frames]).pow(2)
    terms = {"rec": err.mean(), "kl": kl_divergence(out["mu"], out["logvar"])}
    if target.shape[-1] == 8:
        terms["pose"] = err[..., :6].mean()
        terms["blink"] = err[..., 6:].mean()
    terms["loss"] = terms["rec"] + kl_weight * terms["kl"]
    return terms
