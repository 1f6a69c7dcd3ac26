"""PSNR / SSIM against torchmetrics and by hand; LPIPS offline loading and skip reasons."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from microscope_pl.metrics.common import MetricUnavailable
from microscope_pl.metrics.image import LPIPSMetric, image_quality, lpips_backbone_path, psnr, ssim


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 32, 32, generator=g)
    pred = (target + 0.05 * torch.randn(3, 3, 32, 32, generator=g)).clamp(0, 1)
    return pred, target


def test_psnr_single_image_by_hand(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, target = pair[0][:1], pair[1][:1]
    mse = float(((pred - target) ** 2).mean())
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-5)


def test_psnr_ssim_equal_torchmetrics(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, target = pair
    per_frame = peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3), reduction="none")
    assert psnr(pred, target) == pytest.approx(float(per_frame.mean()), rel=1e-6)
    assert ssim(pred, target) == pytest.approx(float(structural_similarity_index_measure(pred, target, data_range=1.0)))
    # Clips b n 3 h w are flattened to frames.
    assert psnr(pred[None], target[None]) == pytest.approx(psnr(pred, target))
    assert ssim(target, target) == pytest.approx(1.0, abs=1e-6)


def test_image_quality_is_float32_inside_bf16_autocast() -> None:
    # a bf16-mixed test step: SSIM's window sums in bf16 cancel to noise on smooth images
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=64, mode="bilinear") * 0.5 + 0.4
    pred = (target + 0.01 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    def lpips(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a conv, as LPIPS's network is
        return torch.nn.functional.conv2d(p, torch.full((1, 3, 3, 3), 1 / 27)).sub(t[:, :1, 1:-1, 1:-1]).abs().mean()

    ref = image_quality(pred, target, lpips)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = image_quality(pred, target, lpips)
    assert ref["ssim"] > 0.9 and float(mixed["ssim"]) == pytest.approx(float(ref["ssim"]), abs=1e-6)
    assert float(mixed["lpips"]) == pytest.approx(float(ref["lpips"]), rel=1e-5)
    assert torch.allclose(mixed["psnr"], ref["psnr"])


def test_psnr_cap_keeps_identical_frames_finite(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pred, target = pair
    mixed = torch.cat([target[:1], pred[1:]])
    assert math.isinf(psnr(mixed, target))
    assert math.isfinite(psnr(mixed, target, cap=100.0))


def test_shape_mismatch_raises(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="pred shape"):
        psnr(pair[0], pair[1][:2])


def test_lpips_missing_backbone_names_file(tmp_path) -> None:
    missing = tmp_path / "alexnet-owt-7be5be79.pth"
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth"):
        LPIPSMetric("alex", backbone_path=missing)
    assert lpips_backbone_path("vgg").name == "vgg16-397923af.pth"


def test_lpips_random_backbone_warns_and_runs(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.warns(UserWarning, match="NOT LPIPS"):
        m = LPIPSMetric("alex", pretrained_backbone=False)
    pred, target = pair
    assert m(target, target) == pytest.approx(0.0, abs=1e-6)
    assert m(pred, target) > 0


def test_lpips_loads_backbone_from_local_file(tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    m = LPIPSMetric("alex", backbone_path=path)
    assert torch.equal(m.model.net.slice1[0].weight, features[0].weight)
    assert torch.equal(m.model.net.slice5._modules["10"].bias, features[10].bias)  # torchvision index kept
