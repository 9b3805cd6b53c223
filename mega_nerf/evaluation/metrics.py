"""Image-quality metrics as NeRF papers report them: PSNR, SSIM and LPIPS (AlexNet and VGG).

Images are (H, W, 3) float tensors in [0, 1], on CPU or CUDA. PSNR and SSIM are computed in float64 so that
the reported numbers do not depend on the device. SSIM is torchmetrics' (nerfstudio's), not our own, so that our
numbers and nerfstudio's compare; LPIPS lives in `mega_nerf.evaluation.lpips`.
"""
from __future__ import annotations

import importlib.metadata
import math

import torch

from mega_nerf.evaluation.lpips import LPIPS, NETS

SSIM_WINDOW = 11  # the Gaussian window's side (sigma 1.5): images must be at least this large
SSIM_IMPLEMENTATION = (
    f"torchmetrics {importlib.metadata.version('torchmetrics')} structural_similarity_index_measure, "
    "as nerfstudio reports SSIM: "
    "11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 1, each channel reflect-padded by 5 pixels and "
    "the SSIM map averaged over every pixel (torchmetrics >= 1.4.2; up to 1.4.1 it averaged the valid region "
    "only), in float64")


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 3:
        raise ValueError(f"expected two (H, W, 3) images, got {tuple(pred.shape)} and {tuple(target.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(1 / MSE) over all pixels and channels; inf for identical images. pred, target: (H, W, 3)."""
    _check_pair(pred, target)
    mse = float((pred.double() - target.double()).square().mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004) as nerfstudio reports it (SSIM_IMPLEMENTATION), in float64 so that the number
    does not depend on the device. pred, target: (H, W, 3) with H, W >= SSIM_WINDOW."""
    _check_pair(pred, target)
    if min(pred.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images at least {SSIM_WINDOW} pixels a side, got {tuple(pred.shape)}")
    # Imported here: torchmetrics takes seconds to import, and every command that parses a config file imports
    # this module (cli.options.options_of_every_command), training included.
    from torchmetrics.functional.image import structural_similarity_index_measure

    # torchmetrics takes (N, C, H, W) batches.
    x, y = (image.double().permute(2, 0, 1).unsqueeze(0) for image in (pred, target))
    return float(structural_similarity_index_measure(x, y, data_range=1.0))


def image_metrics(pred: torch.Tensor, target: torch.Tensor, lpips_nets: dict[str, LPIPS | None]
                  ) -> dict[str, float | None]:
    """{"psnr", "ssim", "lpips_alex", "lpips_vgg"} for one (H, W, 3) image pair in [0, 1].

    lpips_nets: as from `load_lpips_nets`; an absent or None backbone gives None (reported as unavailable).
    """
    metrics: dict[str, float | None] = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    for net in NETS:
        model = lpips_nets.get(net)
        metrics[f"lpips_{net}"] = None if model is None else model(pred, target)
    return metrics
