"""Fields: the hash grid against a slow direct evaluation of its formula, encodings against their definitions,
gradients, the box, the occupancy grid, and the switch that turns the Triton kernels off."""
import importlib
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from mega_nerf.bounds import box_to_world
from mega_nerf.fields import build_field, kernels
from mega_nerf.fields.encoding import HASH_PRIMES, HashGrid, level_resolutions, positional_encoding, spherical_harmonics
from mega_nerf.fields.occupancy import OccupancyGrid, cell_index


def slow_hash_grid(grid: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """Instant-NGP's encoding written point by point with Python integers (independent of the vectorised code)."""
    table = grid.table.detach().double()
    out = torch.zeros(x.shape[0], grid.n_levels * grid.n_features, dtype=torch.float64)
    T = grid.table_size
    for n, p in enumerate(x.double().tolist()):
        for level in range(grid.n_levels):
            res = int(grid.resolutions[level])
            dense = (res + 1) ** 3 <= T
            offset = sum(min((int(r) + 1) ** 3, T) for r in grid.resolutions[:level])
            scaled = [c * res for c in p]
            base = [min(int(math.floor(s)), res - 1) for s in scaled]
            frac = [s - b for s, b in zip(scaled, base)]
            for corner in range(8):
                bits = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
                v = [b + o for b, o in zip(base, bits)]
                if dense:
                    index = v[0] + (res + 1) * (v[1] + (res + 1) * v[2])
                else:
                    index = ((v[0] * HASH_PRIMES[0]) ^ (v[1] * HASH_PRIMES[1]) ^ (v[2] * HASH_PRIMES[2])) % T
                w = 1.0
                for f, o in zip(frac, bits):
                    w *= f if o else 1 - f
                out[n, level * grid.n_features:(level + 1) * grid.n_features] += w * table[offset + index]
    return out


def test_hash_grid_equals_direct_formula():
    torch.manual_seed(0)
    grid = HashGrid(n_levels=6, n_features=2, log2_table_size=10, base_resolution=4, max_resolution=200)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    assert bool(grid.dense.any()) and not bool(grid.dense.all())  # both index paths are exercised
    x = torch.rand(40, 3)
    x[0] = torch.tensor([0.0, 1.0, 0.5])  # faces of the unit cube
    expected = slow_hash_grid(grid, x)
    assert torch.allclose(grid(x).double(), expected, atol=1e-4)  # float32 positions at resolution 199


def test_hash_decay_is_the_sum_over_levels_of_the_mean_squared_feature():
    torch.manual_seed(0)
    grid = HashGrid(n_levels=6, n_features=2, log2_table_size=10, base_resolution=4, max_resolution=200)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    expected, start = 0.0, 0
    for r in level_resolutions(6, 4, 200):
        size = min((r + 1) ** 3, 2 ** 10)  # a level's entries: its vertices, or the table when they do not fit
        expected += float((grid.table.detach()[start:start + size] ** 2).mean())
        start += size
    assert start == grid.table.shape[0]
    assert grid.decay_loss().item() == pytest.approx(expected, rel=1e-6)


def test_hash_grid_reads_a_float16_table_as_its_float32_values():
    """Containers keep their hash tables in float16: the encoding equals that of the same values in float32."""
    torch.manual_seed(0)
    grid = HashGrid(6, 2, 10, 4, 64)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
        half = HashGrid(6, 2, 10, 4, 64)
        half.table.data = grid.table.detach().half()
        grid.table.copy_(half.table.float())
        x = torch.rand(500, 3)
        out = half(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out, grid(x), rtol=0, atol=1e-6)


def test_positional_encoding_definition():
    x = torch.randn(5, 3)
    enc = positional_encoding(x, 4)
    assert enc.shape == (5, 3 + 3 * 2 * 4)
    assert torch.allclose(enc[:, :3], x)
    # sin(2^k x_d) for dimension d, frequency k sits at 3 + d * n + k
    assert torch.allclose(enc[:, 3 + 1 * 4 + 2], torch.sin(4 * x[:, 1]))
    assert torch.allclose(enc[:, 3 + 12 + 2 * 4 + 3], torch.cos(8 * x[:, 2]))


def test_spherical_harmonics_are_orthonormal():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(400_000, 3, generator=g, dtype=torch.float64), dim=-1)
    Y = spherical_harmonics(d)
    gram = 4 * math.pi * (Y.T @ Y) / d.shape[0]  # Monte Carlo integral over the sphere
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=0.03)
    # At the pole the m = 0 functions are sqrt((2l + 1) / 4 pi), all others vanish; degree l has parity (-1)^l.
    pole = spherical_harmonics(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))[0]
    expected = torch.zeros(16, dtype=torch.float64)
    for index, degree in ((0, 0), (2, 1), (6, 2), (12, 3)):
        expected[index] = math.sqrt((2 * degree + 1) / (4 * math.pi))
    torch.testing.assert_close(pole, expected)
    parity = torch.tensor([(-1.0) ** int(math.isqrt(j)) for j in range(16)], dtype=torch.float64)
    torch.testing.assert_close(spherical_harmonics(-d[:100]), parity * spherical_harmonics(d[:100]))


