"""Image-quality metrics as NeRF papers report them: PSNR, SSIM and LPIPS (AlexNet and VGG).

Images are (H, W, 3) float tensors in [0, 1], on CPU or CUDA. PSNR and SSIM are computed in float64 so that
the reported numbers do not depend on the device; LPIPS lives in `mega_nerf.evaluation.lpips`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mega_nerf.evaluation.lpips import LPIPS, NETS

# SSIM constants of Wang et al. 2004, Sec. III-C, for data range 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 3:
        raise ValueError(f"expected two (H, W, 3) images, got {tuple(pred.shape)} and {tuple(target.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(1 / MSE) over all pixels and channels; inf for identical images. pred, target: (H, W, 3)."""
    _check_pair(pred, target)
    mse = float((pred.double() - target.double()).square().mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """(SSIM_WINDOW,) normalised 1D Gaussian; the 2D window is its outer product."""
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return window / window.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), 'valid' filtering, each channel
    separately, averaged over positions and channels. pred, target: (H, W, 3) with H, W >= 11."""
    _check_pair(pred, target)
    if min(pred.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images at least {SSIM_WINDOW} pixels a side, got {tuple(pred.shape)}")
    # Channels become batch items: (3, 1, H, W).
    x = pred.double().permute(2, 0, 1).unsqueeze(1)
    y = target.double().permute(2, 0, 1).unsqueeze(1)
    window = _gaussian_window(pred.device)
    # Local means of x, y, x^2, y^2, xy in one separable 'valid' convolution: (5 * 3, 1, H - 10, W - 10).
    stacked = torch.cat([x, y, x * x, y * y, x * y])
    blurred = F.conv2d(F.conv2d(stacked, window.view(1, 1, -1, 1)), window.view(1, 1, 1, -1))
    mu_x, mu_y, e_xx, e_yy, e_xy = blurred.chunk(5)
    var_x = e_xx - mu_x ** 2
    var_y = e_yy - mu_y ** 2
    cov = e_xy - mu_x * mu_y
    # Eq. 13 of the paper.
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
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
