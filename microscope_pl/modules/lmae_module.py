"""Phase 2: train the latent motion auto-encoder with FDE frozen (eq. 6-9)."""
from __future__ import annotations

from typing import Any

import torch

from microscope_pl.models.fde import FDE
from microscope_pl.models.lmae import LMAE
from microscope_pl.models.losses import dynamics_mse, kl_divergence
from microscope_pl.models.perceptual import PerceptualLoss
from microscope_pl.models.visualize import flow_to_color, image_row
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.fde_module import FDE_NETWORK_ARGS
from microscope_pl.modules.media import log_images
from microscope_pl.phases import load_frozen, load_upstream, require_equal, sub_state_dict


def fde_from_upstream(module: PhaseModule, phase: str, ckpt_path: str | None) -> tuple[FDE, dict]:
    """The frozen FDE from `module`'s upstream checkpoint, and that checkpoint.

    Records the FDE settings and the upstream path/sha256 in `module.hparams`
    so its own checkpoints are self-sufficient (inference then needs only the
    last checkpoint).
    """
    ckpt, info = load_upstream(phase, ckpt_path)
    upstream_hp = ckpt.get("hyper_parameters", {})
    require_equal("image_size", module.hparams.image_size, upstream_hp.get("image_size"))
    fde_config = upstream_hp.get("fde_config") or {k: upstream_hp[k] for k in FDE_NETWORK_ARGS if k in upstream_hp}
    fde = load_frozen(FDE(**fde_config), sub_state_dict(ckpt, "fde"))
    module.hparams.fde_config = dict(fde_config)
    module.hparams.upstream = {phase: info}
    return fde, ckpt