def test_lower_spherical_harmonic_degrees_are_the_leading_functions_and_degree_0_ignores_the_direction():
    """--sh_degree k keeps the (k + 1)^2 functions of degree <= k; at 0 the hash field's colour is the same from
    every direction (and its colour layer is that much narrower)."""
    d = torch.nn.functional.normalize(torch.randn(20, 3, dtype=torch.float64), dim=-1)
    for degree in range(4):
        torch.testing.assert_close(spherical_harmonics(d, degree), spherical_harmonics(d)[:, :(degree + 1) ** 2])
    torch.manual_seed(0)
    field = build_field({"kind": "hash", "box_min": [-1.0] * 3, "box_max": [1.0] * 3, "n_images": 2,
                         "n_levels": 4, "log2_table_size": 10, "max_resolution": 32, "sh_degree": 0})
    assert field.color_ray.in_features == 1 + field.colour_code_dim
    x, image = torch.rand(20, 3) * 2 - 1, torch.zeros(20, dtype=torch.long)
    other = torch.nn.functional.normalize(torch.randn(20, 3), dim=-1)
    with torch.no_grad():
        _, rgb = field(x, d.float(), image)
        _, seen_otherwise = field(x, other, image)
    torch.testing.assert_close(rgb, seen_otherwise, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["hash", "mlp"])
def test_fields_shapes_ranges_and_gradients(kind):
    torch.manual_seed(0)
    extra = {"log2_table_size": 12, "max_resolution": 64} if kind == "hash" else {}
    field = build_field({"kind": kind, "box_min": [-1, -1, -1], "box_max": [1, 1, 1], "n_images": 4, **extra})
    p = torch.rand(64, 3) * 2.4 - 1.2  # some points outside the box
    d = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    a = torch.randint(0, 4, (64,))
    density, rgb = field(p, d, a)
    assert density.shape == (64,) and rgb.shape == (64, 3)
    assert (density >= 0).all() and (rgb >= 0).all() and (rgb <= 1).all()
    outside = ((p < -1) | (p > 1)).any(-1)
    assert outside.any() and (density[outside] == 0).all()
    assert not field.occupied(p[outside]).any()
    (density.sum() + rgb.sum() + field.background(d, a).sum()).backward()
    for name, param in field.named_parameters():
        assert param.grad is not None, name
    assert field.appearance.weight.grad.abs().sum() > 0
    first = field.grid.table if kind == "hash" else field.layers[0].weight
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["hash", "mlp"])
def test_per_ray_directions_equal_per_point(kind):
    """Directions and appearance given once per ray (with ray_of) give what the same values per point give."""
    torch.manual_seed(0)
    extra = {"log2_table_size": 12, "max_resolution": 64} if kind == "hash" else {}
    field = build_field({"kind": kind, "box_min": [-1, -1, -1], "box_max": [1, 1, 1], "n_images": 4, **extra})
    with torch.no_grad():  # a non-trivial colour dependence on the direction and the image
        for param in field.parameters():
            param.normal_(0, 0.3)
    p = torch.rand(50, 3) * 2 - 1
    d = torch.nn.functional.normalize(torch.randn(7, 3), dim=-1)
    a = torch.randint(0, 4, (7,))
    ray_of = torch.randint(0, 7, (50,))
    per_ray = field(p, d, a, ray_of)
    per_point = field(p, d[ray_of], a[ray_of])
    for x, y in zip(per_ray, per_point):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert per_point[1].std(0).min() > 0.01  # colours differ between rays


