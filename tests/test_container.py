"""The merged container (routing, blending, file format) and merging checkpoints into it.

Submodules here are small hash fields with random weights: routing and blending need no training.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import dead_pid

from mega_nerf.data.chunks import masks_fingerprint
from mega_nerf.errors import UserError
from mega_nerf.fields import build_field, old_default_options
from mega_nerf.fields.base import Field
from mega_nerf.io import HOST
from mega_nerf.merging import container as container_module
from mega_nerf.merging.container import Container, blend_weights, load_container
from mega_nerf.merging.merge import merge_submodules
from mega_nerf.partition.cells import PartitionParams
from mega_nerf.render import RenderConfig, render_in_chunks
from mega_nerf.training.checkpoint import VERSION as CKPT_VERSION

REPO = Path(__file__).resolve().parents[1]
MARGIN = 1.15
# A 2 x 2 grid of cells in (y, z), centroids at x = 0 (as partition.grid_centroids lays them out).
CENTROIDS = torch.tensor([[0.0, -0.5, -0.5], [0.0, -0.5, 0.5], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5]])
CONFIG = {"kind": "hash", "box_min": [-1.0, -1.0, -1.0], "box_max": [1.0, 1.0, 1.0], "n_images": 3,
          "appearance_dim": 4, "hidden": 16, "n_levels": 4, "log2_table_size": 8, "max_resolution": 32,
          "occupancy_resolution": 8, "occupancy_threshold": 0.25}


def random_field(seed: int, config: dict | None = None) -> Field:
    """A hash field whose every weight (tables included) is drawn N(0, 0.5): outputs vary over space."""
    torch.manual_seed(seed)
    field = build_field(config or CONFIG)
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0.0, 0.5)
    return field.eval()


def random_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=g) * 2 - 1
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    return points, dirs, torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def fields() -> list[Field]:
    return [random_field(k) for k in range(4)]


def reference_weights(point: list[float], centroids: list[list[float]], margin: float) -> list[float]:
    """Slow per-point reference of the blend (container docstring): inverse distance, tapered to zero at the
    edge of membership, normalised."""
    dist = [sum((p - c) ** 2 for p, c in zip(point, centroid, strict=True)) ** 0.5 for centroid in centroids]
    nearest = min(dist)
    raw = []
    for d in dist:
        ratio = d / nearest
        taper = 1.0 if margin == 1 else min(1.0, max(0.0, (margin - ratio) / (margin - 1)))
        raw.append(taper / d if ratio <= margin else 0.0)
    return [w / sum(raw) for w in raw]


def test_blend_weights_match_reference_and_sum_to_one() -> None:
    points = random_inputs(300, seed=1)[0]
    for margin in (1.0, 1.15, 1.5):
        w = blend_weights(points, CENTROIDS, margin, cluster_2d=False)
        ref = torch.tensor([reference_weights(p, CENTROIDS.tolist(), margin) for p in points.double().tolist()],
                           dtype=torch.float64)
        assert torch.allclose(w.double(), ref, atol=1e-5)
        assert torch.allclose(w.sum(1), torch.ones(len(points)), atol=1e-6)
    nearest = torch.cdist(points, CENTROIDS).argmin(1)
    assert torch.equal(blend_weights(points, CENTROIDS, 1.0, False).argmax(1), nearest)
    assert (blend_weights(points, CENTROIDS, 1.0, False).max(1).values == 1).all()


def test_cluster_2d_ignores_altitude() -> None:
    points = random_inputs(100, seed=2)[0]
    lifted = points.clone()
    lifted[:, 0] += 0.7
    assert torch.equal(blend_weights(points, CENTROIDS, MARGIN, True), blend_weights(lifted, CENTROIDS, MARGIN, True))
    assert not torch.equal(blend_weights(points, CENTROIDS, MARGIN, False),
                           blend_weights(lifted, CENTROIDS, MARGIN, False))


def test_inside_a_cell_equals_its_submodule_exactly(fields: list[Field]) -> None:
    """Away from boundary bands a point's weight is exactly 1, so the container adds nothing to its submodule's
    output. Compared on the same batch of points (an MLP's last bits can depend on the batch it runs in); in a
    batch mixed with blended points, to float rounding."""
    points, dirs, app = random_inputs(3000)
    container = Container(CENTROIDS, fields, MARGIN, cluster_2d=False)
    dist = torch.cdist(points.double(), CENTROIDS.double())  # independent of the container's arithmetic
    nearest = dist.argmin(1)
    others = dist.scatter(1, nearest[:, None], float("inf")).min(1).values
    inside = others > MARGIN * dist.min(1).values * (1 + 1e-4)  # away from every boundary band
    assert 500 < inside.sum() < 2500
    with torch.no_grad():
        density, rgb = container(points[inside], dirs[inside], app[inside])
        mixed_density, mixed_rgb = container(points, dirs, app)
        for k, field in enumerate(fields):
            sel = nearest[inside] == k
            assert sel.sum() > 50
            sigma, color = field(points[inside][sel], dirs[inside][sel], app[inside][sel])
            assert torch.equal(density[sel], sigma) and torch.equal(rgb[sel], color)
            assert torch.allclose(mixed_density[inside][sel], sigma, rtol=1e-6, atol=0)
            assert torch.allclose(mixed_rgb[inside][sel], color, rtol=1e-6, atol=0)


def walk_steps(fields: list[Field], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk in n points from inside cell 0 into cell 2, across the y = 0 boundary band. Returns the largest
    change between neighbouring points of (weights, rgb, density), (3,), for the container and for Mega-NeRF's
    hard cut (inverse distance over member cells, nothing outside)."""
    t = torch.linspace(0, 1, n)[:, None]
    start, end = torch.tensor([0.1, -0.45, -0.3]), torch.tensor([0.1, 0.45, -0.3])
    points = start + t * (end - start)
    dirs = torch.tensor([[0.0, 0.6, 0.8]]).expand_as(points)
    app = torch.zeros(n, dtype=torch.long)
    container = Container(CENTROIDS, fields, MARGIN, cluster_2d=False)
    dist = torch.cdist(points, CENTROIDS)
    hard = torch.where(dist <= MARGIN * dist.min(1, keepdim=True).values, 1 / dist, torch.zeros_like(dist))
    hard = hard / hard.sum(1, keepdim=True)
    with torch.no_grad():
        own = [field(points, dirs, app) for field in fields]
        ours = (container.weights(points), *reversed(container(points, dirs, app)))
    assert ours[0][0, 0] == 1 and ours[0][-1, 2] == 1 and ((ours[0] > 0).sum(1) > 1).any()  # crosses a band
    theirs = (hard, sum(hard[:, k, None] * own[k][1] for k in range(4)), sum(hard[:, k] * own[k][0] for k in range(4)))

    def steps(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.tensor([float(o.diff(dim=0).abs().max()) for o in outputs])
    return steps(ours), steps(theirs)


def test_blend_is_continuous_across_boundaries(fields: list[Field]) -> None:
    """Continuous outputs change less between neighbouring points when the points are closer: ten times
    finer steps must shrink the largest change (weights, rgb, density) by far. The hard cut's jumps do not
    shrink: this test fails for it."""
    (ours_coarse, hard_coarse), (ours_fine, hard_fine) = walk_steps(fields, 1001), walk_steps(fields, 10001)
    assert (ours_fine < 0.3 * ours_coarse).all()
    assert (ours_coarse[:2] < 0.05).all()  # weights and rgb, per 1e-3 step
    assert (hard_fine > 0.5 * hard_coarse).all()


class CountingField(Field):
    """Wraps a field and records the points each call receives."""

    def __init__(self, inner: Field) -> None:
        super().__init__()
        self.inner = inner
        self.forward_calls: list[torch.Tensor] = []
        self.occupied_calls = 0

    def forward(self, positions: torch.Tensor, directions: torch.Tensor, appearance: torch.Tensor,
                ray_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.forward_calls.append(positions.clone())
        return self.inner(positions, directions, appearance, ray_of)

    def occupied(self, positions: torch.Tensor) -> torch.Tensor:
        self.occupied_calls += 1
        return self.inner.occupied(positions)

    def background(self, directions: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        return self.inner.background(directions, appearance)


def test_each_submodule_runs_once_per_batch_on_its_points(fields: list[Field]) -> None:
    counted = [CountingField(f) for f in fields]
    container = Container(CENTROIDS, counted, MARGIN, cluster_2d=False)
    points, dirs, app = random_inputs(2000, seed=3)
    weights = blend_weights(points, CENTROIDS, MARGIN, False)
    with torch.no_grad():
        container(points, dirs, app)
    for k, c in enumerate(counted):
        assert len(c.forward_calls) == 1
        assert torch.equal(c.forward_calls[0], points[weights[:, k] > 0])
    assert sum(len(c.forward_calls[0]) for c in counted) == int((weights > 0).sum())


def test_empty_cells_route_among_the_rest(fields: list[Field]) -> None:
    points, dirs, app = random_inputs(1000, seed=4)
    with_empty = Container(CENTROIDS, [None, *fields[1:]], MARGIN, cluster_2d=False)
    without = Container(CENTROIDS[1:], fields[1:], MARGIN, cluster_2d=False)
    assert with_empty.cells == [1, 2, 3]
    with torch.no_grad():
        a, b = with_empty(points, dirs, app), without(points, dirs, app)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def gated_fields(resolution: int = 8) -> list[Field]:
    """Four random hash fields whose occupancy grids are random halves of their cells."""
    g = torch.Generator().manual_seed(5)
    gated = [random_field(10 + k, {**CONFIG, "occupancy_resolution": resolution}) for k in range(4)]
    for f in gated:
        f.occupancy.mask.copy_(torch.rand(f.occupancy.mask.shape, generator=g) > 0.5)
    return gated


def routed_occupancy(fields: list[Field], points: torch.Tensor, cluster_2d: bool) -> torch.Tensor:
    """(N,) bool, the definition: occupied in some submodule the point is routed to (blend weight > 0)."""
    weights = blend_weights(points, CENTROIDS, MARGIN, cluster_2d)
    own = torch.stack([f.occupied(points) for f in fields], 1)
    return (own & (weights > 0)).any(1)


def test_occupied_is_any_routed_submodule_and_gates_density() -> None:
    """Without a union grid (wrapped fields), occupancy is the routed definition itself; density is gated by
    each submodule's own grid either way."""
    gated = gated_fields()
    points, dirs, app = random_inputs(2000, seed=6)
    exact = Container(CENTROIDS, [CountingField(f) for f in gated], MARGIN, cluster_2d=False)
    assert exact.occupancy_mask is None and exact.grid_lookup() is None  # no single grid to look up
    assert torch.equal(exact.occupied(points), routed_occupancy(gated, points, False))
    weights = blend_weights(points, CENTROIDS, MARGIN, False)
    own = torch.stack([f.occupied(points) for f in gated], 1)
    with torch.no_grad():
        sigma = torch.stack([f(points, dirs, app)[0] for f in gated], 1)
        for container in (exact, Container(CENTROIDS, gated, MARGIN, cluster_2d=False)):
            density = container(points, dirs, app)[0]
            assert torch.allclose(density, (weights * sigma * own).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cluster_2d", [False, True])
def test_union_grid_covers_the_routed_occupancy_and_little_more(cluster_2d: bool) -> None:
    """The union grid is True at every point the routed definition calls occupied (checked at 40 random points
    in each of its cells), and at few cells where none of those points is."""
    gated = gated_fields(resolution=16)
    container = Container(CENTROIDS, gated, MARGIN, cluster_2d=cluster_2d)
    r = 16
    cells = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    u = (cells + torch.rand(r ** 3, 40, 3, generator=torch.Generator().manual_seed(9))) / r  # (cells, 40, 3)
    points = (u * 2 - 1).reshape(-1, 3)  # the box is [-1, 1]^3
    routed = routed_occupancy(gated, points, cluster_2d)
    grid = container.occupied(points)
    assert (grid | ~routed).all()  # a superset
    per_cell_routed = routed.view(-1, 40).any(1)
    extra = (container.occupancy_mask & ~per_cell_routed).sum() / per_cell_routed.sum()
    assert extra < 0.1, float(extra)


def test_union_grid_renders_the_same_image() -> None:
    """The union grid only changes which samples are shaded, never the image."""
    gated = gated_fields(resolution=16)
    with_grid = Container(CENTROIDS, gated, MARGIN, cluster_2d=False)
    exact = Container(CENTROIDS, [CountingField(f) for f in gated], MARGIN, cluster_2d=False)
    assert torch.allclose(render_rays(with_grid), render_rays(exact), atol=1e-6)


def test_background_is_the_mean_of_submodules(fields: list[Field]) -> None:
    _, dirs, app = random_inputs(50, seed=7)
    container = Container(CENTROIDS, [fields[0], None, fields[2], None], MARGIN, cluster_2d=False)
    with torch.no_grad():
        expected = (fields[0].background(dirs, app) + fields[2].background(dirs, app)) / 2
        assert torch.allclose(container.background(dirs, app), expected, atol=1e-7)


# ---- merging checkpoints and the container file ----

def write_partition(root: Path, fields: list[Field | None], n_images: int = 3, **changes: object) -> Path:
    """params.pt and one checkpoint per field at root/exp-<k>/checkpoints/ (None: no checkpoint), laid out as
    mega_nerf.training writes them; `changes` edits checkpoint keys of cell 1."""
    params = PartitionParams(
        origin_drb=torch.zeros(3, dtype=torch.float64), pose_scale_factor=1.0, ray_altitude_range=(-0.5, 0.6),
        near=0.01, far=2.0, centroids=CENTROIDS.clone(), grid_dim=(2, 2), min_position=-torch.ones(3),
        max_position=torch.ones(3), cluster_2d=False, boundary_margin=MARGIN, ray_samples=32,
        image_sizes={f"{i:03d}": (8, 8) for i in range(n_images)})
    root.mkdir(parents=True, exist_ok=True)
    params.save(root / "params.pt")
    for k, field in enumerate(fields):
        if field is None:
            continue
        state = {"version": CKPT_VERSION, "step": 100 + k, "field_config": dict(CONFIG),
                 "model": field.state_dict(), "optimizer": {}, "stream": {}, "rng": {}, "dataset": "abc",
                 "empty": False, "cell": str(k), "render": {"samples": 16, "fine_samples": 0, "bg_samples": 96},
                 "scene": {"near": 0.01, "far": 2.0, "altitude_range": [-0.5, 0.6]}}
        if k == 1:
            state.update(changes)
        (root / f"exp-{k}" / "checkpoints").mkdir(parents=True)
        torch.save(state, root / f"exp-{k}" / "checkpoints" / f"{state['step']:08d}.pt")
    return root / "params.pt"


def merge(root: Path, allow: bool = False) -> Path:
    out = root / "merged.pt"
    merge_submodules(f"{root}/exp-", root / "params.pt", out, allow, default_margin=1.15)
    return out


def render_rays(field: Field, n: int = 256) -> torch.Tensor:
    """Render n rays crossing the box (fixed seed) -> (n, 3) rgb."""
    g = torch.Generator().manual_seed(8)
    origins = torch.rand(n, 3, generator=g) * 0.4 - torch.tensor([0.9, 0.2, 0.2])
    dirs = torch.nn.functional.normalize(torch.rand(n, 3, generator=g) - torch.tensor([-1.0, 0.5, 0.5]), dim=-1)
    near, far = torch.full((n,), 0.01), torch.full((n,), 1.5)
    app = torch.randint(0, 3, (n,), generator=g)
    return render_in_chunks(field, origins, dirs, near, far, app, RenderConfig(32, 0, perturb=False))["rgb"]


def test_merge_round_trip_and_float16_tables(tmp_path: Path, fields: list[Field]) -> None:
    """The container file holds the submodules with float16 hash tables: smaller by the bytes saved, and
    renders within 2e-3 of the float32 submodules (random N(0, 0.5) weights; trained ones: test_eval)."""
    write_partition(tmp_path, fields)
    container, info = load_container(merge(tmp_path))
    assert info.cells == [0, 1, 2, 3] and info.steps == [100, 101, 102, 103] and info.dataset == "abc"
    assert info.render == RenderConfig(16, 0, bg_samples=96, perturb=False) and info.altitude_range == (-0.5, 0.6)
    reference = Container(CENTROIDS, fields, MARGIN, cluster_2d=False)
    assert float((render_rays(container) - render_rays(reference)).abs().max()) < 2e-3
    stored = torch.load(tmp_path / "merged.pt", weights_only=True)["submodules"]
    assert all(entry["model"]["grid.table"].dtype == torch.float16 for entry in stored)
    assert all(f.grid.table.dtype == torch.float16 for f in container.submodules)  # kept half when loaded
    for entry in stored:
        entry["model"]["grid.table"] = entry["model"]["grid.table"].float()
    float32 = tmp_path / "float32" / "merged.pt"  # same name: torch.save puts it in every record's header
    float32.parent.mkdir()
    torch.save({**torch.load(tmp_path / "merged.pt", weights_only=True), "submodules": stored}, float32)
    saved = sum(f.grid.table.numel() * 2 for f in fields)
    assert float32.stat().st_size - (tmp_path / "merged.pt").stat().st_size > 0.5 * saved  # zip padding varies


def test_merge_warns_of_a_cell_stopped_short(tmp_path: Path, fields: list[Field],
                                             capsys: pytest.CaptureFixture) -> None:
    """A cell whose checkpoint is short of its run's planned steps (still training, or interrupted) is merged as it
    is, with a warning naming it; a finished one (cell 0 here) and one that records no plan (older) without."""
    write_partition(tmp_path, fields, iterations=500)  # cell 1 stopped at step 101 of 500
    for k in (0, 2):
        path = next((tmp_path / f"exp-{k}" / "checkpoints").iterdir())
        torch.save({**torch.load(path, weights_only=True), "iterations": 100 + k}, path)
    merge(tmp_path)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: cell 1 stopped at step 101 of 500 (still training, or interrupted: its rerun "
                        "finishes it); merged as it is"]


def test_a_killed_merges_temp_file_goes_and_nothing_else_of_its_folder(tmp_path: Path, fields: list[Field]) -> None:
    """The output's folder is the user's: a merge removes its own output's temp file that a dead run left (as large
    as the container), and leaves another file's, a dead one's too."""
    write_partition(tmp_path, fields)
    dead = dead_pid()
    killed, other = tmp_path / f"merged.pt.{dead}-{HOST}.tmp", tmp_path / f"notes.txt.{dead}-{HOST}.tmp"
    for leftover in (killed, other):
        leftover.write_bytes(b"half")
    merge(tmp_path)
    assert not killed.exists() and other.exists() and (tmp_path / "merged.pt").is_file()


def test_merge_missing_cell(tmp_path: Path, fields: list[Field]) -> None:
    write_partition(tmp_path, [fields[0], fields[1], None, fields[3]])
    with pytest.raises(UserError, match=r"^submodule 2: no checkpoint in .*exp-2.*--allow_empty_cells"):
        merge(tmp_path)
    container, info = load_container(merge(tmp_path, allow=True))
    assert info.cells == [0, 1, 3] and info.steps[2] is None
    points, dirs, app = random_inputs(500, seed=9)
    with torch.no_grad():
        got = container(points, dirs, app)[1]
        expected = Container(CENTROIDS[[0, 1, 3]], [fields[0], fields[1], fields[3]], MARGIN, False)(
            points, dirs, app)[1]
    assert torch.allclose(got, expected, atol=2e-3)


@pytest.mark.parametrize("changes, message", [
    ({"field_config": {**CONFIG, "log2_table_size": 9}},
     r"submodule 1 .*field differs .*\(log2_table_size \(9, 8\): its value, then the other's\)$"),
    ({"field_config": {**CONFIG, "log2_table_size": 19}},  # the old default, but the other is not today's: no hint
     r"submodule 1 .*\(log2_table_size \(19, 8\): its value, then the other's\)$"),
    ({"field_config": {**CONFIG, "horizon_background": True}},  # the others lack it, as before it was the default
     r"submodule 1 .*\(horizon_background \(True, unset\).*; submodule 0 was trained at older defaults: train every "
     r"cell with --no_horizon_background, or retrain it at today's$"),
    ({"render": {"samples": 16, "fine_samples": 0, "bg_samples": 32}},  # the other order: submodule 1 is older
     r"submodule 1 .*: render settings .*; submodule 1 was trained at older defaults: train every cell with "
     r"--bg_samples 32, or retrain it at today's$"),
    ({"field_config": {**CONFIG, "occupancy_threshold": 0.5}, "render": {"samples": 32, "fine_samples": 0,
                                                                        "bg_samples": 96}},
     r"submodule 1 .*: render settings \{'samples': 32, .*\} differ from submodule 0's \{'samples': 16, .*\}$"),
    ({"field_config": {**CONFIG, "occupancy_threshold": 0.5}},  # not as its samples: another field
     r"submodule 1 .*field differs .*\(occupancy_threshold \(0.5, 0.25\): its value, then the other's\)$"),
    ({"dataset": "other"}, r"submodule 1 .*another dataset than submodule 0"),
    ({"cell": "3"}, r"submodule 1 .*trained on cell 3, not cell 1"),
    ({"render": {"samples": 64, "fine_samples": 0}}, r"submodule 1 .*render settings"),
    ({"scene": {"near": 0.01, "far": 3.0, "altitude_range": [-0.5, 0.6]}},
     r"params.pt: near/far/altitude range .* differ from submodule 1 .*'s .* \(the params.pt of another partition, "),
])
def test_merge_mismatched_submodule(tmp_path: Path, fields: list[Field], changes: dict, message: str) -> None:
    write_partition(tmp_path, fields, **changes)
    with pytest.raises(UserError, match=message):
        merge(tmp_path)


def test_old_defaults_are_named_only_where_a_checkpoint_holds_them_and_the_run_todays() -> None:
    """old_default_options: the options that give back changed defaults, where the saved config holds the old
    value and the asked one today's, and they are all that differs; not the other way round, nor against a value
    that is neither, nor beside other differences (another kind of field; no altitude slab, so no horizon
    background, and another box)."""
    today = {**CONFIG, "log2_table_size": 22, "horizon_background": True}
    assert old_default_options({**CONFIG, "log2_table_size": 19}, today) == ["--no_horizon_background",
                                                                             "--log2_hashmap_size 19"]
    assert old_default_options({**CONFIG, "log2_table_size": 21, "horizon_background": True}, today) == [
        "--log2_hashmap_size 21"]  # each earlier default by its own option
    assert old_default_options(today, {**CONFIG, "log2_table_size": 19}) == []
    assert old_default_options({**CONFIG, "log2_table_size": 19}, {**CONFIG, "log2_table_size": 14}) == []
    assert old_default_options({**CONFIG, "log2_table_size": 20, "horizon_background": True}, today) == []
    unsaved_width = {k: v for k, v in CONFIG.items() if k != "appearance_dim"}  # a hash field's 32, completed
    assert old_default_options(unsaved_width, {**CONFIG, "appearance_dim": 8}) == ["--appearance_dim 32"]
    assert old_default_options({"bg_samples": 32}, {"bg_samples": 96}) == ["--bg_samples 32"]
    assert old_default_options({"bg_samples": 64}, {"bg_samples": 96}) == ["--bg_samples 64"]
    assert old_default_options({"bg_samples": 32}, {"bg_samples": 64}) == []  # 64 is no longer today's
    assert old_default_options({"bg_samples": 32, "samples": 64}, {"bg_samples": 96, "samples": 128}) == []
    assert old_default_options({**CONFIG, "kind": "mlp"}, today) == []
    assert old_default_options({**CONFIG, "log2_table_size": 19, "box_max": [2.0, 1.0, 1.0]}, today) == []


def test_merge_disagrees_with_params(tmp_path: Path, fields: list[Field]) -> None:
    write_partition(tmp_path, fields, n_images=5)
    with pytest.raises(UserError, match=r"trained on 3 images, but .*params.pt was made from 5"):
        merge(tmp_path)
    (tmp_path / "exp-4" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match=r"exp-4: a submodule beyond the partition's 4 cells"):
        merge(tmp_path)


def test_merge_refuses_the_params_of_another_partition(tmp_path: Path, fields: list[Field]) -> None:
    """Cell 1's checkpoint records the fingerprint of the masks it was trained with (A/1): params.pt with other
    masks in its folder 1/ is another partition's, and the error names the masks the run's config.yaml gives; a
    run that names that very folder trained on it before the partition was made again there. The same masks there
    merge; so do no mask folders beside params.pt (a copied params.pt) and checkpoints that record no masks (older
    ones: cells 0, 2, 3 here, whose folder 0/ holds other masks)."""
    trained = tmp_path / "A" / "1"
    trained.mkdir(parents=True)
    (trained / "000.mask").write_bytes(b"the masks cell 1 trained with")
    params = write_partition(tmp_path / "B", fields, masks=masks_fingerprint(trained))
    for cell in ("0", "1"):
        (tmp_path / "B" / cell).mkdir()
        (tmp_path / "B" / cell / "000.mask").write_bytes(b"another partition's masks")
    refused = (rf"^{re.escape(str(params))}: not the partition the submodules were trained on \(submodule 1, "
               rf"{re.escape(str(tmp_path / 'B' / 'exp-1' / 'checkpoints' / '00000101.pt'))}, was trained with "
               rf"other masks than {re.escape(str(tmp_path / 'B' / '1'))}\); ")
    with pytest.raises(UserError, match=refused + "give --centroid_path the params.pt of the masks it was trained "
                                                  "with$"):
        merge(tmp_path / "B")
    config = tmp_path / "B" / "exp-1" / "config.yaml"
    config.write_text(f"cluster_mask_path: {trained}\n")
    with pytest.raises(UserError, match=refused + rf"it was trained with --cluster_mask_path "
                                                  rf"{re.escape(str(trained))}: give --centroid_path "
                                                  rf"{re.escape(str(trained.parent))}$"):
        merge(tmp_path / "B")
    config.write_text(f"cluster_mask_path: {tmp_path / 'B' / '1'}\n")  # that very folder, since made again
    cell_1 = re.escape(str(tmp_path / "B" / "1"))
    with pytest.raises(UserError, match=rf"^{re.escape(str(params))}: its cells' masks changed since the submodules "
                                        rf"trained on them \(submodule 1, .+, and {cell_1}: the partition was made "
                                        r"again\?\); train the cells again, or merge with the partition they were "
                                        r"trained on$"):
        merge(tmp_path / "B")
    config.write_text("cluster_mask_path: B/1\n")  # relative to where that run started, unknown here: not trusted
    with pytest.raises(UserError, match=refused + r"give --centroid_path the params.pt of the masks it was trained "
                                                  r"with \(--cluster_mask_path B/1, relative to where it ran\)$"):
        merge(tmp_path / "B")
    config.write_text(f"cluster_mask_path: {trained}\n")
    shutil.copy(trained / "000.mask", tmp_path / "B" / "1" / "000.mask")
    merge(tmp_path / "B")
    shutil.rmtree(tmp_path / "B" / "1")
    merge(tmp_path / "B")


def test_bad_container_files(tmp_path: Path, fields: list[Field], monkeypatch: pytest.MonkeyPatch) -> None:
    write_partition(tmp_path, fields)
    merged = merge(tmp_path)
    with pytest.raises(UserError, match="container file not found"):
        load_container(tmp_path / "nothing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(merged.read_bytes()[: merged.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.pt: unreadable or truncated container file"):
        load_container(truncated)
    state = torch.load(merged, weights_only=True)
    torch.save({**state, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(UserError, match="future.pt: not a container file of this version"):
        load_container(tmp_path / "future.pt")
    checkpoint = next((tmp_path / "exp-0" / "checkpoints").iterdir())
    with pytest.raises(UserError, match="a training checkpoint, not a container"):
        load_container(checkpoint)

    def out_of_memory(config: dict) -> Field:
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(container_module, "build_field", out_of_memory)  # a submodule built on a full device
    with pytest.raises(UserError, match=r"merged.pt: submodule 0 does not fit in the memory free on cpu$"):
        load_container(merged)


def test_merge_cli_error_is_one_line(tmp_path: Path, fields: list[Field]) -> None:
    write_partition(tmp_path, [fields[0], None, fields[2], fields[3]])
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "merge_submodules.py"), "--ckpt_prefix",
                             f"{tmp_path}/exp-", "--centroid_path", str(tmp_path / "params.pt"), "--output",
                             str(tmp_path / "merged.pt")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: submodule 1: no checkpoint in {tmp_path}/exp-1/checkpoints (train it, or pass "
        "--allow_empty_cells to merge without it)"]
    assert not (tmp_path / "merged.pt").exists()
