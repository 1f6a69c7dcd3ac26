"""Attention layers of the 3D U-Net denoiser (paper eq. 10, VDM-style).

Three layers, all built on ``torch.nn.functional.scaled_dot_product_attention``
(SDPA) so the fused flash / memory-efficient kernels can run and no
``n x n`` score tensor is stored per pixel:

- :class:`SpatialAttention`: every frame's ``h w`` tokens attend to each other.
- :class:`TemporalAttention`: every pixel's ``n`` tokens attend across frames,
  with rotary position embeddings (relative positions without a bias tensor,
  so the global case stays mask-free and SDPA picks a fused kernel). With a
  window ``w`` only ``|i - j| <= w`` is attended, computed block-wise by
  :func:`local_attention` in memory ``O(n * 3w)`` rather than ``O(n^2)``.
- :class:`CrossAttention`: every frame's spatial tokens attend to that
  frame's condition tokens (audio token, motion token), as in DAWN.

Internal activations use the frame-major layout ``(b n) c h w``; ``b`` and
``n`` travel alongside so temporal layers can regroup to ``(b h w) n c``.
Output projections are zero-initialised, so each layer starts as the identity
(ADM / VDM practice: the residual stream is undisturbed at init).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .blocks import group_count

__all__ = [
    "CrossAttention",
    "SpatialAttention",
    "TemporalAttention",
    "apply_rotary",
    "local_attention",
    "naive_attention",
    "rotary_tables",
    "sdpa",
]

# CUDA attention kernels put batch and heads on grid axes capped at 65535;
# splitting the flattened batch keeps calls on very long / large inputs legal.
SDPA_MAX_BATCH = 32768


def _head_dim(channels: int, num_heads: int, even: bool = False) -> int:
    if num_heads < 1 or channels % num_heads != 0:
        raise ValueError(
            f"channels={channels} must be divisible by num_heads={num_heads}")
    dh = channels // num_heads
    if even and dh % 2 != 0:
        raise ValueError(
            f"rotary embeddings need an even head width; channels={channels} "
            f"/ num_heads={num_heads} = {dh}")
    return dh


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
         dim: int = 0) -> Tensor:
    """SDPA split along a batch-like ``dim`` into chunks of ``SDPA_MAX_BATCH``.

    Args:
        q: ``B H l d``; k, v: ``B H s d``; mask: bool, broadcastable to
            ``B H l s`` (True = attend) and of size 1 along ``dim``.
        dim: 0 or 1, the axis to split (the mask must broadcast along it).

    Returns:
        ``B H l d``.
    """
    size = q.shape[dim]
    if size <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    outs = [
        F.scaled_dot_product_attention(
            q.narrow(dim, s, min(SDPA_MAX_BATCH, size - s)),
            k.narrow(dim, s, min(SDPA_MAX_BATCH, size - s)),
            v.narrow(dim, s, min(SDPA_MAX_BATCH, size - s)),
            attn_mask=mask,
        )
        for s in range(0, size, SDPA_MAX_BATCH)
    ]
    return torch.cat(outs, dim=dim)


# --------------------------------------------------------------------------
# Rotary position embedding (RoFormer): q_i . k_j depends only on i - j
# --------------------------------------------------------------------------


def rotary_tables(n: int, dim: int, device: torch.device,
                  base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables for positions ``0..n-1``.

    Returns:
        ``(cos, sin)``, each ``n dim/2`` float32. Angles are computed in
        float32 even under autocast: at positions in the thousands a bf16
        angle would be off by whole radians.
    """
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device,
                                      dtype=torch.float32) / dim)
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(x[:d/2], x[d/2:])`` by position-dependent angles.

    Args:
        x: ``... n d``; cos, sin: ``n d/2``.

    Returns:
        ``... n d`` in ``x.dtype``.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


