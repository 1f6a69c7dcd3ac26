"""Tiny-config tests for the LMAE (stage 2) and its losses (eq. 4, 6, 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microscope_pl.models.blocks import identity_grid
from microscope_pl.models.lmae import LMAE
from microscope_pl.metrics.image import frame_psnr
from microscope_pl.models.losses import dynamics_mse, kl_divergence
from microscope_pl.models.pixel_vae import PixelVAE

TINY = dict(base_channels=16, norm_groups=8)


def smooth_dynamics(b: int, size: int, seed: int) -> torch.Tensor:
    """``b 3 size size`` dynamics: an affine + low-frequency warp and a smooth occlusion."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(b, 2, 3, generator=g) * 0.08
    theta[:, 0, 0] += 1
    theta[:, 1, 1] += 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False).permute(0, 3, 1, 2)
    grid = grid + F.interpolate(torch.randn(b, 2, 4, 4, generator=g) * 0.05, size=(size, size), mode="bicubic")
    occ = torch.sigmoid(F.interpolate(torch.randn(b, 1, 4, 4, generator=g) * 1.5 + 3, size=(size, size),
                                      mode="bicubic"))
    return torch.cat([grid.clamp(-1, 1), occ], dim=1)


def _scramble_output(model: LMAE | PixelVAE, std: float = 3.0) -> None:
    """Large random weights in the zero-initialised last conv, to push outputs to the extremes."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.dec_out[-1].weight, std=std)
    torch.nn.init.normal_(model.dec_out[-1].bias, std=std)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("num_down, side", [(3, 8), (2, 16)])
def test_latent_shapes(num_down: int, side: int) -> None:
    torch.manual_seed(0)
    model = LMAE(num_down=num_down, **TINY)
    dyn = smooth_dynamics(2, 64, 0)
    out = model(dyn)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (2, 4, side, side)
    assert out["dynamics"].shape == dyn.shape and out["dynamics"].dtype == torch.float32
    assert model.latent_shape(64, 64) == (4, side, side)
    assert model.downsample_factor == 2**num_down


def test_compression_ratio_from_shapes() -> None:
    # MDCF at 256 x 256: FDE gives 64 x 64 dynamics, LMAE d/8 -> 4 x 8 x 8 (768x);
    # two downsamplings (d/16) -> 4 x 16 x 16 (192x). Shapes come from real tensors.
    for num_down, ratio in [(3, 768.0), (2, 192.0)]:
        model = LMAE(num_down=num_down, **TINY)
        mu, _ = model.encode(smooth_dynamics(1, 64, 0))
        assert LMAE.compression_ratio((3, 256, 256), mu.shape) == ratio
        assert LMAE.compression_ratio((1, 3, 256, 256), mu.shape[1:]) == ratio
        assert LMAE.compression_ratio((256, 256), model.latent_shape(64, 64)) == ratio
    with pytest.raises(ValueError):
        LMAE.compression_ratio((256,), (4, 8, 8))


def test_bad_sizes_and_configs_raise() -> None:
    model = LMAE(**TINY)
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError):
        model.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="channel_mult"):
        LMAE(channel_mult=(1, 2), **TINY)
    with pytest.raises(ValueError, match="norm_groups"):
        LMAE(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="in_channels"):
        LMAE(in_channels=4, output="dynamics", **TINY)


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize("grid_mode", ["absolute", "offset"])
def test_dynamics_output_ranges(grid_mode: str) -> None:
    model = LMAE(grid_mode=grid_mode, **TINY)
    _scramble_output(model)
    out = model(smooth_dynamics(2, 32, 0))["dynamics"]
    grid, occ = out[:, :2], out[:, 2:]
    assert grid.min() >= -1 and grid.max() <= 1
    assert occ.min() >= 0 and occ.max() <= 1
    assert grid.abs().max() > 0.9  # the scramble really did reach the bounds


def test_offset_mode_starts_at_identity() -> None:
    model = LMAE(grid_mode="offset", **TINY)
    out = model(smooth_dynamics(1, 32, 0), sample=False)["dynamics"]
    torch.testing.assert_close(out[:, :2], identity_grid(32, 32))
    torch.testing.assert_close(out[:, 2:], torch.full_like(out[:, 2:], 0.5))


def test_affine_head_adds_one_global_affine_displacement() -> None:
    model = LMAE(grid_mode="offset", upsample="bilinear", affine_head=True, **TINY)
    dyn = smooth_dynamics(2, 32, 0)
    torch.testing.assert_close(model(dyn, sample=False)["dynamics"][:, :2], identity_grid(32, 32).expand(2, -1, -1, -1))
    shift = torch.tensor([0.02, -0.01, 0.05, 0.01, 0.03, -0.04])  # a row-major 2 x 3 displacement affine
    with torch.no_grad():
        model.affine_head.bias.copy_(shift)
    grid = model(dyn, sample=False)["dynamics"][:, :2]
    ident = identity_grid(32, 32)[0]
    expected = torch.einsum("ij,jhw->ihw", shift.view(2, 3)[:, :2], ident) + shift.view(2, 3)[:, 2, None, None]
    torch.testing.assert_close(grid, (ident + expected).clamp(-1, 1).expand(2, -1, -1, -1))  # clamped like FDE
    with pytest.raises(ValueError, match="affine_head"):
        LMAE(grid_mode="absolute", affine_head=True, **TINY)
    with pytest.raises(ValueError, match="upsample"):
        LMAE(upsample="bicubic", **TINY)


def test_image_mode_vae_d32() -> None:
    # the "VAE d/32" ablation: five 2x downsamplings straight on frames
    model = PixelVAE(num_down=5, **TINY)
    _scramble_output(model)
    frame = torch.rand(2, 3, 64, 64)
    out = model(frame)
    assert out["mu"].shape == (2, 4, 2, 2)
    assert out["frame"].min() >= 0 and out["frame"].max() <= 1
    assert LMAE.compression_ratio(frame.shape, out["mu"].shape) == 768.0


# ---------------------------------------------------------------- pixel VAE


def test_pixel_vae_frame_in_unit_range_and_shape() -> None:
    torch.manual_seed(0)
    model = PixelVAE(num_down=3, **TINY)
    assert model.downsample_factor == 8 and model.latent_channels == 4
    frame = torch.rand(2, 3, 32, 48)
    fresh = model(frame, sample=False)["frame"]  # zero-initialised last conv: uniform grey
    torch.testing.assert_close(fresh, torch.full_like(fresh, 0.5))
    _scramble_output(model)
    out = model(frame)
    assert set(out) >= {"frame", "mu", "logvar"}
    assert out["frame"].shape == frame.shape and out["frame"].dtype == torch.float32
    assert out["frame"].min() >= 0 and out["frame"].max() <= 1
    assert out["frame"].min() < 0.1 and out["frame"].max() > 0.9  # the scramble reached the bounds
    mu, logvar = model.encode(frame)
    assert mu.shape == logvar.shape == out["mu"].shape == (2, 4, 4, 6)
    torch.testing.assert_close(model.decode(mu), model(frame, sample=False)["frame"])
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.rand(1, 3, 30, 32))


def _res(prefix: str, skip: bool = False) -> list[str]:
    return [f"{prefix}.{n}" for n in ("norm1", "conv1", "norm2", "conv2")] + ([f"{prefix}.skip"] if skip else [])


def _attn(prefix: str) -> list[str]:
    return [f"{prefix}.norm", f"{prefix}.qkv", f"{prefix}.proj"]


# Layers of the former ``LMAE(in_channels=3, num_down=1, output="image")``, in
# state-dict order: pixel-VAE checkpoints written by it must load unchanged.
FORMER_IMAGE_LMAE_LAYERS = [
    "enc_in", *_res("enc_blocks.0"), "enc_blocks.1.conv", *_res("enc_blocks.2", skip=True),
    *_res("enc_mid.0"), *_attn("enc_mid.1"), *_res("enc_mid.2"), "enc_out.0", "enc_out.2",
    "dec_in", *_res("dec_mid.0"), *_attn("dec_mid.1"), *_res("dec_mid.2"),
    *_res("dec_blocks.0"), "dec_blocks.1.conv", *_res("dec_blocks.2", skip=True), "dec_out.0", "dec_out.2",
]


def test_pixel_vae_keeps_the_former_state_dict_layout() -> None:
    model = PixelVAE(num_down=1, base_channels=8, norm_groups=4)
    sd = model.state_dict()
    assert list(sd) == [f"{layer}.{p}" for layer in FORMER_IMAGE_LMAE_LAYERS for p in ("weight", "bias")]
    assert sd["enc_in.weight"].shape == (8, 3, 3, 3)
    assert sd["enc_out.2.weight"].shape == (8, 16, 3, 3)  # 2 x latent_channels = (mu, logvar)
    assert sd["enc_blocks.2.skip.weight"].shape == (16, 8, 1, 1)
    assert sd["dec_mid.1.qkv.weight"].shape == (48, 16, 1, 1)
    assert sd["dec_out.2.weight"].shape == (3, 8, 3, 3)
    # the shared core: the dynamics auto-encoder of the same size has the same layout
    lmae = LMAE(num_down=1, base_channels=8, norm_groups=4)
    assert {k: v.shape for k, v in lmae.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    with pytest.raises(ValueError, match="PixelVAE"):
        LMAE(output="image", **TINY)  # type: ignore[arg-type]


# ---------------------------------------------------------------- eq. 4 / 8


def test_kl_matches_closed_form() -> None:
    zeros = torch.zeros(2, 4, 8, 8)
    assert kl_divergence(zeros, zeros).item() == 0.0
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)
    torch.testing.assert_close(kl_divergence(mu, logvar), by_hand.mean())
    torch.testing.assert_close(kl_divergence(mu, logvar, reduction="batchmean"), by_hand.sum() / 2)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl_divergence(mu, logvar), reference.mean())
    assert kl_divergence(mu, logvar) > 0
    assert kl_divergence(torch.zeros(3), torch.full((3,), 0.5)) > 0


def test_sample_is_eq4_and_seeded() -> None:
    mu, logvar = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    z1 = LMAE.sample(mu, logvar, torch.Generator().manual_seed(3))
    z2 = LMAE.sample(mu, logvar, torch.Generator().manual_seed(3))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(z1, mu + (0.5 * logvar).exp() * eps)
    model = LMAE(**TINY)
    dyn = smooth_dynamics(1, 32, 0)
    out = model(dyn, sample=False)
    torch.testing.assert_close(out["z"], out["mu"])


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean PSNR over frames, each capped at 100 dB (identical frames)."""
    return frame_psnr(pred, target).clamp(max=100.0).mean()