class LMAEModule(PhaseModule):
    """Trains LMAE on the dynamics [f; m] that the frozen FDE computes online.

    L = kl_weight * KL (eq. 8) + mse_weight * MSE (eq. 6) + igc_weight * IGC (eq. 7),
    where IGC is phase 1's perceptual loss on the frame FDE decodes from the
    LMAE reconstruction; its gradient flows through the frozen FDE decoder.
    """

    phase = "phase2"

    def __init__(
        self,
        image_size: int = 128,
        latent_channels: int = 4,
        num_down: int = 3,
        base_channels: int = 64,
        channel_mult: list[int] | None = None,
        num_res_blocks: int = 1,
        norm_groups: int = 32,
        mid_attention: bool = True,
        grid_mode: str = "absolute",
        upsample: str = "nearest",
        affine_head: bool = False,
        sample_latent: bool = True,
        kl_weight: float = 1e-4,
        mse_weight: float = 1.0,
        igc_weight: float = 1.0,
        perceptual_weights: str = "imagenet",
        perceptual_scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125),
        perceptual_layer_weights: tuple[float, ...] = (10.0, 10.0, 10.0, 10.0, 10.0),
        l1_weight: float = 0.0,
        l1_scales: tuple[float, ...] = (1.0,),
        train_fde: bool = False,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_steps: int = 100,
        lpips: str = "auto",
        fde_ckpt_path: str | None = None,
        fde_config: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            image_size: frame size (square); must equal the upstream FDE's.
            latent_channels: channels of z (4 in the paper).
            num_down: LMAE 2x downsamplings (3: H/32 and 768x; 2: H/16 and 192x).
            base_channels: LMAE width of the first level.
            channel_mult: LMAE width multipliers per level (num_down + 1 entries; null: 1, 2, 4, 4).
            num_res_blocks: residual blocks per LMAE level.
            norm_groups: GroupNorm groups in LMAE.
            mid_attention: self-attention at the lowest LMAE resolution.
            grid_mode: decoded grid as "absolute" (tanh of the grid) or "offset" (identity + offset).
            upsample: LMAE decoder upsampling, "nearest" or "bilinear".
            affine_head: the LMAE decoder adds a global affine displacement ("offset" only; see LMAE).
            sample_latent: train on z = mu + sigma * eps (eq. 4) rather than on mu.
            kl_weight: lambda_KL of eq. 9 (KL averaged over latent elements).
            mse_weight: lambda_MSE of eq. 9.
            igc_weight: lambda_IGC of eq. 9 (0 = the "w/o IGC" ablation).
            perceptual_weights: VGG19 weights for IGC ("imagenet", a path, or "random").
            perceptual_scales: image-pyramid scales of the VGG loss.
            perceptual_layer_weights: L1 weights of relu1_1..relu5_1 (trailing zeros skip layers).
            l1_weight: extra pixel L1 inside the IGC term (0 = the paper's).
            l1_scales: pyramid scales of that L1 term.
            train_fde: optimise FDE jointly from scratch (the "w/o TPC" ablation);
                needs fde_config and no upstream checkpoint.
            lr: Adam learning rate.
            betas: Adam betas.
            weight_decay: Adam weight decay.
            scheduler: "cosine" or "constant".
            warmup_steps: linear warm-up steps.
            lpips: "auto", "random" or "off" (see FDEModule).
            fde_ckpt_path: phase-1 checkpoint; default checkpoints/phase1/{best,last}.ckpt.
            fde_config: FDE settings; filled in from the upstream checkpoint (leave empty)
                except for train_fde, where they define the FDE trained from scratch.
            upstream: filled in automatically: the upstream checkpoint's path and sha256.
        """
        super().__init__()
        self.save_hyperparameters()
        if train_fde:
            if not fde_config or igc_weight <= 0:
                raise ValueError(f"train_fde=True (w/o TPC) needs model.fde_config (got {fde_config!r}) "
                                 f"and an image loss, igc_weight > 0 (got {igc_weight})")
            self.fde = FDE(**fde_config)
        elif fde_config:  # restoring this phase's own checkpoint: weights come from its state_dict
            self.fde = load_frozen(FDE(**fde_config))
        else:
            self.fde, _ = fde_from_upstream(self, "phase1", fde_ckpt_path)
        self.lmae = LMAE(
            in_channels=3, latent_channels=latent_channels, num_down=num_down, base_channels=base_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, norm_groups=norm_groups,
            mid_attention=mid_attention, output="dynamics", grid_mode=grid_mode, upsample=upsample,
            affine_head=affine_head,
        )
        self.loss_fn = PerceptualLoss(weights=perceptual_weights, scales=perceptual_scales,
                                      layer_weights=perceptual_layer_weights, l1_weight=l1_weight,
                                      l1_scales=l1_scales)

    def lmae_config(self) -> dict[str, Any]:
        """The LMAE constructor arguments; the diffusion phase rebuilds LMAE from these."""
        hp = self.hparams
        return {"in_channels": 3, "latent_channels": hp.latent_channels, "num_down": hp.num_down,
                "base_channels": hp.base_channels, "channel_mult": hp.channel_mult,
                "num_res_blocks": hp.num_res_blocks, "norm_groups": hp.norm_groups,
                "mid_attention": hp.mid_attention, "output": "dynamics",
                "grid_mode": self.lmae.grid_mode, "flow_scale": self.lmae.flow_scale,
                "upsample": hp.upsample, "affine_head": hp.affine_head}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lmae_config"] = self.lmae_config()  # not a hyperparameter: LightningCLI would pass it to __init__

    # ------------------------------------------------------------ eq. 6-9
    def _round_trip(self, batch: dict[str, torch.Tensor], sample: bool) -> dict[str, torch.Tensor]:
        source, driving = batch["source"], batch["driving"]
        with torch.set_grad_enabled(self.hparams.train_fde and torch.is_grad_enabled()):
            dyn = self.fde.dynamics(source, driving)
            features = self.fde.encode(source)
        out = self.lmae(dyn, sample=sample)
        frame = self.fde.decode(features, out["dynamics"])  # gradient reaches LMAE through frozen D
        return {"target_dynamics": dyn, "features": features, "frame": frame, **out}

    def losses(self, out: dict[str, torch.Tensor], driving: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        terms = {
            "kl": kl_divergence(out["mu"], out["logvar"]),
            "mse": dynamics_mse(out["dynamics"], out["target_dynamics"]),
            "igc": self.loss_fn(out["frame"], driving) if hp.igc_weight > 0 else torch.zeros((), device=driving.device),
        }
        terms["loss"] = hp.kl_weight * terms["kl"] + hp.mse_weight * terms["mse"] + hp.igc_weight * terms["igc"]
        return terms

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._round_trip(batch, sample=self.hparams.sample_latent)
        terms = self.losses(out, batch["driving"])
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=len(batch["source"]))
        return terms["loss"]

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int) -> None:
        source, driving = batch["source"], batch["driving"]
        out = self._round_trip(batch, sample=False)
        terms = self.losses(out, driving)
        fde_frame = self.fde.decode(out["features"], out["target_dynamics"])
        metrics: dict[str, Any] = dict(terms)
        metrics.update({f"mdcf_{k}": v for k, v in self.image_metrics(out["frame"], driving).items()})
        metrics.update({f"fde_{k}": v for k, v in self.image_metrics(fde_frame, driving).items()})
        metrics["copy_source_psnr"] = self.image_metrics(source, driving)["psnr"]
        metrics["compression_ratio"] = LMAE.compression_ratio(source.shape, out["mu"].shape)
        metrics["latent_mu_abs"] = out["mu"].abs().mean()
        metrics["latent_sigma"] = torch.exp(0.5 * out["logvar"]).mean()
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=len(source))
        if stage == "val" and batch_idx == 0 and self.global_rank == 0:
            before, after = out["target_dynamics"][:4], out["dynamics"][:4]
            rows = [image_row(d, f, r, flow_to_color(b[None, :2])[0], flow_to_color(a[None, :2])[0], b[2:], a[2:])
                    for d, f, r, b, a in zip(driving, fde_frame, out["frame"], before, after)]
            log_images(self, "val/driving|fde|mdcf|flow|flow_rt|occ|occ_rt", torch.cat(rows, dim=1))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)
