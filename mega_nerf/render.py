"""Sampling along rays and volume rendering, as functions over flat tensors (one row per ray).

Every sample is an interval [t_start, t_end] along its ray, shaded at one point t inside it. Compositing follows
the NeRF quadrature (Max 1995; Mildenhall et al. 2020, eq. 3): alpha_i = 1 - exp(-sigma_i * delta_i),
T_i = exp(-sum_{j<i} sigma_j * delta_j), weight_i = T_i * alpha_i. Rays end on the field's background.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mega_nerf.fields import kernels
from mega_nerf.fields.base import Field
from mega_nerf.fields.kernels import occupancy_lookup


@dataclass
class RenderConfig:
    samples: int = 128  # uniform samples per ray (the coarse pass when fine_samples > 0)
    fine_samples: int = 0  # extra samples drawn from the coarse weights (hierarchical sampling)
    perturb: bool = True  # jitter sample positions within their intervals (training)
    bg_samples: int = 0  # samples beyond the field's foreground (contracted space), evenly spaced in 1 / t


def uniform_samples(near: torch.Tensor, far: torch.Tensor, n: int, perturb: bool,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n equal intervals between near (R,) and far (R,). Returns t, t_starts, t_ends, each (R, n); t is the
    interval's midpoint, or a uniform random point inside it when perturb. The generator, if given, lives on
    near's device."""
    steps = torch.linspace(0.0, 1.0, n + 1, device=near.device)
    edges = near[:, None] + (far - near)[:, None] * steps  # (R, n + 1)
    starts, ends = edges[:, :-1], edges[:, 1:]
    return _place(starts, ends, perturb, generator), starts, ends


def _place(starts: torch.Tensor, ends: torch.Tensor, perturb: bool, generator: torch.Generator | None
           ) -> torch.Tensor:
    """A point inside each interval: its midpoint, or a uniform random one when perturb."""
    if perturb:
        u = torch.rand(starts.shape, generator=generator, device=starts.device)
    else:
        u = torch.full_like(starts, 0.5)
    return starts + (ends - starts) * u


