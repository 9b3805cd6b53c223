"""Ray-to-cell membership without sampling: exact along straight segments, conservative where the contraction
bends the ray (docs/DESIGN.md, Partitioning).

The point rule (cells.cell_membership): p belongs to cell k when |p - c_k|^2 <= m^2 min_j |p - c_j|^2, m >= 1.
Along a straight segment p(t) = o + t d, t in [t0, t1]:
- The t at which centroid j is a nearest one form one interval J_j (a Voronoi cell is convex): the intersection
  of the half-lines |p - c_j|^2 <= |p - c_i|^2, each linear in t (the t^2 terms cancel).
- On J_j, p belongs to cell k exactly when f_kj(t) = |p - c_k|^2 - m^2 |p - c_j|^2 <= 0. f_kj is a quadratic
  in t with leading coefficient (1 - m^2) |d|^2 <= 0: concave, so on an interval it is smallest at an end.
So the segment meets cell k if and only if the point rule holds for k at an end of some J_j: 2K points per
segment (plus t0 and t1), O(K^2) work, and no sample count to choose. The rule's own comparison is made at those
points, so any point a sampler could find is matched by one of them.

Beyond the foreground box the container routes a point where the contraction puts it
(bounds.contracted_position); the routed ray is a curve, on which f_kj becomes a rational function, so there
the answer is conservative instead: the remainder [t0, t1] is cut into `arcs` pieces evenly spaced in 1 / t
(as the sampler spaces its points). The contraction is monotone along each axis, so each routed coordinate is
monotone along a piece, and the piece lies in the box spanned by its routed ends; it may meet cell k only when
the nearest point of that box to c_k is within m times the farthest point of the box from every c_j. Each
piece's ends are tested exactly as well. The result holds every cell a sampler of that part could find, and a
few more near cell boundaries (bench/RESULTS.md measures how many).

Distances are float64 with a relative slack of SLACK on squared distances, so that float32 sample points of the
sampled rule (ray_membership), a hair off the exact ray, never fall outside. Every ray is computed on its own
(elementwise, no reductions across rays), so a pixel's bits never depend on its batch or on the process count.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from mega_nerf.bounds import contracted_position

SLACK = 1e-5  # relative, on squared distances
DEFAULT_ARCS = 32  # pieces of the contracted remainder of each ray
Box = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # box_min, box_max (3,) and the contracted axes (3,) bool


def routed(box: Box | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Where the container routes points, as a function of them: the contraction beyond `box`; None without."""
    return None if box is None else partial(contracted_position, box_min=box[0], box_max=box[1], contracted=box[2])


def _axes(cluster_2d: bool) -> range:
    return range(1 if cluster_2d else 0, 3)


def _axis_sum(term: Callable[[int], torch.Tensor], cluster_2d: bool) -> torch.Tensor:
    """term(0) + term(1) + term(2), or only the horizontal ones with `cluster_2d`: a sum over coordinates
    without a (..., 3) temporary (several times faster on a CPU than broadcasting and summing)."""
    axes = _axes(cluster_2d)
    total = term(axes[0])
    for axis in axes[1:]:
        total = total + term(axis)
    return total


def point_rule(points: torch.Tensor, centroids: torch.Tensor, margin: float, cluster_2d: bool) -> torch.Tensor:
    """(N, K) bool: cells.cell_membership in float64 with SLACK. points (N, 3), centroids (K, 3), float64."""
    d2 = _axis_sum(lambda i: (points[:, i, None] - centroids[:, i]).square(), cluster_2d)  # (N, K)
    return d2 <= margin ** 2 * (1 + SLACK) * d2.min(1, keepdim=True).values


