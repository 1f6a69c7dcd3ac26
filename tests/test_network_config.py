"""Network settings as typed data: round trips, refusals and what each config builds."""
from __future__ import annotations

import pytest
import torch

from microscope_pl.models.config import (DenoiserConfig, FDEConfig, LMAEConfig, PBNetConfig, PixelVAEConfig,
                                         from_dict, to_dict)
from microscope_pl.modules.settings import OptimizerConfig


def test_round_trip_through_plain_dicts_keeps_nested_extras():
    config = from_dict(FDEConfig, {"block_expansion": 8, "extras": {"source_skip": True}})
    assert config.extras.source_skip and not config.extras.global_alignment and config.max_features == 256
    plain = to_dict(config)
    assert isinstance(plain["extras"], dict) and from_dict(FDEConfig, plain) == config
    assert from_dict(FDEConfig, None) == FDEConfig()  # the paper's defaults


def test_unknown_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="FDEConfig has no setting.*block_width"):
        from_dict(FDEConfig, {"block_width": 8})
    with pytest.raises(ValueError, match="DenoiserExtras has no setting.*window"):
        from_dict(DenoiserConfig, {"extras": {"window": 3}})


def test_extras_reach_the_networks():
    fde = from_dict(FDEConfig, {"block_expansion": 8, "max_features": 16, "num_regions": 2,
                                "motion_block_expansion": 8, "motion_max_features": 16, "motion_num_blocks": 2,
                                "num_res_blocks": 1, "extras": {"source_skip": True, "global_alignment": True}}).build()
    assert fde.source_skip and fde.global_alignment
    lmae = from_dict(LMAEConfig, {"base_channels": 8, "norm_groups": 4, "grid_mode": "offset",
                                  "extras": {"upsample": "bilinear", "affine_head": True}}).build()
    assert lmae.grid_mode == "offset" and lmae.latent_channels == 4
    unet = from_dict(DenoiserConfig, {"base_channels": 16, "channel_mult": [1], "attn_levels": [0], "num_heads": 2,
                                      "cond_dim": 16, "image_cond_channels": 8, "extras": {"audio_context": 2}}).build(4)
    assert unet.audio_dim == 80
    out = PixelVAEConfig(base_channels=8, num_down=2, norm_groups=4).build()(torch.rand(1, 3, 16, 16), sample=False)
    assert out["frame"].shape == (1, 3, 16, 16)
    assert PBNetConfig(d_model=16, num_heads=2, latent_dim=8).build().motion_std.shape == (8,)


def test_optimizer_schedules():
    assert OptimizerConfig().build([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 2e-4
    cosine = OptimizerConfig(scheduler="cosine", warmup_steps=10).cosine_factor(110)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == 1.0 and cosine(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="scheduler must be"):
        OptimizerConfig(scheduler="linear")
    spent = [0.0]  # a time budget ends the decay even when the step horizon is far away
    timed = OptimizerConfig(scheduler="cosine", warmup_steps=10).cosine_factor(10**6, lambda: spent[0])
    assert timed(20) == pytest.approx(1.0, abs=1e-3)
    spent[0] = 0.5
    assert timed(20) == pytest.approx(0.55, abs=1e-3)
    spent[0] = 1.0
    assert timed(20) == pytest.approx(0.1) and timed(5) == pytest.approx(0.6)  # warm-up first


def test_cosine_schedule_decays_over_the_time_budget(tmp_path) -> None:
    """`max_time` with a far step horizon (max_epochs 1000, as the configs): the learning
    rate still ends the budget near 10 %, where a step-only horizon would leave it at ~100 %."""
    from lightning.pytorch import Trainer

    from microscope_pl.modules.base import PhaseModule

    class Linear(PhaseModule):
        def __init__(self) -> None:
            super().__init__()
            self.optim = OptimizerConfig(lr=0.1, scheduler="cosine", warmup_steps=1)
            self.layer = torch.nn.Linear(4, 1)

        def _step(self, batch, stage):
            return self.layer(batch[0]).pow(2).mean()

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(64, 4)), batch_size=1)
    trainer = Trainer(max_epochs=1000, max_time={"seconds": 3}, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.fit(Linear(), data)
    assert trainer.global_step > 10
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.03
