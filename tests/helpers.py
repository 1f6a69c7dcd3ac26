"""Shared pieces of the CLI tests: tiny network settings and short runs."""
from __future__ import annotations

from pathlib import Path

from microscope_pl.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_FDE = [
    "--model.init_args.image_size", "64", "--model.init_args.network.block_expansion", "8",
    "--model.init_args.network.max_features", "16", "--model.init_args.network.motion_block_expansion", "8",
    "--model.init_args.network.motion_max_features", "16", "--model.init_args.network.motion_num_blocks", "3",
    "--model.init_args.network.num_res_blocks", "1", "--model.init_args.network.num_regions", "4",
    "--model.init_args.loss.scales", "[1.0]", "--model.init_args.lpips", "off",
]
TINY_LMAE = [
    "--model.init_args.image_size", "64", "--model.init_args.network.base_channels", "8",
    "--model.init_args.network.num_down", "3", "--model.init_args.network.channel_mult", "[1, 1, 2, 2]",
    "--model.init_args.network.norm_groups", "4",
    "--model.init_args.loss.scales", "[1.0]", "--model.init_args.lpips", "off",
]


def data_args(root: Path) -> list[str]:
    return ["--data.init_args.data_root", str(root), "--data.init_args.image_size", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.samples_per_video", "1", "--data.init_args.val_samples", "2"]


SHORT_RUN = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1"]


def fit(phase_config: str, root: Path, *extra: str) -> int:
    return main(["fit", "--config", str(REPO / "configs" / phase_config), *data_args(root), *extra])
