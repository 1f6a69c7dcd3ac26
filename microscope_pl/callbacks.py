"""Training callbacks shared by the phases."""
from __future__ import annotations

import hashlib

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DDPConsistencyCheck(Callback):
    """At the end of fit, compare the weights of every rank and fail loudly if
    they differ (a desynchronised DDP run would otherwise go unnoticed)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        digest = weights_digest(pl_module)
        code = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=pl_module.device)
        codes = pl_module.all_gather(code).reshape(-1).tolist()
        if len(set(codes)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {codes}")
        if trainer.is_global_zero:
            print(f"ddp-consistency: weights identical on {trainer.world_size} ranks (sha256 {digest[:16]})", flush=True)
