"""Speed of the hash-grid encoding's forward + backward on the GPU: the fused Triton kernels against the plain
PyTorch reference (`HashGrid.reference`), on points spread uniformly and on contended points (the samples of
many rays inside a small region of a big box, most in a few cells of the coarse levels, where atomic adds to
one table entry serialise). Each case first checks the fused gradient against the reference on fewer points.

    python bench/hash_backward.py [--points 2097152] [--repeats 20] [--per_level]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from mega_nerf.fields.encoding import HashGrid  # noqa: E402
from mega_nerf.fields.kernels import hash_encode  # noqa: E402


def uniform_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) uniform in [0, 1]^3."""
    return torch.rand(n, 3, generator=generator, device="cuda")


def ray_points(n: int, generator: torch.Generator, samples: int = 64, side: float = 0.04) -> torch.Tensor:
    """(n, 3) samples of n / samples rays inside a cube of `side` (a few cells of the coarsest level), ray by ray
    and near to far along each, as the trainer hands them over."""
    rays = -(-n // samples)
    origins = torch.tensor([0.5, 0.5, 0.3], device="cuda") + side * (torch.rand(rays, 3, generator=generator,
                                                                                 device="cuda") - 0.5)
    dirs = torch.nn.functional.normalize(torch.randn(rays, 3, generator=generator, device="cuda"), dim=-1)
    t = torch.linspace(0.0, side, samples, device="cuda")
    return (origins[:, None] + dirs[:, None] * t[None, :, None]).reshape(-1, 3)[:n].clamp(0.0, 1.0)


def cluster_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) in three tiny clusters, in random order (no run of equal cells survives without sorting)."""
    centers = torch.tensor([[0.31, 0.52, 0.77], [0.9, 0.1, 0.5], [0.05, 0.95, 0.33]], device="cuda")
    pick = torch.randint(0, 3, (n,), generator=generator, device="cuda")
    return (centers[pick] + 0.003 * torch.randn(n, 3, generator=generator, device="cuda")).clamp(0.0, 1.0)


CASES = {"uniform": uniform_points, "rays in a small region": ray_points, "3 tiny clusters": cluster_points}


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of fn over `repeats` runs, timed with CUDA events after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def forward_backward(grid: HashGrid, x: torch.Tensor, grad: torch.Tensor, fused: bool) -> torch.Tensor:
    """The table gradient of sum(encoding(x) * grad), through the fused kernels or the reference."""
    grid.table.grad = None
    out = grid(x) if fused else grid.reference(x)
    out.backward(grad)
    return grid.table.grad


def check_gradient(grid: HashGrid, x: torch.Tensor, generator: torch.Generator) -> float:
    """Relative error (norm) of the fused table gradient against the reference's; raises past 1e-4 (float32
    summation order and the one-ulp rounding of x * resolution that tests/test_gpu.py explains)."""
    grad = torch.randn(x.shape[0], grid.output_dim, generator=generator, device="cuda")
    fast = forward_backward(grid, x, grad, fused=True).clone()
    ref = forward_backward(grid, x, grad, fused=False)
    error = ((fast - ref).norm() / ref.norm()).item()
    if not error < 1e-4:
        raise AssertionError(f"fused gradient differs from the reference: relative error {error:.2e}")
    return error


def per_level_ms(grid: HashGrid, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> list[tuple[float, float]]:
    """Backward milliseconds of each level alone, (plain atomic adds, summed runs first)."""
    table = torch.zeros_like(grid.table)

    def backward(level: int, aggregate: bool) -> None:
        hash_encode.backward_into(table, x, grad, grid.resolutions, grid.offsets, grid.table_size,
                                  range(level, level + 1), aggregate)

    return [(time_ms(partial(backward, level, False), repeats), time_ms(partial(backward, level, True), repeats))
            for level in range(grid.n_levels)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=2 ** 21, help="samples per step (32768 rays x ~64)")
    p.add_argument("--check_points", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--per_level", action="store_true", help="also time each level's backward, plain and summed")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    grid = HashGrid(16, 2, 19, 16, 2048).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0, generator=generator)
    lines = ["| points | fused fwd ms | fused fwd+bwd ms | (bwd) | fused samples/s | reference fwd+bwd ms | "
             "grad rel. error |", "|---|---|---|---|---|---|---|"]
    for name, points in CASES.items():
        error = check_gradient(grid, points(args.check_points, generator), generator)
        x = points(args.points, generator)
        grad = torch.randn(args.points, grid.output_dim, generator=generator, device="cuda")
        with torch.no_grad():
            fwd = time_ms(lambda x=x: grid(x), args.repeats)
        fused = time_ms(lambda x=x, g=grad: forward_backward(grid, x, g, fused=True), args.repeats)
        ref = time_ms(lambda x=x, g=grad: forward_backward(grid, x, g, fused=False), max(args.repeats // 4, 3))
        rate = args.points / fused * 1e3
        print(f"{name}: fused {fused:.2f} ms fwd+bwd ({fwd:.2f} fwd, {rate:,.0f} samples/s), reference {ref:.2f} ms, "
              f"gradient error {error:.1e}", flush=True)
        lines.append(f"| {name} | {fwd:.2f} | {fused:.2f} | {fused - fwd:.2f} | {rate:,.0f} | {ref:.2f} | "
                     f"{error:.1e} |")
        if args.per_level:
            x_flat = x.float().contiguous()
            for level, (plain, summed) in enumerate(per_level_ms(grid, x_flat, grad, args.repeats)):
                print(f"  level {level:2d} res {int(grid.resolutions[level]):4d}: plain {plain:.3f} ms, "
                      f"summed {summed:.3f} ms", flush=True)
    table = (f"{args.points:,} points, 16 levels x 2 features, table 2^19 per level, resolutions 16..2048; "
             "median of CUDA-event timings.\n\n" + "\n".join(lines))
    append_results(args.results, "Hash-grid encoding, forward + backward", "python " + " ".join(sys.argv), table)


if __name__ == "__main__":
    main()