def voronoi_ends(origins: torch.Tensor, dirs: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                 centroids: torch.Tensor, cluster_2d: bool) -> torch.Tensor:
    """(N, 2K + 2) distances along each segment: the ends of every interval J_j on which centroid j is a nearest
    one, and t0, t1 themselves. An empty J_j contributes t0 twice (a point of the segment, so harmless).

    origins, dirs: (N, 3); t0 <= t1: (N,); centroids (K, 3); all float64.
    """
    r2 = _axis_sum(lambda i: (origins[:, i, None] - centroids[:, i]).square(), cluster_2d)  # (N, K) |o - c_j|^2
    dc = _axis_sum(lambda i: dirs[:, i, None] * centroids[:, i], cluster_2d)  # (N, K) d . c_j
    # |p(t) - c_j|^2 <= |p(t) - c_i|^2  <=>  slope[n, j, i] t + offset[n, j, i] <= 0
    slope = 2 * (dc[:, None, :] - dc[:, :, None])
    offset = r2[:, :, None] - r2[:, None, :]
    root = -offset / torch.where(slope == 0, torch.ones_like(slope), slope)
    inf = torch.full_like(root, float("inf"))
    lo = torch.maximum(t0[:, None], torch.where(slope < 0, root, -inf).amax(-1))  # (N, K)
    hi = torch.minimum(t1[:, None], torch.where(slope > 0, root, inf).amin(-1))
    empty = (lo > hi) | ((slope == 0) & (offset > 0)).any(-1)
    ends = torch.cat([lo, hi], 1).where(torch.cat([empty, empty], 1).logical_not(), t0[:, None])
    return torch.cat([ends, t0[:, None], t1[:, None]], 1)


def segment_membership(origins: torch.Tensor, dirs: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                       centroids: torch.Tensor, margin: float, cluster_2d: bool,
                       place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(N, K) bool: the cells the straight segments o + t d, t between t0 and t1, meet (exact, module
    docstring). origins, dirs: (N, 3); t0, t1: (N,) (either order); centroids (K, 3). `place` is applied to the
    candidate points; it must be the identity on the segment for the answer to be exact (the foreground part of a
    ray lies in the box, where contracted_position is), and makes a single point (t0 = t1) routed correctly."""
    o, d, c = origins.double(), dirs.double(), centroids.to(origins.device).double()
    lo, hi = torch.minimum(t0, t1).double(), torch.maximum(t0, t1).double()
    t = voronoi_ends(o, d, lo, hi, c, cluster_2d)  # (N, C)
    points = (o[:, None] + d[:, None] * t[..., None]).reshape(-1, 3)  # (N C, 3)
    if place is not None:
        points = place(points)
    return point_rule(points, c, margin, cluster_2d).view(o.shape[0], -1, c.shape[0]).any(1)


def arc_membership(origins: torch.Tensor, dirs: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                   centroids: torch.Tensor, margin: float, cluster_2d: bool,
                   place: Callable[[torch.Tensor], torch.Tensor], arcs: int = DEFAULT_ARCS) -> torch.Tensor:
    """(N, K) bool: every cell the routed curve place(o + t d), t in [t0, t1] (evenly in 1 / t), may meet:
    conservative, a superset of any sampling of it (module docstring). t0, t1 > 0: (N,)."""
    o, d, c = origins.double(), dirs.double(), centroids.to(origins.device).double()
    w = torch.linspace(0, 1, arcs + 1, dtype=torch.float64, device=o.device)
    t = 1 / ((1 - w) / t0.double()[:, None] + w / t1.double()[:, None])  # (N, A + 1)
    ends = place((o[:, None] + d[:, None] * t[..., None]).reshape(-1, 3)).view(o.shape[0], arcs + 1, 3)
    member = point_rule(ends.reshape(-1, 3), c, margin, cluster_2d).view(o.shape[0], -1, c.shape[0]).any(1)
    box_lo = torch.minimum(ends[:, :-1], ends[:, 1:])[..., None]  # (N, A, 3, 1): each piece's box
    box_hi = torch.maximum(ends[:, :-1], ends[:, 1:])[..., None]
    near2 = _axis_sum(lambda i: (box_lo[:, :, i] - c[:, i]).clamp_min(0).square()
                      + (c[:, i] - box_hi[:, :, i]).clamp_min(0).square(), cluster_2d)  # (N, A, K)
    far2 = _axis_sum(lambda i: torch.maximum(c[:, i] - box_lo[:, :, i], box_hi[:, :, i] - c[:, i]).square(),
                     cluster_2d)
    maybe = near2 <= margin ** 2 * (1 + SLACK) * far2.min(-1, keepdim=True).values
    return member | maybe.any(1)
