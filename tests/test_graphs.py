"""The fixed-shape step that CUDA graphs replay (training.graphs): compaction to a capacity equals nonzero, a
pass shaded at a capacity equals the exact pass in values and gradients, and the capacity ladder holds every
count with little to spare. The graphs themselves run in tests/test_gpu.py."""
import math

import pytest
import torch

from mega_nerf import render
from mega_nerf.fields.hash import HashField
from mega_nerf.render import RenderConfig
from mega_nerf.training.graphs import LADDER_BASE, LADDER_STEPS, capacity_for


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_compact_is_nonzero_padded_to_the_capacity(fraction):
    torch.manual_seed(0)
    occupied = torch.rand(5000) < fraction
    count = int(occupied.sum())
    kept = render.compact(occupied, count + 77)
    assert kept.shape == (count + 77,)
    assert torch.equal(kept[:count], occupied.nonzero()[:, 0])
    assert bool((kept[count:] == 5000).all())


def test_capacity_ladder_holds_every_count_with_at_most_one_rung_to_spare():
    rung = 2 ** (1 / LADDER_STEPS)
    seen = set()
    for count in [0, 1, 1023, 1024, 1025, *range(2000, 6_000_000, 9973)]:
        cap = capacity_for(count, 10 ** 9)
        seen.add(cap)
        assert cap >= count and cap % LADDER_BASE == 0
        assert cap <= max(LADDER_BASE, math.ceil(count * rung / LADDER_BASE) * LADDER_BASE), (count, cap)
    assert capacity_for(5000, 4096) == 4096  # never more than every sample of the step
    assert len(seen) <= LADDER_STEPS * math.ceil(math.log2(6_000_000 / LADDER_BASE)) + 1  # few graphs to capture


def test_a_pass_shaded_at_a_capacity_equals_the_exact_pass_with_its_gradients():
    """Padding shades copies of samples into a spare slot that is cut off: the rendered colours and every
    parameter's gradient equal those of the pass that shades exactly the occupied samples."""
    torch.manual_seed(1)
    field = HashField(torch.tensor([-1.0, -1, -1]), torch.tensor([1.0, 1, 1]), n_images=3, log2_table_size=12,
                      max_resolution=64, n_levels=4)
    with torch.no_grad():
        field.grid.table.uniform_(-1, 1)
    R, config = 64, RenderConfig(samples=24, perturb=False)
    origins = torch.randn(R, 3) * 0.2
    dirs = torch.nn.functional.normalize(torch.randn(R, 3), dim=-1)
    near, far = torch.zeros(R), torch.full((R,), 2.0)
    appearance = torch.randint(0, 3, (R,))
    t, starts, ends = render.ray_samples(field, origins, dirs, near, far, config, False)
    occupied = torch.rand(R, 24) < 0.4
    results = []
    for capacity in (None, int(occupied.sum()) + 100):
        field.zero_grad()
        out = render.render_samples(field, origins, dirs, near, far, appearance, config, t, starts, ends, occupied,
                                    capacity)
        (out["rgb"] ** 2).sum().backward()
        results.append((out, {k: p.grad.clone() for k, p in field.named_parameters() if p.grad is not None}))
    (exact, exact_grads), (padded, padded_grads) = results
    assert int(padded["samples"]) == exact["samples"] == int(occupied.sum())
    for key in ("rgb", "depth", "opacity", "weights"):
        assert torch.allclose(padded[key], exact[key], atol=1e-6), key
    assert exact_grads.keys() == padded_grads.keys() and len(exact_grads) >= 6
    for key, grad in exact_grads.items():
        assert torch.allclose(padded_grads[key], grad, rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("warmup,interval", [(32, 8), (30, 8), (0, 5), (7, 1), (1, 16)])
def test_graphs_wait_for_the_hash_fields_first_occupancy_update(warmup, interval, monkeypatch):
    """The trainer captures graphs once the field says its grid is estimated (an earlier capacity would shade every
    sample in the box): that is from the step of after_step's first update on, whatever the warm-up and interval."""
    field = HashField(torch.zeros(3), torch.ones(3), n_images=1, log2_table_size=8, max_resolution=32,
                      occupancy_resolution=4, occupancy_warmup=warmup, occupancy_interval=interval)
    updates = []
    monkeypatch.setattr(field, "update_occupancy", lambda *a: updates.append(step))
    assert not field.occupancy_estimated(0)
    for step in range(1, 60):
        field.after_step(step)
        assert field.occupancy_estimated(step) == bool(updates), step
    assert updates
