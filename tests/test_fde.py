"""Tiny-config tests of the FDE network (stage 1), its grid helpers and visualisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from microscope_pl.models.blocks import apply_affine, identity_grid, nearest_upsample_conv, resize_grid, warp
from microscope_pl.models.fde import FDE
from microscope_pl.models.motion import compose_affines, covariance_to_affine, lucas_kanade_affine
from microscope_pl.models.visualize import flow_to_color, image_row

TINY = dict(block_expansion=8, max_features=16, motion_block_expansion=8, motion_max_features=16,
            motion_num_blocks=3, num_regions=4, num_res_blocks=1)


def tiny_fde(seed: int = 0, **kw: object) -> FDE:
    torch.manual_seed(seed)
    return FDE(**{**TINY, **kw})  # type: ignore[arg-type]


def smooth_images(b: int, size: int, seed: int) -> torch.Tensor:
    """Random smooth images ``b 3 size size`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 8, size // 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------
# shapes, ranges, configuration
# --------------------------------------------------------------------------


@pytest.mark.parametrize("downsample", [4, 8])
def test_shapes_and_ranges(downsample: int) -> None:
    fde = tiny_fde(downsample=downsample)
    assert fde.downsample == downsample
    src, dri = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    out = fde(src, dri)
    h = 64 // downsample
    assert out["frame"].shape == (2, 3, 64, 64)
    assert out["dynamics"].shape == (2, 3, h, h)
    assert out["heatmaps"].shape == (2, 4, 16, 16)
    assert out["shift"].shape == (2, 4, 2) and out["affine"].shape == (2, 4, 2, 2)
    assert out["mask"].shape == (2, 5, 16, 16)
    assert out["frame"].min() >= 0 and out["frame"].max() <= 1
    grid, occ = out["dynamics"][:, :2], out["dynamics"][:, 2]
    assert grid.abs().max() <= 1 + 1e-5
    assert occ.min() >= 0 and occ.max() <= 1
    assert torch.allclose(out["heatmaps"].sum(dim=(2, 3)), torch.ones(2, 4), atol=1e-4)
    feats = fde.encode(src)
    assert len(feats) == int(math.log2(downsample)) + 1
    assert feats[-1].shape[-2:] == (h, h)
    assert torch.equal(fde.dynamics(src, dri), out["dynamics"])


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="power of two"):
        FDE(downsample=6)
    with pytest.raises(ValueError, match="norm"):
        FDE(**TINY, norm="layer")  # type: ignore[arg-type]
    fde = tiny_fde()
    with pytest.raises(ValueError, match="too small"):
        fde(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))  # 4 px motion map, 3 blocks
    with pytest.raises(ValueError, match="divisible"):
        fde(torch.rand(1, 3, 66, 66), torch.rand(1, 3, 66, 66))


def test_batch_norm_variant_runs() -> None:
    out = tiny_fde(norm="batch", estimate_background=False)(torch.rand(2, 3, 64, 64),
                                                            torch.rand(2, 3, 64, 64))
    assert out["frame"].shape == (2, 3, 64, 64)
    assert torch.equal(out["bg_affine"][0], torch.eye(2, 3))


# --------------------------------------------------------------------------
# gradients and determinism
# --------------------------------------------------------------------------


def test_gradients_reach_every_parameter() -> None:
    # Every parameter lies on a path to the frame (regions -> sparse motions
    # and heatmap differences -> flow; background -> its sparse motion;
    # occlusion head -> bottleneck and skip blends). One listed exception at
    # initialisation: the background FC starts with zero weights (identity
    # affine), so the background *encoder* before it gets exactly zero
    # gradient until the first optimizer step moves the FC; checked below.
    fde = tiny_fde()
    src, dri = smooth_images(2, 64, 1), smooth_images(2, 64, 2)

    def dead() -> list[str]:
        fde.zero_grad(set_to_none=True)
        (fde(src, dri)["frame"] - dri).abs().mean().backward()
        return [n for n, p in fde.named_parameters()
                if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]

    assert all(n.startswith(("bg_predictor.first", "bg_predictor.down")) for n in dead()), dead()
    assert fde.bg_predictor is not None
    with torch.no_grad():
        fde.bg_predictor.fc.weight.normal_(0, 1e-3)  # what one Adam step does
    assert dead() == []


def test_flow_refinement_starts_at_the_region_mixture_near_identity() -> None:
    src, dri = smooth_images(2, 64, 1), smooth_images(2, 64, 2)
    plain, refined = tiny_fde(seed=3), tiny_fde(seed=3, flow_refinement=True)
    out = refined.motion(src, dri)
    # background first: most weight on the (identity) background motion at initialisation
    assert out["mask"][:, -1].mean() > 0.8
    assert (out["dynamics"][:, :2] - identity_grid(16, 16)).abs().mean() < 0.05
    # the residual head starts at zero: the flow is exactly the mixture of sparse motions
    mixture = torch.einsum("bkhw,bkchw->bchw", out["mask"], out["sparse"])
    torch.testing.assert_close(out["dynamics"][:, :2], resize_grid(mixture, (16, 16)).clamp(-1, 1))
    assert refined.flow_predictor.residual is not None and plain.flow_predictor.residual is None
    (refined(src, dri)["frame"] - dri).abs().mean().backward()
    assert refined.flow_predictor.residual.weight.grad.abs().sum() > 0  # and it learns
    with pytest.raises(ValueError, match="driving image"):
        refined.flow_predictor(src[:, :, :16, :16], {}, {}, None)


def _affine_grid(m: torch.Tensor, size: int) -> torch.Tensor:
    return apply_affine(m, identity_grid(size, size)[0])


def test_lucas_kanade_recovers_a_known_affine() -> None:
    src = smooth_images(3, 32, 5)
    angle = torch.tensor([0.04, -0.03, 0.0])
    scale = torch.tensor([1.03, 0.98, 1.0])
    truth = torch.zeros(3, 2, 3)
    truth[:, 0, 0] = truth[:, 1, 1] = scale * torch.cos(angle)
    truth[:, 0, 1], truth[:, 1, 0] = -scale * torch.sin(angle), scale * torch.sin(angle)
    truth[:, :, 2] = torch.tensor([[0.06, -0.04], [-0.05, 0.03], [0.0, 0.0]])
    dri = warp(src, _affine_grid(truth, 32))
    found = lucas_kanade_affine(src, dri)
    assert (found - truth).abs().max() < 0.02, (found - truth).abs().max()
    eye = torch.eye(2, 3).expand(3, 2, 3)
    assert (found[:, :, 2] - truth[:, :, 2]).abs().max() < 0.25 * (eye - truth).abs()[:2, :, 2].max()
    # flat images carry no motion: the identity, and nothing non-finite
    flat = torch.full((2, 3, 16, 16), 0.5)
    torch.testing.assert_close(lucas_kanade_affine(flat, flat), eye[:2])
    torch.testing.assert_close(compose_affines(eye[:1], truth[:1]), truth[:1])


def test_lucas_kanade_registers_synthetic_head_motion(synth_root) -> None:
    from microscope_pl.data.datasets import FramePairDataset
    from microscope_pl.models.blocks import antialias_resize
    from microscope_pl.metrics.image import frame_psnr

    def psnr(a, b):  # per frame, identical frames capped at 100 dB
        return frame_psnr(a, b).clamp(max=100.0)

    ds = FramePairDataset(synth_root, "train", 64, samples_per_video=6)
    src, dri = (torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("source", "driving"))
    found = lucas_kanade_affine(antialias_resize(src, (16, 16)), antialias_resize(dri, (16, 16)))
    gain = psnr(warp(src, _affine_grid(found, 16)), dri).mean() - psnr(src, dri).mean()
    assert gain > 2.0, gain  # 4.1 dB here; 4.3 dB on the 128 px held-out pairs (README)


def test_global_alignment_makes_the_background_motion_the_registration() -> None:
    src = smooth_images(2, 64, 6)
    shift = torch.tensor([[[1.0, 0.0, 0.08], [0.0, 1.0, -0.06]]]).expand(2, 2, 3)
    dri = warp(src, _affine_grid(shift, 64))
    plain, aligned = tiny_fde(seed=3), tiny_fde(seed=3, global_alignment=True)
    ident = torch.eye(2, 3).expand(2, 2, 3)
    torch.testing.assert_close(plain.motion(src, dri)["bg_affine"], ident)  # the learned FC starts at identity
    bg = aligned.motion(src, dri)["bg_affine"]
    assert (bg - shift).abs().max() < 0.02
    # so the source warped with the untrained FDE's flow is already close to the driving frame
    err = {name: (warp(src, fde.dynamics(src, dri)[:, :2]) - dri).abs().mean().item()
           for name, fde in (("plain", plain), ("aligned", aligned))}
    assert err["aligned"] < 0.5 * err["plain"], err
    loss = (aligned(src, dri)["frame"] - dri).abs().mean()
    loss.backward()  # the learned correction composed onto the registration still trains
    assert aligned.bg_predictor.fc.weight.grad.abs().sum() > 0


def test_determinism() -> None:
    src, dri = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    a = tiny_fde(seed=3)(src, dri)
    b = tiny_fde(seed=3)(src, dri)
    c = tiny_fde(seed=4)(src, dri)
    assert torch.equal(a["frame"], b["frame"]) and torch.equal(a["dynamics"], b["dynamics"])
    assert not torch.equal(a["frame"], c["frame"])


# --------------------------------------------------------------------------
# warp / grids (the A(., f) operator)
# --------------------------------------------------------------------------


def test_identity_grid_and_warp() -> None:
    x = torch.rand(2, 5, 12, 16)
    grid = identity_grid(12, 16).expand(2, -1, -1, -1)
    assert grid.shape == (2, 2, 12, 16)
    assert torch.allclose(warp(x, grid), x, atol=1e-6)
    # a grid shifted by one pixel to the right samples the right neighbour
    shifted = grid.clone()
    shifted[:, 0] += 2.0 / 16
    assert torch.allclose(warp(x, shifted)[..., :-1], x[..., 1:], atol=1e-5)
    # a coarse identity grid warps a fine feature map exactly too
    assert torch.allclose(warp(x, identity_grid(3, 4).expand(2, -1, -1, -1)), x, atol=1e-5)
    assert torch.allclose(resize_grid(identity_grid(8, 8), (32, 32)), identity_grid(32, 32),
                          atol=1e-6)
    assert torch.allclose(resize_grid(identity_grid(32, 32), (8, 8)), identity_grid(8, 8),
                          atol=1e-6)


def test_covariance_to_affine() -> None:
    torch.manual_seed(0)
    m = torch.randn(256, 2, 2)
    cov = m @ m.transpose(-1, -2) + 1e-2 * torch.eye(2)
    u, s = covariance_to_affine(cov)
    assert torch.allclose(torch.det(u), torch.ones(256), atol=1e-5)  # proper rotations
    a = u * s[..., None, :]
    err = (a @ a.transpose(-1, -2) - cov).abs().amax((-1, -2)) / cov.diagonal(0, -2, -1).sum(-1)
    assert err.median() < 1e-2  # exact up to the angle regulariser near the +45 deg cut
    # round regions: finite gradients (torch.svd's would be NaN) and no rotation
    iso = (0.05 * torch.eye(2)).repeat(3, 1, 1).requires_grad_()
    u, s = covariance_to_affine(iso)
    (u.sum() + s.sum()).backward()
    assert torch.isfinite(iso.grad).all()
    assert torch.allclose(u[0], u[1])


# --------------------------------------------------------------------------
# decode: foreign dynamics, broadcasting, identity reconstruction
# --------------------------------------------------------------------------


def test_decode_foreign_dynamics_and_broadcast() -> None:
    fde = tiny_fde().eval()
    src = torch.rand(1, 3, 64, 64)
    feats = fde.encode(src)
    dyn = torch.cat([identity_grid(8, 8) + 0.05 * torch.randn(3, 2, 8, 8),
                     torch.rand(3, 1, 8, 8)], dim=1)  # 8x8, not the model's 16x16
    with torch.no_grad():
        out = fde.decode(feats, dyn)
        ref = fde.decode([f.repeat(3, 1, 1, 1) for f in feats], dyn)
    assert out.shape == (3, 3, 64, 64)
    assert torch.allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="batch"):
        fde.decode([f.repeat(2, 1, 1, 1) for f in feats], dyn)
    with pytest.raises(ValueError, match="b 3 h w"):
        fde.decode(feats, dyn[:, :2])


def test_identity_dynamics_reconstruct_after_training() -> None:
    """Train encode/decode on identity dynamics; then the identity grid must
    reconstruct far better than a random smooth grid (the warp matters)."""
    fde = tiny_fde(num_res_blocks=1)
    gen = [p for n, p in fde.named_parameters()
           if not n.startswith(("region_predictor", "bg_predictor", "flow_predictor"))]
    opt = torch.optim.Adam(gen, lr=3e-3)
    size = 32
    ident = torch.cat([identity_grid(size // 4, size // 4).expand(8, -1, -1, -1),
                       torch.ones(8, 1, size // 4, size // 4)], 1)
    for step in range(100):
        x = smooth_images(8, size, 100 + step)
        loss = (fde.decode(fde.encode(x), ident) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = smooth_images(8, size, 7)
    g = torch.Generator().manual_seed(0)
    disp = F.interpolate(0.6 * torch.randn(8, 2, 2, 2, generator=g), size=(size // 4, size // 4),
                         mode="bilinear", align_corners=False)
    rand = torch.cat([(identity_grid(size // 4, size // 4) + disp).clamp(-1, 1),
                      torch.ones(8, 1, size // 4, size // 4)], 1)
    with torch.no_grad():
        feats = fde.encode(x)
        err_id = (fde.decode(feats, ident) - x).abs().mean().item()
        err_rand = (fde.decode(feats, rand) - x).abs().mean().item()
    assert err_id < 0.08, err_id  # ~0.06 after 100 steps; a wrong warp gives ~0.2
    assert err_id < 0.4 * err_rand, (err_id, err_rand)


# --------------------------------------------------------------------------
# visualisation
# --------------------------------------------------------------------------


def test_flow_to_color_and_image_row() -> None:
    grid = identity_grid(8, 8).expand(2, -1, -1, -1)
    white = flow_to_color(grid)
    assert white.shape == (2, 3, 8, 8) and torch.allclose(white, torch.ones_like(white))
    right = grid.clone()
    right[:, 0] += 0.1  # pure +x motion: hue 0, red
    col = flow_to_color(right)
    assert torch.allclose(col[:, 0], torch.ones(2, 8, 8)) and col[:, 1:].max() < 1e-5
    row = image_row(torch.rand(2, 3, 32, 32), torch.rand(1, 16, 16), right, torch.rand(3, 32, 32))
    assert row.shape == (3, 32, 128)
    assert row.min() >= 0 and row.max() <= 1


def test_bf16_autocast_keeps_coordinates_in_float32() -> None:
    fde = tiny_fde()
    src, dri = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fde(src, dri)
    assert out["dynamics"].dtype == torch.float32 and out["shift"].dtype == torch.float32
    assert torch.isfinite(out["frame"].float()).all()
    ref = fde.dynamics(src, dri)
    assert (out["dynamics"] - ref).abs().max() < 0.05
    x = torch.rand(1, 4, 16, 16)
    grid = identity_grid(16, 16)
    assert torch.allclose(warp(x.bfloat16(), grid).float(), x, atol=1e-2)


def test_warp_broadcasts_a_source_of_batch_one() -> None:
    x = torch.rand(1, 4, 16, 16)
    grid = identity_grid(16, 16).expand(3, -1, -1, -1) + 0.1 * torch.rand(3, 2, 16, 16)
    ref = warp(x.expand(3, -1, -1, -1).contiguous(), grid)
    assert torch.equal(warp(x, grid), ref)
    half = warp(x.bfloat16(), grid)
    assert half.dtype == torch.bfloat16 and half.shape == (3, 4, 16, 16)
    assert torch.allclose(half.float(), ref, atol=1e-2)


@pytest.mark.parametrize("size", [None, (10, 14), (11, 14)])
def test_nearest_upsample_conv_equals_upsample_then_conv(size) -> None:
    # exact 2x runs as four 2x2 convs at the source size; (11, 14) is not 2x and takes the plain path
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    out = nearest_upsample_conv(x, conv, size)
    ref = conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    refs = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(grads, refs))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert nearest_upsample_conv(x, conv, size).dtype == torch.bfloat16


def test_bf16_decoding_stays_close_to_float32() -> None:
    fde = tiny_fde().eval()
    src, dri = torch.rand(1, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        feats, dyn = fde.encode(src), fde.dynamics(src.expand(3, -1, -1, -1), dri)
        ref = fde.decode(feats, dyn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fde.decode(feats, dyn)
    assert out.dtype == torch.float32  # the last conv's output is cast up before the sigmoid
    assert 10 * torch.log10(1 / (out - ref).square().mean()) > 40  # dB