def test_losses_basic() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert dynamics_mse(x, x).item() == 0.0
    torch.testing.assert_close(dynamics_mse(x, x + 0.1), torch.tensor(0.01))
    assert psnr(x, x).item() == pytest.approx(100.0)
    torch.testing.assert_close(psnr(x, (x + 0.1)), torch.tensor(20.0))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("extras", [{}, {"grid_mode": "offset", "upsample": "bilinear", "affine_head": True}])
def test_gradient_reaches_every_parameter(extras: dict) -> None:
    # Zero-initialised branches get their gradient once the last conv moves,
    # so take two steps first and then require a gradient everywhere.
    torch.manual_seed(0)
    model = LMAE(**TINY, **extras)
    dyn = smooth_dynamics(2, 32, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3):
        opt.zero_grad()
        out = model(dyn)
        loss = dynamics_mse(out["dynamics"], dyn) + 1e-4 * kl_divergence(out["mu"], out["logvar"])
        loss.backward()
        if _ < 2:
            opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_short_overfit_lowers_mse() -> None:
    torch.manual_seed(0)
    model = LMAE(**TINY)
    dyn = smooth_dynamics(2, 32, 7)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    with torch.no_grad():
        start = dynamics_mse(model(dyn, sample=False)["dynamics"], dyn).item()
    for _ in range(60):
        out = model(dyn, sample=False)
        loss = dynamics_mse(out["dynamics"], dyn) + 1e-4 * kl_divergence(out["mu"], out["logvar"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = dynamics_mse(model(dyn, sample=False)["dynamics"], dyn).item()
    assert end < 0.1 * start, (start, end)
    # and better than the "no motion" guess (identity grid, mean occlusion),
    # so the latent carries the motion, not just the coordinate ramp
    still = torch.cat([identity_grid(32, 32).expand(2, -1, -1, -1), dyn[:, 2:].mean().expand(2, 1, 32, 32)], 1)
    assert end < dynamics_mse(still, dyn).item(), (end, dynamics_mse(still, dyn).item())
