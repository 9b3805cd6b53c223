"""Fused inference of the hash field's two small MLPs on the GPU (Triton): for a block of points, the density
network, the colour network's geometry part, the per-ray view term and the colour head run in one kernel, so
the 64-wide hidden activations never reach GPU memory. Rendering a frame spent more time moving those
activations (ReLUs, adds, the per-ray gather, dtype casts: one kernel each over every sample) than in the
matrix products themselves (bench/RESULTS.md, render profile).

It computes what `HashField` computes under a bfloat16 autocast, layer by layer: each product accumulates in
float32, adds its bias and is rounded to the half type, as cuBLAS does for an autocast `nn.Linear`; only the
summation order inside a product differs (tests/test_gpu.py holds the two close). Inference only: no backward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

BLOCK = 64
OUT = 16  # the colour head's 3 outputs, padded to tl.dot's smallest width


if triton is not None:

    @triton.jit
    def _heads(feat_ptr, view_ptr, ray_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wg_ptr, w3_ptr, b3_ptr, w4_ptr,
               b4_ptr, logit_ptr, rgb_ptr, N, F: tl.constexpr, H: tl.constexpr, G: tl.constexpr, O: tl.constexpr,
               BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < N
        f, h, g, o3 = tl.arange(0, F), tl.arange(0, H), tl.arange(0, G), tl.arange(0, O)
        w1 = tl.load(w1_ptr + f[:, None] * H + h[None, :])  # (F, H): the weights are stored transposed
        half = w1.dtype
        x = tl.load(feat_ptr + rows[:, None] * F + f[None, :], mask=mask[:, None], other=0.0).to(half)
        a = (tl.dot(x, w1) + tl.load(b1_ptr + h).to(tl.float32)[None, :]).to(half)
        a = tl.maximum(a, 0.0).to(half)
        w2 = tl.load(w2_ptr + h[:, None] * G + g[None, :])
        o = (tl.dot(a, w2) + tl.load(b2_ptr + g).to(tl.float32)[None, :]).to(half)  # density logit, geometry
        logit = tl.sum(tl.where(g[None, :] == 0, o.to(tl.float32), 0.0), 1)
        tl.store(logit_ptr + rows, logit, mask=mask)
        wg = tl.load(wg_ptr + g[:, None] * H + h[None, :])  # row 0 is zero: the logit is not a feature
        c = tl.dot(o, wg).to(half)
        ray = tl.load(ray_ptr + rows, mask=mask, other=0)
        view = tl.load(view_ptr + ray[:, None] * H + h[None, :], mask=mask[:, None], other=0.0)
        c = tl.maximum(c.to(tl.float32) + view.to(tl.float32), 0.0).to(half)
        w3 = tl.load(w3_ptr + h[:, None] * H + h[None, :])
        c = (tl.dot(c, w3) + tl.load(b3_ptr + h).to(tl.float32)[None, :]).to(half)
        c = tl.maximum(c, 0.0).to(half)
        w4 = tl.load(w4_ptr + h[:, None] * O + o3[None, :])
        out = (tl.dot(c, w4) + tl.load(b4_ptr + o3).to(tl.float32)[None, :]).to(half).to(tl.float32)
        rgb = 1.0 / (1.0 + tl.exp(-out))
        tl.store(rgb_ptr + rows[:, None] * 3 + o3[None, :], rgb, mask=mask[:, None] & (o3[None, :] < 3))


def _pack(density_net: nn.Sequential, color_geo: nn.Linear, color_net: nn.Sequential,
          dtype: torch.dtype) -> list[torch.Tensor]:
    """The weights transposed to (in, out), padded to tl.dot's shapes and cast to the half type."""
    w1, b1 = density_net[0].weight.T, density_net[0].bias
    w2, b2 = density_net[2].weight.T, density_net[2].bias  # (H, 1 + geo)
    wg = F.pad(color_geo.weight, (1, 0)).T  # (1 + geo, H): a zero row for the logit
    w3, b3 = color_net[1].weight.T, color_net[1].bias
    w4, b4 = F.pad(color_net[3].weight.T, (0, OUT - 3)), F.pad(color_net[3].bias, (0, OUT - 3))
    return [t.detach().to(dtype).contiguous() for t in (w1, b1, w2, b2, wg, w3, b3, w4, b4)]


def supported(features: int, hidden: int, geometry: int) -> bool:
    """Whether the kernel takes these widths (tl.dot: powers of two, at least 16): features = the encoding's
    width, geometry = 1 + the geometry features (the density network's output)."""
    return all(w >= 16 and w & (w - 1) == 0 for w in (features, hidden, geometry))


def fused_heads(features: torch.Tensor, view: torch.Tensor, ray_of: torch.Tensor, density_net: nn.Sequential,
                color_geo: nn.Linear, color_net: nn.Sequential, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """features (N, F) float32 from the hash grid, view (R, H) the per-ray colour term (color_ray's output),
    ray_of (N,) each point's row of view -> density logit (N,) float32 (before the activation) and rgb (N, 3)
    float32. `dtype`: the half type the layers round to (the autocast dtype)."""
    N = features.shape[0]
    logit = torch.empty(N, device=features.device)
    rgb = torch.empty(N, 3, device=features.device)
    if N == 0:
        return logit, rgb
    weights = _pack(density_net, color_geo, color_net, dtype)
    width, H, G = features.shape[1], weights[0].shape[1], weights[2].shape[1]
    _heads[(triton.cdiv(N, BLOCK),)](features.float().contiguous(), view.to(dtype).contiguous(),
                                     ray_of.contiguous(), *weights, logit, rgb, N, F=width, H=H, G=G, O=OUT,
                                     BLOCK=BLOCK)
    return logit, rgb
