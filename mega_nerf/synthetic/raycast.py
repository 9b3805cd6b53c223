"""Exact ray casting against the city: the ground square, building boxes, trees (trunk cylinder + canopy sphere)
and hills (spherical caps).

All in metres, DRB, on whatever device the city and rays are on. Rays are taken in groups of `GROUP`
consecutive rays (neighbouring pixels, in practice); each group is tested only against the shapes whose
horizontal footprint meets the horizontal span of its rays inside the shapes' bounding box. That culling is
exact, since every hit lies on that span, and it makes the (rays x shapes) tests cost what a pixel can see
instead of the whole city.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mega_nerf.synthetic.scene import City

SKY, GROUND, WALL, ROOF, CANOPY, TRUNK, HILL = range(7)  # what a ray hit
T_MIN = 1e-4  # metres; nearer hits are ignored (shadow rays start 1 cm off their surface)
GROUP = 32  # consecutive rays sharing one list of candidate shapes
_TINY = 1e-12


@dataclass
class Hit:
    t: torch.Tensor  # (N,) distance along the unit direction, metres; inf for the sky
    material: torch.Tensor  # (N,) long, one of SKY, GROUND, WALL, ROOF, CANOPY, TRUNK, HILL
    index: torch.Tensor  # (N,) long, the building, tree or hill hit (-1 for ground and sky)
    normal: torch.Tensor  # (N, 3) unit outward normal (zeros for the sky)


def _safe(d: torch.Tensor) -> torch.Tensor:
    """Directions with zero components nudged off zero, so that slab divisions stay finite."""
    return torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d)


def _slabs(o: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis entry distances (..., 3) and the entry and exit distances (...) of rays and boxes (broadcast)."""
    inv = 1 / _safe(d)
    t1, t2 = (lo - o) * inv, (hi - o) * inv
    t_in = torch.minimum(t1, t2)
    return t_in, t_in.amax(-1), torch.maximum(t1, t2).amin(-1)


