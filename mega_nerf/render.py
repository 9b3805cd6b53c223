"""Sampling along rays and volume rendering, as functions over flat tensors (one row per ray).

Every sample is an interval [t_start, t_end] along its ray, shaded at one point t inside it. Compositing follows
the NeRF quadrature (Max 1995; Mildenhall et al. 2020, eq. 3): alpha_i = 1 - exp(-sigma_i * delta_i),
T_i = exp(-sum_{j<i} sigma_j * delta_j), weight_i = T_i * alpha_i. Rays end on the field's background.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mega_nerf.fields.base import Field


@dataclass
class RenderConfig:
    samples: int = 128  # uniform samples per ray (the coarse pass when fine_samples > 0)
    fine_samples: int = 0  # extra samples drawn from the coarse weights (hierarchical sampling)
    perturb: bool = True  # jitter sample positions within their intervals (training)


def uniform_samples(near: torch.Tensor, far: torch.Tensor, n: int, perturb: bool,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n equal intervals between near (R,) and far (R,). Returns t, t_starts, t_ends, each (R, n); t is the
    interval's midpoint, or a uniform random point inside it when perturb. The generator, if given, lives on
    near's device."""
    steps = torch.linspace(0.0, 1.0, n + 1, device=near.device)
    edges = near[:, None] + (far - near)[:, None] * steps  # (R, n + 1)
    starts, ends = edges[:, :-1], edges[:, 1:]
    if perturb:
        u = torch.rand(starts.shape, generator=generator, device=near.device)
    else:
        u = torch.full_like(starts, 0.5)
    return starts + (ends - starts) * u, starts, ends


def sample_pdf(starts: torch.Tensor, ends: torch.Tensor, weights: torch.Tensor, n: int, perturb: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n points per ray by inverting the piecewise-constant pdf given by weights over the intervals
    (R, m). Returns sorted (R, n) positions (NeRF's hierarchical sampling, Mildenhall et al. 2020, sec. 5.2)."""
    pdf = (weights.detach() + 1e-5)
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1).clamp_max(1.0)  # (R, m + 1)
    if perturb:
        u = torch.rand((pdf.shape[0], n), generator=generator, device=pdf.device)
    else:
        u = torch.linspace(0.0, 1.0, n + 2, device=pdf.device)[1:-1].expand(pdf.shape[0], n)
    u = u.contiguous()
    i = torch.searchsorted(cdf, u, right=True).clamp(1, pdf.shape[1])  # interval index + 1
    c0, c1 = cdf.gather(1, i - 1), cdf.gather(1, i)
    t0, t1 = starts.gather(1, i - 1), ends.gather(1, i - 1)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-8)).clamp(0, 1)
    return torch.sort(t0 + frac * (t1 - t0), -1).values


def composite(density: torch.Tensor, rgb: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
              t: torch.Tensor) -> dict[str, torch.Tensor]:
    """density (R, n), rgb (R, n, 3), intervals and shading points (R, n) -> weights (R, n), rgb (R, 3),
    depth (R,) (expected distance, normalised units), opacity (R,), and the optical depth tau (R,) crossed."""
    tau = density * (ends - starts)
    transmittance = torch.exp(-torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1].cumsum(-1)], -1))
    weights = transmittance * (1.0 - torch.exp(-tau))
    opacity = weights.sum(-1)
    depth = (weights * t).sum(-1)
    return {"weights": weights, "rgb": (weights.unsqueeze(-1) * rgb).sum(1), "depth": depth, "opacity": opacity,
            "tau": tau.sum(-1)}


