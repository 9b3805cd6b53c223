"""Input encodings: NeRF's positional encoding, spherical harmonics of directions, and the multi-resolution hash
grid of Instant-NGP (Mueller et al. 2022, section 3), the latter in plain PyTorch as the reference path."""
from __future__ import annotations

import math

import torch
from torch import nn

from mega_nerf.fields import kernels
from mega_nerf.fields.kernels import hash_encode as hash_triton

# Spatial-hash primes from Instant-NGP (Mueller et al. 2022, eq. 4); the first is 1 for cache coherence.
HASH_PRIMES = (1, 2654435761, 805459861)


def positional_encoding(x: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """NeRF's encoding (Mildenhall et al. 2020, eq. 4): [x, sin(2^k x), cos(2^k x) for k < n].
    (N, D) -> (N, D (1 + 2n))."""
    freqs = 2.0 ** torch.arange(n_frequencies, device=x.device, dtype=x.dtype)
    scaled = (x.unsqueeze(-1) * freqs).flatten(-2)  # (N, D * n), grouped by input dimension
    return torch.cat([x, torch.sin(scaled), torch.cos(scaled)], -1)


# Real spherical harmonics up to degree 3 (16 functions) as polynomials in the unit direction (x, y, z): per
# function, (coefficient, monomial) pairs, a monomial named by its factors ("" is the constant 1).
_SH_POLYNOMIALS = (
    ((0.28209479177387814, ""),),
    ((-0.48860251190291987, "y"),), ((0.48860251190291987, "z"),), ((-0.48860251190291987, "x"),),
    ((1.0925484305920792, "xy"),), ((-1.0925484305920792, "yz"),),
    ((0.94617469575755997, "zz"), (-0.31539156525251999, "")),
    ((-1.0925484305920792, "xz"),), ((0.54627421529603959, "xx"), (-0.54627421529603959, "yy")),
    ((-3 * 0.59004358992664352, "xxy"), (0.59004358992664352, "yyy")), ((2.8906114426405538, "xyz"),),
    ((0.45704579946446572, "y"), (-5 * 0.45704579946446572, "yzz")),
    ((5 * 0.3731763325901154, "zzz"), (-3 * 0.3731763325901154, "z")),
    ((0.45704579946446572, "x"), (-5 * 0.45704579946446572, "xzz")),
    ((1.4453057213202769, "xxz"), (-1.4453057213202769, "yyz")),
    ((-0.59004358992664352, "xxx"), (3 * 0.59004358992664352, "xyy")),
)
SH_DEGREE = 3  # the highest degree of _SH_POLYNOMIALS, and the hash field's default (--sh_degree)
_SH_MATRICES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _sh_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(64, 16): the coefficients of each function over the products m_i m_j m_k of m = (1, x, y, z)."""
    key = (device, dtype)
    if key not in _SH_MATRICES:
        matrix = torch.zeros(64, 16, dtype=torch.float64)
        for j, terms in enumerate(_SH_POLYNOMIALS):
            for coefficient, monomial in terms:
                i, k, m = (" xyz".index(c) for c in monomial.rjust(3))
                matrix[(i * 4 + k) * 4 + m, j] += coefficient
        _SH_MATRICES[key] = matrix.to(device, dtype)
    return _SH_MATRICES[key]


def spherical_harmonics(d: torch.Tensor, degree: int = SH_DEGREE) -> torch.Tensor:
    """Real spherical harmonics up to `degree` (0 to SH_DEGREE; (degree + 1)^2 values) of unit directions (N, 3) ->
    (N, (degree + 1)^2), in the order of _SH_POLYNOMIALS.

    Computed as one matrix product over the 64 products of (1, x, y, z) taken three at a time: a handful of
    kernels however many terms, since per-step kernel launches, not arithmetic, bound a training step."""
    assert 0 <= degree <= SH_DEGREE, f"spherical harmonics of degree 0 to {SH_DEGREE}, not {degree}"
    m = torch.nn.functional.pad(d, (1, 0), value=1.0)  # (N, 4): 1, x, y, z
    products = (m[:, :, None, None] * m[:, None, :, None] * m[:, None, None, :]).flatten(1)  # (N, 64)
    return products @ _sh_matrix(d.device, products.dtype)[:, :(degree + 1) ** 2]


def level_resolutions(n_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Grid resolution per level, geometric between base and max (Instant-NGP eq. 2-3)."""
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
    return [int(math.floor(base_resolution * growth ** level)) for level in range(n_levels)]


class HashGrid(nn.Module):
    """Multi-resolution hash encoding of points in [0, 1]^3 -> (N, n_levels * n_features).

    A level whose (resolution + 1)^3 vertices fit in the table is indexed densely; finer levels use the spatial
    hash. Each level's features are trilinearly interpolated from the 8 surrounding vertices.
    """

    def __init__(self, n_levels: int = 16, n_features: int = 2, log2_table_size: int = 19,
                 base_resolution: int = 16, max_resolution: int = 2048) -> None:
        super().__init__()
        self.n_levels, self.n_features = n_levels, n_features
        self.table_size = 2 ** log2_table_size
        resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        # A coarse level needs only its (r + 1)^3 vertices; finer ones share a hashed table of table_size.
        sizes = [min((r + 1) ** 3, self.table_size) for r in resolutions]
        offsets = [sum(sizes[:i]) for i in range(n_levels)]
        self.level_sizes = sizes
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.long), persistent=False)
        self.register_buffer("dense", torch.tensor([(r + 1) ** 3 <= self.table_size for r in resolutions]),
                             persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.table = nn.Parameter(torch.empty(sum(sizes), n_features).uniform_(-1e-4, 1e-4))
        corners = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])
        self.register_buffer("corners", corners, persistent=False)  # (8, 3) offsets
        self.register_buffer("primes", torch.tensor(HASH_PRIMES, dtype=torch.long), persistent=False)

    def decay_loss(self) -> torch.Tensor:
        """Zip-NeRF's normalised weight decay of the grid (Barron et al. 2023, sec. 4): the sum over levels of the
        mean squared feature. A coarse level's few entries each weigh more than a fine level's many, so what is
        held down is broad low-frequency clutter rather than detail. Under Adam an entry no sample reaches moves
        towards zero by about the lr each step (its gradient is the decay alone, normalised)."""
        return sum(level.float().square().mean() for level in self.table.split(self.level_sizes))

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features

    def vertex_indices(self, vertices: torch.Tensor) -> torch.Tensor:
        """Index within each level's table of integer vertices (N, L, 8, 3) -> (N, L, 8)."""
        res = (self.resolutions + 1).view(1, -1, 1)
        dense_index = vertices[..., 0] + res * (vertices[..., 1] + res * vertices[..., 2])
        h = vertices * self.primes
        hashed = (h[..., 0] ^ h[..., 1] ^ h[..., 2]) & (self.table_size - 1)
        return torch.where(self.dense.view(1, -1, 1), dense_index, hashed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) in [0, 1]^3 (clamped). Returns (N, n_levels * n_features), level-major. On the GPU this
        runs the fused Triton kernel, which computes the same function as `reference`."""
        if kernels.available(x) and self.n_features == 2:
            return hash_triton.hash_encode(x, self.table, self.resolutions, self.offsets, self.table_size)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain PyTorch encoding (CPU path, and the definition the fused kernel is tested against)."""
        x = x.float().clamp(0.0, 1.0)
        scaled = x.unsqueeze(1) * self.resolutions.view(1, -1, 1)  # (N, L, 3)
        base = scaled.floor().long().clamp_max(self.resolutions.view(1, -1, 1) - 1)
        frac = scaled - base  # (N, L, 3) in [0, 1]
        vertices = base.unsqueeze(2) + self.corners  # (N, L, 8, 3)
        index = self.vertex_indices(vertices)  # (N, L, 8)
        feats = self.table[(index + self.offsets.view(1, -1, 1)).flatten()].view(*index.shape, self.n_features)
        w = torch.where(self.corners.bool(), frac.unsqueeze(2), 1.0 - frac.unsqueeze(2)).prod(-1)  # (N, L, 8)
        return (feats * w.unsqueeze(-1)).sum(2).flatten(1)
