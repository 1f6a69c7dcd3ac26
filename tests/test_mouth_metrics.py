"""Mouth crops and the mouth PSNR that phases 1 and 2 report in validation."""
from __future__ import annotations

import pytest
import torch

from microscope_pl.metrics.image import frame_psnr
from microscope_pl.models.losses import mouth_crops
from microscope_pl.modules.fde_module import FDEModule

TINY_FDE = {"block_expansion": 8, "max_features": 16, "num_regions": 2, "motion_block_expansion": 8,
            "motion_max_features": 16, "motion_num_blocks": 2, "num_res_blocks": 1}


def test_mouth_crops_resample_the_box_and_skip_samples_without_one() -> None:
    images = torch.rand(3, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [-1.0, -1.0, -1.0, -1.0], [4.0, 8.0, 12.0, 16.0]])
    crops = mouth_crops(images, boxes, 8)
    assert crops.shape == (2, 3, 8, 8)  # the box-less sample is left out
    torch.testing.assert_close(crops[0], torch.nn.functional.avg_pool2d(images[0:1], 2)[0])  # whole frame at 1/2
    torch.testing.assert_close(mouth_crops(images[2:], boxes[2:], 8)[0], images[2, :, 8:16, 4:12])  # pixel for pixel

    images.requires_grad_(True)
    mouth_crops(images[2:], boxes[2:], 8).sum().backward()
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[8:16, 4:12] = True
    assert bool((images.grad[2][:, inside] > 0).all()) and float(images.grad[2][:, ~inside].abs().sum()) == 0.0


def test_mouth_psnr_sees_only_the_box() -> None:
    module = FDEModule(image_size=32, network=TINY_FDE, loss={"weights": "random"}, lpips="off")
    target = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[8.0, 16.0, 24.0, 32.0], [8.0, 16.0, 24.0, 32.0]])
    outside = target.clone()
    outside[:, :, :16] = 1 - outside[:, :, :16]  # wrong above the box only
    assert float(module.mouth_psnr(outside, target, boxes)) == 100.0  # clamped where equal
    inside = target.clone()
    inside[:, :, 16:, 8:24] += 0.1
    expected = frame_psnr(inside[:, :, 16:, 8:24].clamp(0, 1), target[:, :, 16:, 8:24]).mean()  # the 16 px box at 16 px
    assert float(module.mouth_psnr(inside, target, boxes)) == pytest.approx(float(expected), rel=1e-4)
    assert module.mouth_psnr(inside, target, None) is None
    assert module.mouth_psnr(inside, target, torch.full((2, 4), -1.0)) is None


def test_validation_logs_the_mouth_psnr_of_pairs_with_boxes() -> None:
    torch.manual_seed(0)
    module = FDEModule(image_size=64, network=TINY_FDE, loss={"weights": "random", "scales": [1.0, 0.5]}, lpips="off")
    logged: dict[str, float] = {}
    module.log_dict = lambda values, **_: logged.update({k: float(v) for k, v in values.items()})  # type: ignore
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    module.log_images = lambda *a, **k: None  # type: ignore[method-assign]
    batch = {"source": torch.rand(2, 3, 64, 64), "driving": torch.rand(2, 3, 64, 64),
             "mouth_box": torch.tensor([[20.0, 36.0, 44.0, 56.0]] * 2)}
    module.validation_step(batch, 1)
    assert any(k.endswith("mouth_psnr") for k in logged), sorted(logged)
    logged.clear()
    module.validation_step({k: v for k, v in batch.items() if k != "mouth_box"}, 1)
    assert logged and not any(k.endswith("mouth_psnr") for k in logged)