def shade(field: Field, origins: torch.Tensor, dirs: torch.Tensor, appearance: torch.Tensor, t: torch.Tensor,
          starts: torch.Tensor, ends: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluate the field at origins + t * dirs, only where it may be occupied, and composite.

    origins, dirs: (R, 3); appearance: (R,) long; t, starts, ends: (R, n).
    """
    R, n = t.shape
    points = (origins[:, None, :] + dirs[:, None, :] * t[..., None]).reshape(-1, 3)
    kept = field.occupied(points).nonzero()[:, 0]  # flat sample indices worth shading
    ray_of = torch.div(kept, n, rounding_mode="floor")
    sigma, color = field(points[kept], dirs, appearance, ray_of)
    density = torch.zeros(R * n, device=t.device).index_put((kept,), sigma.float())
    rgb = torch.zeros(R * n, 3, device=t.device).index_put((kept,), color.float())
    out = composite(density.view(R, n), rgb.view(R, n, 3), starts, ends, t)
    out["samples"] = kept.numel()
    return out


def render_rays(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                appearance: torch.Tensor, config: RenderConfig,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Render rays (R,) through a field. Returns rgb (R, 3), depth (R,), opacity (R,), the number of samples
    shaded, and with hierarchical sampling the coarse pass's rgb as 'rgb_coarse'."""
    t, starts, ends = uniform_samples(near, far, config.samples, config.perturb, generator)
    out = shade(field, origins, dirs, appearance, t, starts, ends)
    if config.fine_samples > 0:
        fine = sample_pdf(starts, ends, out["weights"], config.fine_samples, config.perturb, generator)
        t_all = torch.sort(torch.cat([t, fine], -1), -1).values
        # Each point's interval reaches halfway to its neighbours, clipped to [near, far].
        mids = 0.5 * (t_all[:, 1:] + t_all[:, :-1])
        starts_all = torch.cat([near[:, None], mids], -1)
        ends_all = torch.cat([mids, far[:, None]], -1)
        coarse_rgb, coarse_opacity = out["rgb"], out["opacity"]
        samples = out["samples"]
        out = shade(field, origins, dirs, appearance, t_all, starts_all, ends_all)
        out["samples"] = out["samples"] + samples
        out["rgb_coarse"] = coarse_rgb + (1 - coarse_opacity[:, None]) * field.background(dirs, appearance)
    out["rgb"] = out["rgb"] + (1 - out["opacity"][:, None]) * field.background(dirs, appearance)
    return out


def render_terminating(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor,
                       far: torch.Tensor, appearance: torch.Tensor, config: RenderConfig, segment: int = 16,
                       min_transmittance: float = 1e-4) -> dict[str, torch.Tensor]:
    """Inference with early ray termination (uniform sampling only): the samples are shaded `segment` at a time,
    and a ray stops once less than `min_transmittance` of its light is left, so rays that hit a roof never pay
    for the samples behind it. Equals `render_rays` (perturb off) up to that dropped remainder."""
    t, starts, ends = uniform_samples(near, far, config.samples, perturb=False)
    R = origins.shape[0]
    rgb, depth = torch.zeros(R, 3, device=origins.device), torch.zeros(R, device=origins.device)
    tau = torch.zeros(R, device=origins.device)  # optical depth crossed so far
    active = torch.arange(R, device=origins.device)
    samples = 0
    for s in range(0, config.samples, segment):
        sl = slice(s, s + segment)
        out = shade(field, origins[active], dirs[active], appearance[active], t[active, sl], starts[active, sl],
                    ends[active, sl])
        light = torch.exp(-tau[active])
        rgb[active] += light[:, None] * out["rgb"]
        depth[active] += light * out["depth"]
        tau[active] += out["tau"]
        samples += out["samples"]
        active = active[torch.exp(-tau[active]) > min_transmittance]
        if active.numel() == 0:
            break
    opacity = 1.0 - torch.exp(-tau)
    return {"rgb": rgb + (1 - opacity[:, None]) * field.background(dirs, appearance), "depth": depth,
            "opacity": opacity, "samples": samples}


def default_chunk(device: torch.device) -> int:
    """Rays rendered at once at inference unless told otherwise: large on a GPU, where fewer kernel launches per
    ray make a 1080p frame 1.6x faster than chunks of 65536 (about 3 GiB peak with a 4-cell container; see
    bench/RESULTS.md), small on a CPU, where the reference hash encoding's temporaries grow with it."""
    return 262144 if device.type == "cuda" else 8192


@torch.no_grad()
def render_in_chunks(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor,
                     far: torch.Tensor, appearance: torch.Tensor, config: RenderConfig,
                     chunk: int = 8192) -> dict[str, torch.Tensor]:
    """Inference over many rays in bounded memory, with early ray termination where sampling is uniform.
    Returns rgb (R, 3), depth (R,), opacity (R,) on the input's device."""
    render = render_terminating if config.fine_samples == 0 else render_rays
    parts: dict[str, list[torch.Tensor]] = {"rgb": [], "depth": [], "opacity": []}
    for s in range(0, origins.shape[0], chunk):
        sl = slice(s, s + chunk)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=origins.is_cuda):
            out = render(field, origins[sl], dirs[sl], near[sl], far[sl], appearance[sl], config)
        for k in parts:
            parts[k].append(out[k].float())
    return {k: torch.cat(v) for k, v in parts.items()}