def test_unknown_field_is_a_user_error():
    from mega_nerf.errors import UserError
    with pytest.raises(UserError, match="unknown field 'nope'"):
        build_field({"kind": "nope", "box_min": [0, 0, 0], "box_max": [1, 1, 1], "n_images": 1})


def test_occupancy_grid_marks_where_density_is():
    grid = OccupancyGrid(resolution=8)

    def bits(u: torch.Tensor) -> torch.Tensor:
        return grid.mask[cell_index(u, 8)]

    assert bits(torch.rand(10, 3)).all()  # before any update, everything may be occupied

    def density(u):  # dense only in the octant u < 0.5
        return (u < 0.5).all(-1).float() * 100.0

    grid.update(density, threshold=1.0, generator=torch.Generator().manual_seed(0))
    inside = torch.rand(200, 3) * 0.49
    outside = torch.rand(200, 3) * 0.49 + 0.51
    assert bits(inside).all() and not bits(outside).any()
    assert grid.occupied_fraction == pytest.approx(1 / 8)


def test_no_triton_switch_turns_every_kernel_off(monkeypatch):
    """MEGA_NERF_NO_TRITON=1, read when fields.kernels is imported, makes available() False even for a tensor on
    a GPU with Triton installed (stand-ins for both: these tests run on the CPU); without it they run there."""
    on_gpu, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    try:
        monkeypatch.setenv("MEGA_NERF_NO_TRITON", "1")
        importlib.reload(kernels)
        monkeypatch.setattr(kernels, "triton", SimpleNamespace())
        assert not kernels.ENABLED and not kernels.available(on_gpu)
        monkeypatch.delenv("MEGA_NERF_NO_TRITON")
        importlib.reload(kernels)
        monkeypatch.setattr(kernels, "triton", SimpleNamespace())
        assert kernels.ENABLED and kernels.available(on_gpu) and not kernels.available(on_cpu)
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)


