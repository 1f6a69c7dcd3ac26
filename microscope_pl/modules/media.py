"""Images and videos for TensorBoard from any phase's LightningModule.

Videos are animated GIFs in TensorBoard's image dashboard, the format its
``add_video`` writes; Pillow encodes them here, so no moviepy is needed.
"""
from __future__ import annotations

import io
from typing import Any

import torch


def _experiment(module: Any) -> Any:
    """The TensorBoard SummaryWriter of ``module``'s logger, or None."""
    experiment = getattr(getattr(module, "logger", None), "experiment", None)
    return experiment if experiment is not None and hasattr(experiment, "add_image") else None


def log_images(module: Any, tag: str, row: torch.Tensor) -> None:
    """Add a ``3 H W`` image in [0, 1] to TensorBoard when that logger is in use."""
    experiment = _experiment(module)
    if experiment is not None:
        experiment.add_image(tag, row.clamp(0, 1).cpu(), module.global_step)


def gif_bytes(frames: torch.Tensor, fps: float = 25.0) -> bytes:
    """``n 3 H W`` frames in [0, 1] -> an animated GIF that loops."""
    from PIL import Image

    array = (frames.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(a) for a in array]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, int(round(1000 / fps))), loop=0)
    return buffer.getvalue()


def log_video(module: Any, tag: str, frames: torch.Tensor, fps: float = 25.0) -> None:
    """Add ``n 3 H W`` frames in [0, 1] to TensorBoard as a video (an animated GIF)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    experiment = _experiment(module)
    if not isinstance(experiment, SummaryWriter):  # another logger, or fast_dev_run's dummy
        return

    height, width = frames.shape[-2:]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
    experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                              module.global_step)