def box_t(o: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Entry distance of rays o, d (..., 3) into boxes lo, hi (..., 3), broadcast; inf on a miss."""
    _, t_near, t_far = _slabs(o, d, lo, hi)
    return torch.where((t_near <= t_far) & (t_near > T_MIN), t_near, torch.inf)


def _sphere_t(o: torch.Tensor, d: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Entry distance into spheres c (..., 3), r (...); written with the ray's closest approach to the centre,
    which keeps float32 accurate for far-away origins."""
    oc = o - c
    b = (oc * d).sum(-1)
    h2 = r * r - (oc - b.unsqueeze(-1) * d).square().sum(-1)
    t = -b - h2.clamp_min(0).sqrt()
    return torch.where((h2 >= 0) & (t > T_MIN), t, torch.inf)


def trunk_t(o: torch.Tensor, d: torch.Tensor, yz: torch.Tensor, r: torch.Tensor, top: torch.Tensor
            ) -> torch.Tensor:
    """Entry distance (...) through the side of vertical cylinders (axis yz (..., 2), radius r (...)) between
    x = top and the ground; inf on a miss. The top cap needs no test: it lies inside the tree's canopy."""
    o2, d2 = o[..., 1:] - yz, d[..., 1:]
    a = d2.square().sum(-1).clamp_min(_TINY)
    t_close = -(o2 * d2).sum(-1) / a
    h2 = r * r - (o2 + t_close.unsqueeze(-1) * d2).square().sum(-1)
    t = t_close - (h2.clamp_min(0) / a).sqrt()
    x = o[..., 0] + t * d[..., 0]
    return torch.where((h2 >= 0) & (t > T_MIN) & (x >= top) & (x <= 0), t, torch.inf)


def tree_t(o: torch.Tensor, d: torch.Tensor, city: City, index: torch.Tensor) -> torch.Tensor:
    """Entry distance of rays o, d (..., 3) into trees `index` (...), the nearer of canopy and trunk."""
    trunk = trunk_t(o, d, city.tree_yz[index], city.trunk_radius[index], city.trunk_top[index])
    return torch.minimum(_sphere_t(o, d, city.canopy_center[index], city.canopy_radius[index]), trunk)


def hill_t(o: torch.Tensor, d: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Entry distance of rays o, d (..., 3) into hills: the caps above the ground (x <= 0) of spheres c (..., 3),
    r (...); inf on a miss. An entry below the ground is no hit: there the ground (or, past its edge, nothing)
    is seen, since rays from above the ground square meet the ground first."""
    t = _sphere_t(o, d, c, r)
    x = o[..., 0] + t.nan_to_num(posinf=0.0) * d[..., 0]
    return torch.where(x <= 0, t, torch.inf)


def _group_spans(o: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Horizontal span (G, 4) [y_min, y_max, z_min, z_max] of each group's rays inside the box lo, hi (3,).

    o, d: (G, GROUP, 3). A group with no ray inside the box gets an empty span (min > max).
    """
    _, t_near, t_far = _slabs(o, d, lo, hi)
    t_near = t_near.clamp_min(0)
    inside = (t_near <= t_far).unsqueeze(-1)
    ends = torch.stack([o + t_near.unsqueeze(-1) * d, o + t_far.unsqueeze(-1) * d], 2)[..., 1:]  # (G, n, 2, 2)
    low = torch.where(inside.unsqueeze(-1), ends, torch.inf).amin((1, 2))
    high = torch.where(inside.unsqueeze(-1), ends, -torch.inf).amax((1, 2))
    pad = 1e-3  # metres; covers rounding in the span ends
    return torch.stack([low[:, 0] - pad, high[:, 0] + pad, low[:, 1] - pad, high[:, 1] + pad], 1)


def _groups(counts: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split ray groups, sorted by ascending candidate count, into runs of at most `budget` ray-shape tests."""
    runs, start = [], int(np.searchsorted(counts, 0, side="right"))  # groups without candidates need no test
    while start < len(counts):
        sizes = np.arange(1, len(counts) - start + 1)
        fits = np.nonzero(sizes * counts[start:] * GROUP <= budget)[0]
        stop = start + (int(fits[-1]) + 1 if len(fits) else 1)
        runs.append((start, stop))
        start = stop
    return runs


def nearest(o: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            hit_t: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
            budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit of each ray among S shapes, testing each group of rays only against its candidates.

    o, d: (N, 3) rays; lo, hi: (S, 3) boxes bounding the shapes; hit_t(o, d, index) gives entry distances for
    rays (..., 3) and shape indices (...). Returns t (N,) (inf for no hit) and the shape's index (N,) (-1).
    """
    N, S = o.shape[0], lo.shape[0]
    t_best = torch.full((N,), torch.inf, device=o.device)
    i_best = torch.full((N,), -1, dtype=torch.long, device=o.device)
    if S == 0 or N == 0:
        return t_best, i_best
    pad = -N % GROUP  # pad with copies of the last ray, cut off at the end
    og = torch.cat([o, o[-1:].expand(pad, 3)]).view(-1, GROUP, 3)
    dg = torch.cat([d, d[-1:].expand(pad, 3)]).view(-1, GROUP, 3)
    span = _group_spans(og, dg, lo.amin(0), hi.amax(0))
    candidate = ((lo[:, 1] <= span[:, 1:2]) & (hi[:, 1] >= span[:, 0:1])
                 & (lo[:, 2] <= span[:, 3:4]) & (hi[:, 2] >= span[:, 2:3]))  # (groups, S)
    counts = candidate.sum(1)
    order = torch.argsort(counts)
    sorted_counts = counts[order].cpu().numpy()
    t_out = torch.full(og.shape[:2], torch.inf, device=o.device)
    i_out = torch.full(og.shape[:2], -1, dtype=torch.long, device=o.device)
    for start, stop in _groups(sorted_counts, budget):
        rows = order[start:stop]
        K = int(sorted_counts[stop - 1])
        # Candidates first (stable sort keeps shape order), then padding marked invalid.
        index = torch.argsort((~candidate[rows]).to(torch.uint8), dim=1, stable=True)[:, :K]  # (n, K)
        valid = torch.arange(K, device=o.device) < counts[rows].unsqueeze(1)
        t = hit_t(og[rows].unsqueeze(2), dg[rows].unsqueeze(2), index.unsqueeze(1))  # (n, GROUP, K)
        t = torch.where(valid.unsqueeze(1), t, torch.inf)
        t_min, k = t.min(2)
        t_out[rows] = t_min
        i_out[rows] = torch.where(t_min.isfinite(), index.gather(1, k), -1)
    return t_out.flatten()[:N], i_out.flatten()[:N]


def ground_t(o: torch.Tensor, d: torch.Tensor, half: float) -> torch.Tensor:
    """Distance to the ground square (x = 0, |y|, |z| <= half) from above; inf on a miss. o, d: (N, 3)."""
    t = -o[:, 0] / _safe(d[:, 0])
    p = o + t.unsqueeze(-1) * d
    on = (d[:, 0] > 0) & (t > T_MIN) & (p[:, 1:].abs() <= half).all(-1)
    return torch.where(on, t, torch.inf)


def _box_surface(city: City, o: torch.Tensor, d: torch.Tensor, p: torch.Tensor, j: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals (M, 3) and materials (M,) where rays o, d (M, 3) hit buildings j (M,) at points p (M, 3)."""
    t_in, _, _ = _slabs(o, d, city.box_lo[j], city.box_hi[j])
    axis = t_in.argmax(-1)  # the slab entered last is the face hit
    normal = torch.zeros_like(t_in).scatter_(1, axis.unsqueeze(1), 1.0) * -torch.sign(d)
    return normal, torch.where(axis == 0, ROOF, WALL)


def _tree_surface(city: City, o: torch.Tensor, d: torch.Tensor, p: torch.Tensor, j: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals (M, 3) and materials (M,) where rays o, d (M, 3) hit trees j (M,) at points p (M, 3)."""
    trunk = trunk_t(o, d, city.tree_yz[j], city.trunk_radius[j], city.trunk_top[j])
    canopy = _sphere_t(o, d, city.canopy_center[j], city.canopy_radius[j])
    n_canopy = (p - city.canopy_center[j]) / city.canopy_radius[j].unsqueeze(-1)
    n_trunk = torch.cat([torch.zeros_like(p[:, :1]), p[:, 1:] - city.tree_yz[j]], 1)
    n_trunk = n_trunk / city.trunk_radius[j].unsqueeze(-1)
    is_canopy = canopy <= trunk
    return torch.where(is_canopy.unsqueeze(-1), n_canopy, n_trunk), torch.where(is_canopy, CANOPY, TRUNK)


def _hill_surface(city: City, o: torch.Tensor, d: torch.Tensor, p: torch.Tensor, j: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals (M, 3) and materials (M,) where rays (M, 3) hit hills j (M,) at points p (M, 3)."""
    normal = (p - city.hill_center[j]) / city.hill_radius[j].unsqueeze(-1)
    return normal, torch.full_like(j, HILL)


def first_hit(city: City, o: torch.Tensor, d: torch.Tensor, budget: int) -> Hit:
    """What each ray o, d (N, 3) hits first (unit directions, metres); `budget` bounds the ray-shape tests
    held in memory at once."""
    B = city.box_lo.shape[0]
    lo, hi = city.footprints()
    t_box, i_box = nearest(o, d, lo[:B], hi[:B], lambda o_, d_, i: box_t(o_, d_, city.box_lo[i], city.box_hi[i]),
                           budget)
    t_tree, i_tree = nearest(o, d, lo[B:], hi[B:], lambda o_, d_, i: tree_t(o_, d_, city, i), budget)
    t_hill, i_hill = nearest(o, d, *city.hill_boxes(),
                             lambda o_, d_, i: hill_t(o_, d_, city.hill_center[i], city.hill_radius[i]), budget)
    # Columns, hence `which`: 0 ground, 1 building, 2 tree, 3 hill.
    t, which = torch.stack([ground_t(o, d, city.ground_half), t_box, t_tree, t_hill], 1).min(1)
    found = t.isfinite()
    index = torch.stack([torch.full_like(i_box, -1), i_box, i_tree, i_hill], 1).gather(1, which.unsqueeze(1))[:, 0]
    index = torch.where(found, index, -1)
    material = torch.where(found & (which == 0), GROUND, SKY)
    normal = torch.zeros_like(o)
    normal[:, 0] = torch.where(material == GROUND, -1.0, 0.0)
    p = o + t.unsqueeze(-1).nan_to_num(posinf=0.0) * d
    for kind, surface in ((1, _box_surface), (2, _tree_surface), (3, _hill_surface)):
        m = found & (which == kind)
        if m.any():
            normal[m], material[m] = surface(city, o[m], d[m], p[m], index[m])
    return Hit(t, material, index, normal)