@pytest.mark.parametrize("kind", ["hash", "mlp"])
def test_affine_appearance_transforms_the_colour_before_its_sigmoid(kind: str) -> None:
    """Mega-NeRF's --affine_appearance: identity at the start; a transform set by hand acts on the logits."""
    torch.manual_seed(0)
    sizes = {"hash": {"n_levels": 4, "log2_table_size": 10, "max_resolution": 32}, "mlp": {"layers": 2, "width": 16}}
    field = build_field({"kind": kind, "box_min": [-1.0] * 3, "box_max": [1.0] * 3, "n_images": 3,
                         "affine_appearance": True, **sizes[kind]})
    x, d = torch.rand(50, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    image = torch.randint(0, 3, (50,))
    with torch.no_grad():
        _, identity = field(x, d, image)
        A, b = torch.randn(3, 3), torch.randn(3)
        field.affine.bias.copy_(torch.cat([A, b[:, None]], 1).flatten())
        _, rgb = field(x, d, image)
    expected = torch.sigmoid(torch.logit(identity.double()) @ A.double().T + b.double())
    torch.testing.assert_close(rgb.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["hash", "mlp"])
def test_horizon_background_shows_a_downward_ray_the_horizon_of_its_heading(kind: str) -> None:
    """--horizon_background over an altitude slab (the down axis not contracted): a direction heading down sees the
    background of the level direction with its heading, one heading up what it saw without the option (same
    weights); without a slab the option changes nothing."""
    sizes = {"hash": {"n_levels": 4, "log2_table_size": 10, "max_resolution": 32}, "mlp": {"layers": 2, "width": 16}}

    def field(slab: bool, horizon: bool):
        torch.manual_seed(0)
        return build_field({"kind": kind, "box_min": [-1.0] * 3, "box_max": [1.0] * 3, "n_images": 3,
                            "contracted": [not slab, True, True], "horizon_background": horizon, **sizes[kind]})

    torch.manual_seed(1)
    heading = torch.nn.functional.normalize(torch.cat([torch.zeros(20, 1), torch.randn(20, 2)], -1), dim=-1)
    drop = torch.rand(20, 1) * 0.9 + 0.05  # how far down, as the sine of the angle below the horizon
    down = torch.cat([drop, heading[:, 1:] * (1 - drop ** 2).sqrt()], -1)
    up = down * torch.tensor([-1.0, 1.0, 1.0])
    image = torch.randint(0, 3, (20,))
    with torch.no_grad():
        raised, plain = field(slab=True, horizon=True), field(slab=True, horizon=False)
        torch.testing.assert_close(raised.background(down, image), plain.background(heading, image))
        torch.testing.assert_close(raised.background(up, image), plain.background(up, image), rtol=0, atol=0)
        assert (plain.background(down, image) != plain.background(heading, image)).any()
        unbounded, unbounded_plain = field(slab=False, horizon=True), field(slab=False, horizon=False)
        torch.testing.assert_close(unbounded.background(down, image), unbounded_plain.background(down, image),
                                   rtol=0, atol=0)


def test_triton_preparation_runs_once_on_a_thread_or_not_at_all(monkeypatch) -> None:
    """prepare_in_background hashes Triton's installation (its cache key) on a daemon thread, quietly whatever
    that raises, and does nothing where the kernels are switched off or Triton is absent (a stand-in module plays
    Triton here)."""
    import sys
    import threading
    from types import ModuleType

    calls: list[str] = []
    cache = ModuleType("triton.runtime.cache")
    cache.triton_key = lambda: calls.append(threading.current_thread().name) or "key"
    for name in ("triton", "triton.runtime"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", cache)
    monkeypatch.setitem(sys.modules, "triton.experimental.gluon", None)  # never the real one, where installed
    monkeypatch.setattr(kernels, "triton", None)  # nor a key kept for the real one
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert kernels.prepare_in_background() is None and calls == []
    monkeypatch.setattr(kernels, "ENABLED", True)
    thread = kernels.prepare_in_background()
    thread.join(5)
    assert thread.daemon and not thread.is_alive() and calls == ["triton-prepare"]
    failures: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    cache.triton_key = lambda: 1 / 0
    thread = kernels.prepare_in_background()
    thread.join(5)
    assert not thread.is_alive() and failures == []  # no traceback on the trainer's console
    older = ModuleType("triton.compiler.compiler")  # Triton 3.2 and older keep the key there
    older.triton_key = lambda: calls.append("older") or "key"
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", None)  # no such module: an import error
    monkeypatch.setitem(sys.modules, "triton.compiler", ModuleType("triton.compiler"))
    monkeypatch.setitem(sys.modules, "triton.compiler.compiler", older)
    thread = kernels.prepare_in_background()
    thread.join(5)
    assert not thread.is_alive() and calls == ["triton-prepare", "older"]
    monkeypatch.setitem(sys.modules, "triton.compiler.compiler", None)  # neither place has it
    assert kernels.prepare_in_background() is None


def test_triton_key_is_kept_under_the_installation_fingerprint(monkeypatch, tmp_path) -> None:
    """The first process hashes Triton's installation on the thread and keeps the hash; the next is handed the
    kept hash before any launch (in every module that holds Triton's key function) and hashes nothing; an edited
    installation file, same size or not, is hashed again; a damaged kept key or an unwritable folder costs only
    the hash. A stand-in package plays Triton: its key hashes its one library file."""
    import hashlib
    import sys
    from types import ModuleType

    package = tmp_path / "site" / "triton"
    (package / "_C").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    library = package / "_C" / "libtriton.so"
    library.write_bytes(b"a" * 100)
    stand_in = ModuleType("triton")
    stand_in.__file__, stand_in.__version__ = str(package / "__init__.py"), "3.6.0"
    hashed: list[str] = []

    def triton_key() -> str:
        hashed.append(hashlib.sha256(library.read_bytes()).hexdigest())
        return hashed[-1]
    cache, autotuner = ModuleType("triton.runtime.cache"), ModuleType("triton.runtime.autotuner")
    for name, module in (("triton", stand_in), ("triton.runtime", ModuleType("triton.runtime")),
                         ("triton.runtime.cache", cache), ("triton.runtime.autotuner", autotuner),
                         ("triton.experimental.gluon", None)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "triton", stand_in)
    monkeypatch.setattr(kernels, "ENABLED", True)
    folder = tmp_path / "keys"

    def new_process() -> None:
        cache.triton_key = autotuner.triton_key = triton_key  # Triton's own function, as a fresh import has it
        kernels.prepare_in_background(folder).join(5)

    new_process()
    first = hashlib.sha256(b"a" * 100).hexdigest()
    assert hashed == [first] and [p.read_text() for p in folder.iterdir()] == [first]
    assert cache.triton_key is triton_key  # the first process keeps Triton's own (memoised by Triton)
    new_process()
    assert hashed == [first]  # handed over, not hashed
    assert cache.triton_key() == autotuner.triton_key() == first and hashed == [first]
    before = library.stat()
    library.write_bytes(b"b" * 100)  # same size, new bytes: a new modification time
    os.utime(library, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    new_process()
    second = hashlib.sha256(b"b" * 100).hexdigest()
    assert hashed == [first, second] and sorted(p.read_text() for p in folder.iterdir()) == sorted([first, second])
    new_process()
    assert hashed == [first, second] and cache.triton_key() == second
    for kept in folder.iterdir():
        kept.write_text("")  # damaged: hashed and kept again
    new_process()
    assert hashed == [first, second, second] and cache.triton_key is triton_key
    new_process()
    assert len(hashed) == 3
    shutil.rmtree(folder)
    folder.write_text("not a folder")  # nothing can be kept: each process hashes, quietly
    new_process()
    new_process()
    assert len(hashed) == 5 and folder.read_text() == "not a folder"


@pytest.mark.parametrize("contracted", [(False, False, False), (False, True, True)])
def test_occupied_reads_the_grid_cell_a_point_lies_in(contracted):
    """A point placed inside grid cell c through the inverse map (box_to_world) is occupied exactly when c's bit is
    set, in the box and in the contracted world beyond it; beyond the box along a plain axis nothing is. The MLP
    field has no grid to look up."""
    torch.manual_seed(3)
    r = 16
    field = build_field({"kind": "hash", "box_min": [-1.0, -2.0, -0.5], "box_max": [1.0, 2.0, 0.5], "n_images": 2,
                         "log2_table_size": 10, "max_resolution": 32, "occupancy_resolution": r,
                         "contracted": list(contracted)})
    field.occupancy.mask.copy_(torch.rand(r ** 3) > 0.5)
    cells = torch.randint(0, r, (5000, 3))
    u = (cells + 0.05 + 0.9 * torch.rand(5000, 3)) / r  # clear of the cells' faces
    world = box_to_world(u.double(), field.box_min.double(), field.box_max.double(), field.contracted).float()
    assert torch.equal(field.occupied(world), field.occupancy.mask[(cells[:, 0] * r + cells[:, 1]) * r + cells[:, 2]])
    assert field.occupied(world).any() and not field.occupied(world).all()
    beyond = world.clone()
    beyond[:, 0] = 1.5  # past the box along x, never contracted here
    assert not field.occupied(beyond).any()
    assert build_field({"kind": "mlp", "box_min": [-1] * 3, "box_max": [1] * 3, "n_images": 2}).grid_lookup() is None


def test_references_only_switches_the_kernels_off_in_its_thread_alone(monkeypatch) -> None:
    """Inside kernels.references_only() `available` answers False on that thread only (the warm-up's first pass
    runs the references while other threads keep the kernels); a stand-in plays a CUDA tensor and Triton."""
    import threading
    from types import SimpleNamespace

    monkeypatch.setattr(kernels, "triton", SimpleNamespace())
    monkeypatch.setattr(kernels, "ENABLED", True)
    cuda = SimpleNamespace(is_cuda=True)
    seen: list[bool] = []
    inside, answered = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait(5)
        seen.append(kernels.available(cuda))
        answered.set()
    thread = threading.Thread(target=other)
    thread.start()
    assert kernels.available(cuda)
    with kernels.references_only():
        inside.set()
        answered.wait(5)
        seen.append(kernels.available(cuda))
    thread.join(5)
    assert seen == [True, False] and kernels.available(cuda)
