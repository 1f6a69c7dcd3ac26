"""Evaluation metrics of the paper (section 4.1, appendix A.3) plus reconstruction metrics.

Metrics that need pretrained weights load them from local files only and
raise :class:`MetricUnavailable` naming the missing file; folder evaluation
(``microscope_pl.metrics.evaluate``, CLI ``microscope eval``) lists those as
skipped with the reason.
"""

from microscope_pl.metrics.clips import clip_fs, clip_metrics, fs_figures, fs_summary
from microscope_pl.metrics.common import MetricUnavailable, Skipped
from microscope_pl.metrics.flow_smoothness import farneback_flow, flow_smoothness, fs_error, fs_of_flow, fs_per_field
from microscope_pl.metrics.frechet import FID, FVD, GaussianStats, I3DFeatures, InceptionFeatures, fid, frechet_distance
from microscope_pl.metrics.identity import ArcFaceEmbedder, DlibFaceEmbedder, build_identity_embedder, csim
from microscope_pl.metrics.image import LPIPSMetric, frame_psnr, frame_ssim, image_quality, psnr, ssim
from microscope_pl.metrics.sync import LSE, SyncNet, SyncResult, load_syncnet, sync_correlation, sync_offset_search

__all__ = [
    "FID", "FVD", "LSE", "ArcFaceEmbedder", "DlibFaceEmbedder", "GaussianStats", "I3DFeatures",
    "InceptionFeatures", "LPIPSMetric", "MetricUnavailable", "Skipped", "SyncNet", "SyncResult",
    "build_identity_embedder", "clip_fs", "clip_metrics", "csim", "farneback_flow", "fid", "flow_smoothness",
    "frame_psnr", "frame_ssim", "frechet_distance", "fs_error", "fs_figures", "fs_of_flow", "fs_per_field",
    "fs_summary", "image_quality", "load_syncnet", "psnr", "ssim", "sync_correlation", "sync_offset_search",
]
