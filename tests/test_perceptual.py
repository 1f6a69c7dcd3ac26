"""Tests of the VGG19 perceptual loss (paper eq. 5 / 7) and the equivariance extra."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from microscope_pl.models import perceptual
from microscope_pl.models.fde import FDE
from microscope_pl.models.perceptual import (VGG19_FILENAME, EquivarianceLoss, PerceptualLoss,
                                             VGG19Features)

SCALES = (1.0, 0.5, 0.25)  # 64 px images: 16 px at 0.25 is the minimum for relu5_1


@pytest.fixture(scope="module")
def loss() -> PerceptualLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PerceptualLoss("random", scales=SCALES)


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Empty torch hub dir, no env var, and a download that fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("MICROSCOPE_VGG19_WEIGHTS", raising=False)

    def fail() -> None:
        raise OSError("no network in tests")

    monkeypatch.setattr(perceptual, "_download_vgg19", fail)
    return tmp_path / "hub" / "checkpoints" / VGG19_FILENAME


def test_zero_for_identical_and_grows_with_noise(loss: PerceptualLoss) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    noise = torch.randn_like(x)
    assert loss(x, x).item() == 0.0
    values = [loss((x + s * noise).clamp(0, 1), x).item() for s in (0.02, 0.1, 0.3)]
    assert 0 < values[0] < values[1] < values[2], values


def test_differentiable_and_frozen(loss: PerceptualLoss) -> None:
    x = torch.rand(1, 3, 64, 64)
    pred = torch.rand(1, 3, 64, 64, requires_grad=True)
    loss(pred, x).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert list(loss.parameters()) == [] and len(loss.state_dict()) == 0
    assert all(not p.requires_grad and p.grad is None for p in loss.backbone.parameters())
    loss.train()
    assert not loss.backbone.training
    loss.double()
    assert next(loss.backbone.parameters()).dtype == torch.float64
    loss.float()


def test_random_warns_and_is_deterministic() -> None:
    with pytest.warns(UserWarning, match="NOT the paper"):
        a = VGG19Features("random", num_layers=2, seed=1)
    with pytest.warns(UserWarning):
        b = VGG19Features("random", num_layers=2, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len(a(torch.rand(1, 3, 32, 32))) == 2


def test_imagenet_missing_raises_clear_error(no_weights: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        PerceptualLoss("imagenet")
    assert str(no_weights) in str(info.value)
    assert "perceptual_weights: random" in str(info.value)


def test_imagenet_env_var_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vgg.pth"
    monkeypatch.setenv("MICROSCOPE_VGG19_WEIGHTS", str(missing))
    with pytest.raises(RuntimeError, match="nowhere"):
        VGG19Features("imagenet")


def test_imagenet_local_file_and_path_loading(no_weights: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        ref = VGG19Features("random", seed=5)
    # torchvision layout ("features.N.weight" + classifier keys) in the hub cache
    full = {f"features.{k}": v for k, v in ref.layers.state_dict().items()}
    full["classifier.0.weight"] = torch.zeros(1)
    no_weights.parent.mkdir(parents=True)
    torch.save(full, no_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random" warning on the real path
        net = VGG19Features("imagenet")
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))
    # features-only state dict given as a path
    path = tmp_path / "vgg_features.pth"
    torch.save(ref.layers.state_dict(), path)
    loss = PerceptualLoss(str(path), scales=(1.0,), layer_weights=(10.0, 10.0))
    assert all(torch.equal(p, q) for p, q in zip(loss.backbone.parameters(),
                                                 list(ref.parameters())[:4]))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        VGG19Features(str(tmp_path / "missing.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        VGG19Features(str(bad))


def test_options() -> None:
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        short = PerceptualLoss("random", scales=(1.0,), layer_weights=(10.0, 0.0, 0.0, 0.0, 0.0))
        pixel = PerceptualLoss("random", scales=(1.0,), layer_weights=(0.0,), l1_weight=2.0)
        small = PerceptualLoss("random", scales=(1.0, 0.125))
    assert short.backbone.num_layers == 1
    assert torch.allclose(pixel(x, y), 2.0 * (x - y).abs().mean())
    with pytest.raises(ValueError, match="scale 0.125"):
        small(x, y)


def test_l1_pyramid_sees_displacements_beyond_a_pixel() -> None:
    # a blob shifted by 6 px: at full resolution the warp's gradient w.r.t. the
    # shift is (almost) blind to it; the coarse scales of the pyramid see it
    from microscope_pl.models.fde import identity_grid, warp

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    blob = lambda cx: torch.exp(-((xx - cx) ** 2 + (yy - 32) ** 2) / 8.0).expand(1, 3, 64, 64)  # noqa: E731
    target, source = blob(38.0), blob(32.0)
    full = PerceptualLoss("random", layer_weights=(0.0,), l1_weight=1.0)
    pyramid = PerceptualLoss("random", layer_weights=(0.0,), l1_weight=1.0, l1_scales=(1.0, 0.5, 0.25, 0.125))
    grads = []
    for loss in (full, pyramid):
        shift = torch.zeros(1, requires_grad=True)  # grid x offset, normalised units
        grid = identity_grid(64, 64) - torch.stack([shift, torch.zeros(1)]).view(1, 2, 1, 1)
        loss(warp(source, grid), target).backward()
        grads.append(shift.grad.item())
    # a positive shift moves the content right, towards the target: the gradient is negative
    assert grads[1] < 0 and abs(grads[1]) > 4 * abs(grads[0])
    with pytest.raises(ValueError, match="l1_scales"):
        PerceptualLoss("random", layer_weights=(0.0,), l1_scales=())


def test_equivariance_loss() -> None:
    torch.manual_seed(0)
    fde = FDE(block_expansion=8, max_features=16, motion_block_expansion=8, motion_max_features=16,
              motion_num_blocks=3, num_regions=4, num_res_blocks=1)
    image = torch.rand(2, 3, 64, 64)
    shift = fde.regions(image)["shift"]
    region_fn = lambda x: fde.regions(x)["shift"]  # noqa: E731
    # the identity transform: nothing moves
    zero = EquivarianceLoss(sigma_affine=0.0, sigma_tps=0.0)(region_fn, image, shift)
    assert zero.item() < 1e-5
    value = EquivarianceLoss()(region_fn, image, shift)
    value.backward()
    assert value.item() > 0
    assert fde.region_predictor.head.weight.grad is not None
