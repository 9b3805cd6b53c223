"""Image-quality metrics as NeRF papers report them: PSNR, SSIM and LPIPS (AlexNet and VGG).

Images are (H, W, 3) float tensors in [0, 1], on CPU or CUDA. PSNR and SSIM are computed in float64 so that
the reported numbers do not depend on the device. SSIM follows torchmetrics' convention (the SSIM nerfstudio
reports; tests/test_metrics.py holds ours equal to torchmetrics' and to a scipy re-computation) with its Gaussian
window applied as two 1-D passes of shifted sums. Our own code so that eval never imports torchmetrics: on the
GPU machines that import took 8-14 s (their packages lack bytecode; 0.9 s on the development machine), almost all
of the first SSIM call (bench/RESULTS.md, tenth session). LPIPS lives in `mega_nerf.evaluation.lpips`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mega_nerf.evaluation.lpips import LPIPS, NETS

SSIM_WINDOW = 11  # the Gaussian window's side (sigma 1.5): images must be at least this large
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_IMPLEMENTATION = (
    "SSIM as nerfstudio reports it (torchmetrics >= 1.4.2 structural_similarity_index_measure's convention): "
    "11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 1, each channel reflect-padded by 5 pixels and "
    "the SSIM map averaged over every pixel (up to 1.4.1 torchmetrics averaged the valid region only), in float64; "
    "computed by mega_nerf.evaluation.metrics (a separable window), equal to torchmetrics' to float64 rounding")


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 3:
        raise ValueError(f"expected two (H, W, 3) images, got {tuple(pred.shape)} and {tuple(target.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(1 / MSE) over all pixels and channels; inf for identical images. pred, target: (H, W, 3)."""
    _check_pair(pred, target)
    mse = float((pred.double() - target.double()).square().mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """The SSIM window over the last two axes of x (..., H + 10, W + 10), valid region only: (..., H, W). Two 1-D
    passes, each a weighted sum of 11 shifted views (elementwise kernels only)."""
    half = SSIM_WINDOW // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    weights = (weights / weights.sum()).tolist()
    for axis in (-1, -2):
        size = x.shape[axis] - 2 * half
        x = sum(w * x.narrow(axis, k, size) for k, w in enumerate(weights))
    return x


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004) as nerfstudio reports it (SSIM_IMPLEMENTATION), in float64 so that the number
    does not depend on the device. pred, target: (H, W, 3) with H, W >= SSIM_WINDOW."""
    _check_pair(pred, target)
    if min(pred.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images at least {SSIM_WINDOW} pixels a side, got {tuple(pred.shape)}")
    half = SSIM_WINDOW // 2
    x, y = (F.pad(image.double().permute(2, 0, 1), (half,) * 4, mode="reflect") for image in (pred, target))
    mx, my, xx, yy, xy = _gaussian_blur(torch.stack([x, y, x * x, y * y, x * y]))
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    var_x, var_y = (xx - mx * mx).clamp_min(0), (yy - my * my).clamp_min(0)
    ssim_map = (2 * mx * my + c1) * (2 * (xy - mx * my) + c2) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


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