def ray_samples(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                config: RenderConfig, perturb: bool, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The intervals a ray is sampled in: `config.samples` equal ones over its foreground part (from near to where
    it leaves the field's foreground box), then `config.bg_samples` beyond it to far, evenly spaced in disparity
    1 / t (NeRF++ / mip-NeRF 360's spacing of the far, contracted world). A ray that ends inside the box gets
    empty background intervals (zero length: never shaded). Returns t, t_starts, t_ends, each (R, n)."""
    split = field.foreground_exit(origins, dirs) if config.bg_samples > 0 else None
    if split is None:
        return uniform_samples(near, far, config.samples, perturb, generator)
    split = torch.minimum(split, far).clamp_min(near)
    _, fg_starts, fg_ends = uniform_samples(near, split, config.samples, False)
    left = torch.arange(config.bg_samples, -1, -1, device=near.device) / config.bg_samples  # 1 down to 0
    inv_split, inv_far = 1 / split.clamp_min(1e-6)[:, None], 1 / far.clamp_min(1e-6)[:, None]
    # (R, bg + 1) from split to far. Never decreasing despite rounding, with no scan to enforce it: `left` falls,
    # the span inv_split - inv_far is one number >= 0 per ray, and correctly rounded products, sums and reciprocals
    # are monotone in each argument. A sum onto inv_far > 0, not a difference, so nothing cancels: each edge is
    # within a few float32 roundings of its exact value. (A scan over these short rows took 6 % of a frame.)
    edges = 1 / (inv_far + (inv_split - inv_far).clamp_min(0) * left)
    # Exactly split and far at the ends (split = far gives empty intervals); clamping keeps the order.
    edges = torch.cat([split[:, None], edges[:, 1:-1], far[:, None]], -1).clamp(split[:, None], far[:, None])
    starts = torch.cat([fg_starts, edges[:, :-1]], -1)
    ends = torch.cat([fg_ends, edges[:, 1:]], -1)
    return _place(starts, ends, perturb, generator), starts, ends


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


def prefix_sums(x: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """Running sums along each row of x (R, n), float32, as one matrix product with a triangular matrix of ones
    (exclusive: each entry leaves itself out). On the GPU, PyTorch's scan over short rows ran at a few GB/s
    (bench/RESULTS.md, render profile); the product is exact for sums of small integers."""
    n = x.shape[1]
    ones = torch.ones(n, n, device=x.device)
    upper = ones.triu(0 if inclusive else 1)  # upper[i, j] = 1 where sample i counts towards position j
    with torch.autocast(x.device.type, enabled=False):  # float32 even inside an inference autocast
        return x.float() @ upper


def composite(density: torch.Tensor, rgb: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
              t: torch.Tensor) -> dict[str, torch.Tensor]:
    """density (R, n), rgb (R, n, 3), intervals and shading points (R, n) -> weights (R, n), rgb (R, 3),
    depth (R,) (expected distance, normalised units), opacity (R,), and the optical depth tau (R,) crossed."""
    tau = density * (ends - starts)
    transmittance = torch.exp(-prefix_sums(tau, inclusive=False))
    weights = transmittance * (1.0 - torch.exp(-tau))
    opacity = weights.sum(-1)
    depth = (weights * t).sum(-1)
    return {"weights": weights, "rgb": (weights.unsqueeze(-1) * rgb).sum(1), "depth": depth, "opacity": opacity,
            "tau": tau.sum(-1)}


def distortion(weights: torch.Tensor) -> torch.Tensor:
    """mip-NeRF 360's distortion loss (Barron et al. 2022, eq. 15) of weights (R, n) over a ray's samples in order,
    per ray (R,): sum_ij w_i w_j |m_i - m_j| over interval midpoints m, plus 1/3 sum_i w_i^2 over widths 1/n. The
    intervals are measured in sample index over n, so a ray's foreground (even in t) and its background (even in
    disparity) count alike, much as mip-NeRF 360's normalised distance (even in disparity) does. Low when a ray's
    weight gathers in one short span: it penalises the semi-transparent clouds a field fits to explain few views.
    Computed in O(n) per ray with prefix sums; `distortion_reference` is the definition."""
    n = weights.shape[1]
    mids = (torch.arange(n, device=weights.device) + 0.5) / n
    before = prefix_sums(weights, inclusive=False)  # weight of the samples in front of each one
    moment = prefix_sums(weights * mids, inclusive=False)
    between = 2 * (weights.float() * (mids * before - moment)).sum(-1)  # i > j terms, twice
    return between + (weights.float() ** 2).sum(-1) / (3 * n)


def distortion_reference(weights: torch.Tensor) -> torch.Tensor:
    """The distortion loss as its definition, every pair of samples: O(n^2) memory per ray (tests only)."""
    n = weights.shape[1]
    mids = (torch.arange(n, dtype=weights.dtype, device=weights.device) + 0.5) / n
    pairs = (weights[:, :, None] * weights[:, None, :] * (mids[:, None] - mids[None, :]).abs()).sum((1, 2))
    return pairs + (weights ** 2).sum(-1) / (3 * n)


def compact(occupied: torch.Tensor, capacity: int) -> torch.Tensor:
    """The indices of a flat bool tensor's True entries in order, padded to `capacity` with occupied.numel() (one
    past the last entry): what nonzero gives, in a shape fixed ahead, so no sync waits for the count (a CUDA graph
    can hold it). The caller must know the count is at most `capacity` (more would scatter out of bounds: checking
    it here would be the sync this avoids)."""
    total = occupied.numel()
    slot = torch.where(occupied, occupied.cumsum(0) - 1, capacity)  # a True entry's place; others to a spare one
    kept = torch.full((capacity + 1,), total, dtype=torch.long, device=occupied.device)
    kept.scatter_(0, slot, torch.arange(total, device=occupied.device))
    return kept[:capacity]


class _ScaledGradient(torch.autograd.Function):
    """x as it is, whose gradient comes back multiplied by `scale`, one number per row of x."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.view(-1, *(1,) * (grad.dim() - 1)).to(grad.dtype), None


def near_gradient_scale(t: torch.Tensor, distance: float) -> torch.Tensor:
    """(t / distance)^2, at most 1: how much of its gradient a sample t from its camera keeps (`shade`)."""
    return (t / distance).square().clamp(max=1.0)


def shade(field: Field, origins: torch.Tensor, dirs: torch.Tensor, appearance: torch.Tensor, t: torch.Tensor,
          starts: torch.Tensor, ends: torch.Tensor, occupied: torch.Tensor | None = None,
          capacity: int | None = None, near_gradient: float = 0.0) -> dict[str, torch.Tensor]:
    """Evaluate the field at origins + t * dirs, only where it may be occupied, and composite.

    origins, dirs: (R, 3); appearance: (R,) long; t, starts, ends: (R, n); occupied: (R, n) bool, the samples
    worth shading when the caller knows them (else the field's occupancy is asked). capacity: shade exactly this
    many samples, the occupied ones (at most `capacity`) and then copies of others whose results are dropped, so
    that every shape is known before the count (`compact`); 'samples' is then a 0-d tensor. near_gradient: a
    sample nearer its camera (t: rays start there) than this keeps (t / near_gradient)^2 of its gradient
    (`near_gradient_scale`; 0: all). Near a camera a point is seen through many of that camera's pixels and by
    few other cameras, so it learns fastest where fewest views check it: a street view's sky became fog a few
    metres ahead, which the views between them saw in front of their surfaces (Philip and Deschaintre 2023 scale
    gradients so; docs/DESIGN.md, Scene bounds).
    """
    R, n = t.shape
    points = (origins[:, None, :] + dirs[:, None, :] * t[..., None]).reshape(-1, 3)
    if occupied is None:
        occupied = field.occupied(points).view(R, n) & (ends > starts)  # empty intervals hold nothing
    if capacity is None:
        kept = occupied.reshape(-1).nonzero()[:, 0]  # flat sample indices worth shading
        shaded, samples = kept, kept.numel()
    else:  # the padding is written to a spare slot, R * n, then cut off
        kept = compact(occupied.reshape(-1), capacity)
        # Its points are spread over the samples, not all at one: the backward of a gather adds up the gradients
        # of equal indices one after another (copies of one sample made a step 2.7x slower on an H200).
        spread = torch.arange(capacity, device=t.device) % (R * n)
        shaded, samples = torch.where(kept < R * n, kept, spread), occupied.sum()
    ray_of = torch.div(shaded, n, rounding_mode="floor")
    sigma, color = field(points[shaded], dirs, appearance, ray_of)
    if near_gradient > 0 and torch.is_grad_enabled():
        scale = near_gradient_scale(t.reshape(-1)[shaded], near_gradient)
        sigma, color = _ScaledGradient.apply(sigma, scale), _ScaledGradient.apply(color, scale)
    slots = R * n + (capacity is not None)
    density = torch.zeros(slots, device=t.device).index_put((kept,), sigma.float())[:R * n]
    rgb = torch.zeros(slots, 3, device=t.device).index_put((kept,), color.float())[:R * n]
    out = composite(density.view(R, n), rgb.view(R, n, 3), starts, ends, t)
    out["samples"] = samples
    return out


def render_rays(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                appearance: torch.Tensor, config: RenderConfig,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Render rays (R,) through a field. Returns rgb (R, 3), depth (R,), opacity (R,), the number of samples
    shaded, and with hierarchical sampling the coarse pass's rgb as 'rgb_coarse'."""
    t, starts, ends = ray_samples(field, origins, dirs, near, far, config, config.perturb, generator)
    return render_samples(field, origins, dirs, near, far, appearance, config, t, starts, ends, generator=generator)


def render_samples(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                   appearance: torch.Tensor, config: RenderConfig, t: torch.Tensor, starts: torch.Tensor,
                   ends: torch.Tensor, occupied: torch.Tensor | None = None, capacity: int | None = None,
                   generator: torch.Generator | None = None, near_gradient: float = 0.0) -> dict[str, torch.Tensor]:
    """`render_rays` from its samples (`ray_samples`' t, starts, ends), their occupancy when known, a fixed
    capacity of the first shading pass and the gradient scaling near the cameras (`shade`): the trainer draws
    the samples and counts the occupied ones before the rest of its step, which then has fixed shapes
    (training.graphs)."""
    out = shade(field, origins, dirs, appearance, t, starts, ends, occupied, capacity, near_gradient)
    if config.fine_samples > 0:
        fine = sample_pdf(starts, ends, out["weights"], config.fine_samples, config.perturb, generator)
        t_all = torch.sort(torch.cat([t, fine], -1), -1).values
        # Each point's interval reaches halfway to its neighbours, clipped to [near, far].
        mids = 0.5 * (t_all[:, 1:] + t_all[:, :-1])
        starts_all = torch.cat([near[:, None], mids], -1)
        ends_all = torch.cat([mids, far[:, None]], -1)
        coarse_rgb, coarse_opacity = out["rgb"], out["opacity"]
        samples = out["samples"]
        out = shade(field, origins, dirs, appearance, t_all, starts_all, ends_all, near_gradient=near_gradient)
        out["samples"] = out["samples"] + samples
        out["rgb_coarse"] = coarse_rgb + (1 - coarse_opacity[:, None]) * field.background(dirs, appearance)
    out["rgb"] = out["rgb"] + (1 - out["opacity"][:, None]) * field.background(dirs, appearance)
    return out


def occupied_first(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ray, the indices of its occupied samples in order, then filler: occupied (R, n) bool ->
    order (R, n) long (entries from count on are 0, meaningless) and count (R,)."""
    R, n = occupied.shape
    seen = prefix_sums(occupied.float(), inclusive=True).long()  # occupied samples up to each one
    slot = torch.where(occupied, seen - 1, n)  # an occupied sample's place; unoccupied ones go to spare column n
    order = torch.zeros(R, n + 1, dtype=torch.long, device=occupied.device)
    order.scatter_(1, slot, torch.arange(n, device=occupied.device).expand(R, n))
    return order[:, :n], seen[:, -1]


def occupancy_along(field: Field, origins: torch.Tensor, dirs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(R, n) bool: whether the field may be occupied at origins + t * dirs; origins, dirs (R, 3), t (R, n). One
    fused kernel over all samples where the field's occupancy is a grid lookup and the kernel runs; else the
    field's `occupied`, a block of rays at a time (its reference)."""
    lookup = field.grid_lookup()
    if lookup is not None and kernels.available(t):
        return occupancy_lookup.occupied_along(lookup, origins, dirs, t)
    return occupancy_lookup.occupied_along_reference(field.occupied, origins, dirs, t)


def render_terminating(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor,
                       far: torch.Tensor, appearance: torch.Tensor, config: RenderConfig, segment: int = 32,
                       min_transmittance: float = 1e-4) -> dict[str, torch.Tensor]:
    """Inference with empty-space skipping and early ray termination (uniform sampling only).

    The occupancy of every uniform sample is looked up first (a grid lookup each); then each ray's occupied
    samples are shaded `segment` at a time, in order along the ray, until less than `min_transmittance` of its
    light is left or they run out. A ray through empty space costs no field evaluation, and one that hits a roof
    none behind it. Unoccupied samples have zero density, so this equals `render_rays` (perturb off) up to the
    dropped remainder."""
    t, starts, ends = ray_samples(field, origins, dirs, near, far, config, perturb=False)
    R, n = t.shape
    order, count = occupied_first(occupancy_along(field, origins, dirs, t) & (ends > starts))
    rgb, depth = torch.zeros(R, 3, device=origins.device), torch.zeros(R, device=origins.device)
    tau = torch.zeros(R, device=origins.device)  # optical depth crossed so far
    active = count.nonzero()[:, 0]
    samples = 0
    for s in range(0, n, segment):
        if active.numel() == 0:
            break
        pick = order[active, s:s + segment]  # (A, S) sample indices along each active ray
        valid = torch.arange(s, s + pick.shape[1], device=pick.device) < count[active, None]
        rows = active[:, None]
        out = shade(field, origins[active], dirs[active], appearance[active], t[rows, pick], starts[rows, pick],
                    ends[rows, pick], occupied=valid)
        light = torch.exp(-tau[active])
        rgb[active] += light[:, None] * out["rgb"]
        depth[active] += light * out["depth"]
        tau[active] += out["tau"]
        samples += out["samples"]
        active = active[(torch.exp(-tau[active]) > min_transmittance) & (count[active] > s + segment)]
    opacity = 1.0 - torch.exp(-tau)
    return {"rgb": rgb + (1 - opacity[:, None]) * field.background(dirs, appearance), "depth": depth,
            "opacity": opacity, "samples": samples}


def default_chunk(device: torch.device) -> int:
    """Rays rendered at once at inference unless told otherwise: large on a GPU, where fewer kernel launches per
    ray make a frame faster (a 1080p frame of a 4-cell container: 369 ms at 262144 with 2.6 GiB peak, 330 ms at
    524288 with 4.6 GiB; bench/RESULTS.md), small on a CPU, where the reference hash encoding's temporaries grow
    with it."""
    return 262144 if device.type == "cuda" else 8192


@torch.no_grad()
def render_in_chunks(field: Field, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor,
                     far: torch.Tensor, appearance: torch.Tensor, config: RenderConfig,
                     chunk: int = 8192, segment: int = 32) -> dict[str, torch.Tensor]:
    """Inference over many rays in bounded memory, with empty-space skipping and early ray termination where
    sampling is uniform (`segment`: samples per ray per pass). Returns rgb (R, 3), depth (R,), opacity (R,) on the
    input's device, and the number of samples shaded (a 0-d tensor)."""
    parts: dict[str, list[torch.Tensor]] = {"rgb": [], "depth": [], "opacity": []}
    samples = 0
    for s in range(0, origins.shape[0], chunk):
        sl = slice(s, s + chunk)
        args = (field, origins[sl], dirs[sl], near[sl], far[sl], appearance[sl], config)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=origins.is_cuda):
            out = render_rays(*args) if config.fine_samples > 0 else render_terminating(*args, segment=segment)
        for k in parts:
            parts[k].append(out[k].float())
        samples += out["samples"]
    return {**{k: torch.cat(v) for k, v in parts.items()}, "samples": torch.tensor(samples)}