# --------------------------------------------------------------------------
# Banded (windowed) attention, |i - j| <= w, in O(n * 3w) memory
# --------------------------------------------------------------------------


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Attention restricted to ``|i - j| <= window`` along the sequence axis.

    The sequence is cut into query blocks of ``blk = min(window, n)`` frames
    (1 when ``window == 0``). Block ``k`` covers queries ``[k blk, (k+1) blk)``
    and every key it may see lies in ``[k blk - halo, (k+1) blk + halo)`` with
    ``halo = min(window, n - 1)``: a strip of ``L = blk + 2 halo <= 3 blk``
    keys. All blocks run in one SDPA call over ``(nb, B H, blk, L)``, so the
    largest tensor is ``n * L`` per sequence: linear in ``n`` for a fixed
    window. The band (and the zero padding at both ends) is enforced by a
    boolean mask that is exact, so nothing inside the window is ever dropped
    and ``window >= n - 1`` reproduces global attention.

    Args:
        q, k, v: ``B H n d`` (rotary already applied to q and k).
        window: the half-width ``w >= 0``.

    Returns:
        ``B H n d``.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got window={window}")
    bsz, heads, n, d = q.shape
    blk = max(1, min(window, n))
    halo = min(window, n - 1)
    nb = -(-n // blk)
    pad = nb * blk - n
    span = blk + 2 * halo

    qb = F.pad(q, (0, 0, 0, pad)).view(bsz, heads, nb, blk, d)
    # unfold(size=span, step=blk) over the halo-padded keys yields exactly nb
    # strips, strip k starting at absolute frame k * blk - halo.
    kb = F.pad(k, (0, 0, halo, pad + halo)).unfold(2, span, blk).transpose(-1, -2)
    vb = F.pad(v, (0, 0, halo, pad + halo)).unfold(2, span, blk).transpose(-1, -2)

    start = torch.arange(nb, device=q.device)[:, None, None] * blk
    i = start + torch.arange(blk, device=q.device)[None, :, None]
    j = start - halo + torch.arange(span, device=q.device)[None, None, :]
    mask = ((i - j).abs() <= window) & (j >= 0) & (j < n)
    # Padded query rows (i >= n) would have no valid key; an all-masked row
    # gives NaN and NaN * 0 poisons the backward pass, so let them see the
    # whole strip. Their outputs are sliced away below.
    mask = mask | (i >= n)

    # (nb, B*H, blk, d): blocks on the batch axis, the mask broadcasts over
    # the "heads" axis (B*H) without being copied.
    qb = rearrange(qb, "b h k l d -> k (b h) l d")
    kb = rearrange(kb, "b h k s d -> k (b h) s d")
    vb = rearrange(vb, "b h k s d -> k (b h) s d")
    out = sdpa(qb, kb, vb, mask[:, None], dim=1)
    out = rearrange(out, "k (b h) l d -> b h (k l) d", b=bsz)
    return out[:, :, :n]


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


class SpatialAttention(nn.Module):
    """Per-frame self-attention over the ``h w`` tokens, with a residual.

    ``(b n) c h w -> (b n) c h w``. Normalisation is GroupNorm per frame, so a
    frame's output never depends on other frames.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        """
        Args:
            channels: feature width ``c``.
            num_heads: attention heads; must divide ``channels``.
        """
        super().__init__()
        _head_dim(channels, num_heads)
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(group_count(channels), channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        hh, ww = x.shape[-2:]
        tok = rearrange(self.norm(x), "f c h w -> f (h w) c")
        q, k, v = rearrange(self.qkv(tok), "f t (three e d) -> three f e t d",
                            three=3, e=self.num_heads)
        out = rearrange(sdpa(q, k, v), "f e t d -> f t (e d)")
        return x + rearrange(self.proj(out), "f (h w) c -> f c h w", h=hh, w=ww)


class CrossAttention(nn.Module):
    """Each frame's spatial tokens attend to that frame's condition tokens.

    ``x: (b n) c h w``, ``context: (b n) k cond_dim`` -> ``(b n) c h w``; ``k``
    is the number of condition tokens per frame (audio, motion).
    """

    def __init__(self, channels: int, cond_dim: int, num_heads: int) -> None:
        """
        Args:
            channels: feature width ``c`` of the queries.
            cond_dim: width of the condition tokens (keys / values).
            num_heads: attention heads; must divide ``channels``.
        """
        super().__init__()
        _head_dim(channels, num_heads)
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(cond_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        hh, ww = x.shape[-2:]
        tok = self.norm(rearrange(x, "f c h w -> f (h w) c"))
        q = rearrange(self.q(tok), "f t (e d) -> f e t d", e=self.num_heads)
        k, v = rearrange(self.kv(context), "f s (two e d) -> two f e s d",
                         two=2, e=self.num_heads)
        out = rearrange(sdpa(q, k, v), "f e t d -> f t (e d)")
        return x + rearrange(self.proj(out), "f (h w) c -> f c h w", h=hh, w=ww)


class TemporalAttention(nn.Module):
    """Per-pixel self-attention across the ``n`` frames, rotary positions.

    ``(b n) c h w -> (b n) c h w``. Tokens are regrouped to ``(b h w) n c``
    and normalised with LayerNorm per token (a per-frame statistic, so no
    information leaks across frames outside the attention itself, and the
    normalisation is the same whether a clip has 20 or 2000 frames).

    ``window=None``: global attention through mask-free SDPA (fused kernels,
    memory linear in ``n``). ``window=w``: :func:`local_attention`, frame ``i``
    sees frames ``|i - j| <= w`` only; when ``w >= n - 1`` the band covers
    everything and the global path is used (identical result, cheaper).
    """

    def __init__(self, channels: int, num_heads: int, window: int | None = None,
                 rotary_base: float = 10000.0) -> None:
        """
        Args:
            channels: feature width ``c``.
            num_heads: attention heads; ``channels / num_heads`` must be even.
            window: local half-width ``w`` in frames, or None for global.
            rotary_base: rotary frequency base (RoFormer's 10000).
        """
        super().__init__()
        self.head_dim = _head_dim(channels, num_heads, even=True)
        if window is not None and window < 0:
            raise ValueError(f"temporal window must be >= 0 or None, got {window}")
        self.num_heads = num_heads
        self.window = window
        self.rotary_base = rotary_base
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Rotary + (global or banded) attention on ``B H n d`` heads."""
        n = q.shape[2]
        cos, sin = rotary_tables(n, self.head_dim, q.device, self.rotary_base)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.window is None or self.window >= n - 1:
            return sdpa(q, k, v)
        return local_attention(q, k, v, self.window)

    def forward(self, x: Tensor, b: int, n: int) -> Tensor:
        """
        Args:
            x: ``(b n) c h w``.
            b, n: batch size and frame count folded into the first axis.
        """
        hh, ww = x.shape[-2:]
        tok = self.norm(rearrange(x, "(b n) c h w -> (b h w) n c", b=b, n=n))
        q, k, v = rearrange(self.qkv(tok), "p n (three e d) -> three p e n d",
                            three=3, e=self.num_heads)
        out = rearrange(self.attend(q, k, v), "p e n d -> p n (e d)")
        out = rearrange(self.proj(out), "(b h w) n c -> (b n) c h w", b=b, h=hh, w=ww)
        return x + out

    @property
    def reach(self) -> int | None:
        """Frames of temporal reach this layer adds (None = unbounded)."""
        return self.window


def naive_attention(q: Tensor, k: Tensor, v: Tensor,
                    mask: Tensor | None = None) -> Tensor:
    """Reference ``softmax(q k^T / sqrt(d)) v`` that materialises the scores.

    For tests only. ``q: ... l d``, ``k, v: ... s d``, mask bool ``l s``.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v
