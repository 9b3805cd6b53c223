"""Volume rendering against analytic answers, hierarchical sampling, background compositing, empty-space skipping,
and whole images (imaging.render_image)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from mega_nerf import render
from mega_nerf.data.frames import Similarity, read_similarity, write_source_frame
from mega_nerf.errors import UserError
from mega_nerf.fields.base import Field
from mega_nerf.imaging import render_image
from mega_nerf.nerfstudio import read_camera_path, write_camera_path
from mega_nerf.rays import SceneBounds, rays_from_pixels
from mega_nerf.render import RenderConfig, composite, render_rays, render_terminating, sample_pdf, uniform_samples


class Slab(Field):
    """Density sigma for a <= x <= b (x = first coordinate), zero elsewhere; constant colour; grey background."""

    def __init__(self, sigma: float, a: float, b: float, occupied_everywhere: bool = True):
        super().__init__()
        self.sigma, self.a, self.b, self.occupied_everywhere = sigma, a, b, occupied_everywhere
        self.evaluated = 0

    def forward(self, positions, directions, appearance, ray_of=None):
        self.evaluated += positions.shape[0]
        x = positions[:, 0]
        density = torch.where((x >= self.a) & (x <= self.b), self.sigma, 0.0)
        return density, torch.tensor([1.0, 0.0, 0.0]).expand(positions.shape[0], 3)

    def occupied(self, positions):
        if self.occupied_everywhere:
            return torch.ones(positions.shape[0], dtype=torch.bool)
        return (positions[:, 0] >= self.a) & (positions[:, 0] <= self.b)

    def background(self, directions, appearance):
        return torch.full((directions.shape[0], 3), 0.5)


def rays_along_x(n: int):
    origins = torch.zeros(n, 3)
    dirs = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)
    return origins, dirs, torch.zeros(n), torch.full((n,), 2.0), torch.zeros(n, dtype=torch.long)


def test_constant_slab_matches_beer_lambert():
    sigma, a, b = 3.0, 0.5, 1.25
    field = Slab(sigma, a, b)
    out = render_rays(field, *rays_along_x(4), config=RenderConfig(samples=4096, perturb=False))
    L = b - a
    opacity = 1 - math.exp(-sigma * L)
    assert torch.allclose(out["opacity"], torch.tensor(opacity), atol=2e-3)
    # expected depth: integral of t * sigma * exp(-sigma (t - a)) over [a, b]
    depth = a * opacity + (1 - math.exp(-sigma * L)) / sigma - L * math.exp(-sigma * L)
    assert torch.allclose(out["depth"], torch.tensor(depth), atol=2e-3)
    expected_rgb = torch.tensor([opacity + 0.5 * (1 - opacity), 0.5 * (1 - opacity), 0.5 * (1 - opacity)])
    assert torch.allclose(out["rgb"][0], expected_rgb, atol=2e-3)


def test_composite_weights_are_transmittance_times_alpha():
    density = torch.tensor([[1.0, 2.0, 0.5]])
    starts, ends = torch.tensor([[0.0, 0.5, 1.5]]), torch.tensor([[0.5, 1.5, 2.0]])
    out = composite(density, torch.ones(1, 3, 3), starts, ends, (starts + ends) / 2)
    tau = [0.5, 2.0, 0.25]
    expected = [1 - math.exp(-tau[0]), math.exp(-tau[0]) * (1 - math.exp(-tau[1])),
                math.exp(-tau[0] - tau[1]) * (1 - math.exp(-tau[2]))]
    assert torch.allclose(out["weights"][0], torch.tensor(expected), atol=1e-6)


def test_distortion_equals_its_pairwise_definition_with_its_gradient():
    torch.manual_seed(0)
    weights = torch.rand(6, 40, dtype=torch.float64) * (torch.rand(6, 40) < 0.3)
    weights = (weights / weights.sum(-1, keepdim=True) * 0.9).requires_grad_()
    fast = render.distortion(weights.float())
    slow = render.distortion_reference(weights)
    assert torch.allclose(fast.double(), slow, rtol=1e-5, atol=1e-7)
    grad_fast, = torch.autograd.grad(render.distortion(weights.float()).sum(), weights)
    grad_slow, = torch.autograd.grad(slow.sum(), weights)
    assert torch.allclose(grad_fast, grad_slow, rtol=1e-4, atol=1e-6)
    # One opaque sample costs only its own width's third; the same weight spread over the ray costs far more.
    n = 40
    one = torch.zeros(1, n)
    one[0, 7] = 1.0
    assert float(render.distortion(one)) == pytest.approx(1 / (3 * n), rel=1e-5)
    assert float(render.distortion(torch.full((1, n), 1.0 / n))) > 0.3


def test_skipping_unoccupied_space_changes_nothing_but_cost():
    rays = rays_along_x(8)
    config = RenderConfig(samples=256, perturb=False)
    everywhere, skipping = Slab(2.0, 0.5, 0.9), Slab(2.0, 0.5, 0.9, occupied_everywhere=False)
    full = render_rays(everywhere, *rays, config=config)
    skip = render_rays(skipping, *rays, config=config)
    for key in ("rgb", "depth", "opacity"):
        assert torch.allclose(full[key], skip[key])
    assert skipping.evaluated < everywhere.evaluated / 4


class Leaves(Field):
    """Every sample's density and colour a parameter of its own, in shading order (all samples occupied)."""

    def __init__(self, samples: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.density = torch.nn.Parameter(torch.rand(samples, generator=generator) * 4)
        self.color = torch.nn.Parameter(torch.rand(samples, 3, generator=generator))

    def forward(self, positions, directions, appearance, ray_of=None):
        return self.density * 1, self.color * 1


@pytest.mark.parametrize(("distance", "capacity"), [(0.5, None), (1.5, None), (0.5, 48 + 5)])
def test_near_gradient_scales_each_samples_gradient_by_its_squared_distance(distance: float, capacity: int | None):
    """A sample t from its camera keeps (t / distance)^2 of its density's and colour's gradient within `distance`,
    all of it beyond; the render itself is the same bits. Also with a fixed capacity (a graphed step's shapes),
    whose padding copies are dropped."""
    origins, dirs, near, far, image = rays_along_x(3)
    t, starts, ends = uniform_samples(near, far, 16, perturb=False)  # t from 1/16 to 31/16
    target = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))
    runs = []
    for near_gradient in (0.0, distance):
        field = Leaves(capacity or t.numel())
        out = render.shade(field, origins, dirs, image, t, starts, ends, torch.ones_like(t, dtype=torch.bool),
                           capacity, near_gradient=near_gradient)
        ((out["rgb"] - target) ** 2).sum().backward()
        runs.append((out["rgb"].detach(), field.density.grad[:t.numel()], field.color.grad[:t.numel()]))
    (rgb, density, color), (scaled_rgb, scaled_density, scaled_color) = runs
    scale = torch.minimum((t.reshape(-1) / distance) ** 2, torch.ones(()))
    assert scale.min() < 0.02 and (scale < 1).any() and (scale == 1).any()
    assert torch.equal(scaled_rgb, rgb)
    assert torch.allclose(scaled_density, density * scale, rtol=1e-6, atol=0)
    assert torch.allclose(scaled_color, color * scale[:, None], rtol=1e-6, atol=0)


class Uniform(Field):
    """One density and one colour everywhere, each a parameter; grey background."""

    def __init__(self):
        super().__init__()
        self.density, self.color = torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, positions, directions, appearance, ray_of=None):
        n = positions.shape[0]
        return self.density.expand(n), self.color.expand(n, 3)

    def occupied(self, positions):
        return torch.ones(positions.shape[0], dtype=torch.bool)

    def background(self, directions, appearance):
        return torch.full((directions.shape[0], 3), 0.5)


def test_near_gradient_scales_the_fine_pass_too():
    """With hierarchical sampling both passes shade: every sample within a distance far beyond the rays keeps
    almost none of its gradient, in either pass."""
    origins, dirs, near, far, image = rays_along_x(4)
    config = RenderConfig(samples=8, fine_samples=8, perturb=False)
    t, starts, ends = uniform_samples(near, far, 8, perturb=False)
    grads = []
    for near_gradient in (0.0, 1e3):
        field = Uniform()
        out = render.render_samples(field, origins, dirs, near, far, image, config, t, starts, ends,
                                    near_gradient=near_gradient)
        ((out["rgb"] - 1.0) ** 2).sum().backward()
        grads.append(torch.stack([field.density.grad, field.color.grad]).abs())
    assert (grads[0] > 1e-3).all() and (grads[1] < grads[0] * 1e-5).all()


def test_pdf_samples_fall_where_the_weight_is():
    near, far = torch.zeros(3), torch.ones(3)
    _, starts, ends = uniform_samples(near, far, 10, perturb=False)
    weights = torch.zeros(3, 10)
    weights[:, 6] = 1.0
    fine = sample_pdf(starts, ends, weights, 64, perturb=True, generator=torch.Generator().manual_seed(0))
    inside = (fine >= 0.6) & (fine <= 0.7)
    assert inside.float().mean() > 0.95
    assert (fine[:, 1:] >= fine[:, :-1]).all()


def test_hierarchical_sampling_sharpens_a_thin_surface():
    field = Slab(200.0, 0.731, 0.741)
    rays = rays_along_x(2)
    coarse = render_rays(field, *rays, config=RenderConfig(samples=16, perturb=False))
    fine = render_rays(field, *rays, config=RenderConfig(samples=16, fine_samples=64, perturb=False))
    assert "rgb_coarse" in fine
    assert abs(fine["depth"][0] - 0.736) < abs(coarse["depth"][0] - 0.736) or fine["opacity"][0] > 0.8
    assert abs(fine["depth"][0] - 0.736) < 0.01


def test_uniform_samples_stay_in_their_intervals():
    near, far = torch.rand(50), torch.rand(50) + 1
    t, starts, ends = uniform_samples(near, far, 8, perturb=True, generator=torch.Generator().manual_seed(1))
    assert ((t >= starts) & (t <= ends)).all()
    assert torch.allclose(starts[:, 0], near) and torch.allclose(ends[:, -1], far)


def test_background_intervals_never_reverse_and_follow_disparity():
    """Beyond the foreground, intervals are evenly spaced in 1 / t and never of negative length, with no scan to
    enforce the order: on splits within an ulp or a few of far, equal to it, or far away, every end is at least its
    start, exactly, and every edge is within a few float32 roundings of its float64 value, at 64 and 256 samples."""
    class Exit(Slab):
        def foreground_exit(self, origins, directions):
            return split

    generator = torch.Generator().manual_seed(0)
    far = torch.exp(torch.rand(30000, generator=generator) * 8)  # 1 to 3000
    ulps = torch.randint(0, 4, (30000,), generator=generator).float()
    split = torch.where(torch.arange(30000) % 2 == 0, far - ulps * torch.finfo(torch.float32).eps * far,
                        far * torch.rand(30000, generator=generator))
    origins, dirs = torch.zeros(30000, 3), torch.tensor([[1.0, 0.0, 0.0]]).expand(30000, 3)
    near = torch.zeros(30000)
    for n in (64, 256):
        config = RenderConfig(samples=4, bg_samples=n, perturb=False)
        _, starts, ends = render.ray_samples(Exit(1.0, 0.0, 1.0), origins, dirs, near, far, config, perturb=False)
        assert (ends >= starts).all() and torch.equal(starts[:, 1:], ends[:, :-1])
        assert torch.equal(starts[:, 4], split.clamp_min(0)) and torch.equal(ends[:, -1], far)
        s = torch.arange(n + 1, dtype=torch.float64) / n
        inv_split, inv_far = 1 / split.double()[:, None], 1 / far.double()[:, None]
        exact = 1 / (inv_split * (1 - s) + inv_far * s)
        edges = torch.cat([starts[:, 4:], ends[:, -1:]], 1).double()
        torch.testing.assert_close(edges, exact, rtol=1e-6, atol=0)  # measured 2e-7 (a difference: 1.5e-5 at 256)


def test_early_termination_equals_full_rendering_and_skips_occluded_samples():
    config = RenderConfig(samples=256, perturb=False)
    rays = rays_along_x(6)
    full_field, early_field = Slab(40.0, 0.5, 0.9), Slab(40.0, 0.5, 0.9)
    full = render_rays(full_field, *rays, config=config)
    early = render_terminating(early_field, *rays, config=config, segment=16)
    for key in ("rgb", "depth", "opacity"):
        assert torch.allclose(full[key], early[key], atol=1e-3), key
    # the slab is opaque after ~0.23 units: the samples behind it (about half the ray) are never shaded
    assert early_field.evaluated < 0.6 * full_field.evaluated
    thin = Slab(0.5, 0.2, 1.8)  # never opaque: termination never triggers and every sample is shaded
    assert torch.allclose(render_rays(thin, *rays, config=config)["rgb"],
                          render_terminating(thin, *rays, config=config)["rgb"], atol=1e-5)


def test_terminating_render_shades_only_occupied_samples_in_order():
    """With occupancy known, the terminating renderer shades exactly the occupied samples of a thin slab (in
    passes of `segment`, in order along the ray), none of the empty ones, and gives the full render's image. Rays
    that never meet an occupied sample cost nothing."""
    config = RenderConfig(samples=256, perturb=False)
    origins, dirs, near, far, app = rays_along_x(4)
    near[2:] = 1.0  # two rays that start beyond the slab: every sample empty
    full_field, skip_field = Slab(0.8, 0.5, 0.9), Slab(0.8, 0.5, 0.9, occupied_everywhere=False)
    full = render_rays(full_field, origins, dirs, near, far, app, config=config)
    early = render_terminating(skip_field, origins, dirs, near, far, app, config=config, segment=7)
    for key in ("rgb", "depth", "opacity"):
        assert torch.allclose(full[key], early[key], atol=1e-5), key
    t = uniform_samples(near[:2], far[:2], 256, perturb=False)[0]
    in_slab = int(((t >= 0.5) & (t <= 0.9)).sum())  # the never-opaque slab: no ray terminates
    assert skip_field.evaluated == early["samples"] == in_slab
    assert torch.allclose(early["rgb"][2:], torch.tensor([0.5, 0.5, 0.5]))  # background only


class GroundAndSky(Field):
    """An opaque red layer below x = 1 (the ground, x pointing down); the background encodes the ray's direction
    and appearance index, so a pixel's colour says which ray and which image it was rendered with."""

    def forward(self, positions, directions, appearance, ray_of=None):
        density = torch.where(positions[:, 0] >= 1.0, 1e3, 0.0)
        return density, torch.tensor([1.0, 0.0, 0.0]).expand(positions.shape[0], 3)

    def occupied(self, positions):
        return torch.ones(positions.shape[0], dtype=torch.bool)

    def background(self, directions, appearance):
        return torch.cat([directions[:, 1:] * 0.5 + 0.5, appearance[:, None].float() / 10], -1)


def test_render_image_renders_each_pixel_ray_within_the_bounds():
    """render_image (validation, evaluation, camera paths): pixel (column i, row j) of a camera at the origin
    looking down (+x) sees the ground at depth 1 / d_x along its ray; with an altitude slab whose ground plane lies
    above that layer, every pixel sees the background of its own ray and appearance."""
    W, H, appearance = 5, 4, 3
    c2w = torch.tensor([[0.0, 0, -1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])  # right +z, up +y, back -x
    intrinsics = torch.tensor([4.0, 4.0, 2.5, 2.0])
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    _, dirs = rays_from_pixels(c2w, intrinsics, cols.flatten(), rows.flatten())
    config = RenderConfig(samples=256, perturb=True)  # render_image turns the jitter off
    out = render_image(GroundAndSky(), c2w, intrinsics, W, H, appearance, SceneBounds(0.01, 3.0), config, chunk=7)
    assert out["rgb"].shape == (H, W, 3) and out["depth"].shape == out["opacity"].shape == (H, W)
    assert torch.allclose(out["opacity"], torch.ones(H, W), atol=1e-3)
    assert torch.allclose(out["rgb"], torch.tensor([1.0, 0.0, 0.0]).expand(H, W, 3), atol=1e-3)
    assert torch.allclose(out["depth"], (1 / dirs[:, 0]).view(H, W), atol=0.02)
    above_ground = SceneBounds(0.01, 3.0, (-1.0, 0.5))
    out = render_image(GroundAndSky(), c2w, intrinsics, W, H, appearance, above_ground, config, chunk=7)
    sky = GroundAndSky().background(dirs, torch.full((W * H,), appearance))
    assert torch.allclose(out["rgb"], sky.view(H, W, 3), atol=1e-6) and out["opacity"].max() == 0


def random_similarity(seed: int) -> Similarity:
    rng = np.random.default_rng(seed)
    return Similarity(Rotation.random(random_state=seed).as_matrix(), rng.normal(size=3) * 10, rng.uniform(0.1, 3))


def test_similarity_composes_and_inverts_as_its_matrix() -> None:
    a, b = random_similarity(0), random_similarity(1)
    np.testing.assert_allclose(a.then(b).matrix, b.matrix @ a.matrix, atol=1e-12)
    np.testing.assert_allclose(a.inverse().matrix, np.linalg.inv(a.matrix), atol=1e-12)
    p = np.random.default_rng(2).normal(size=(5, 3))
    np.testing.assert_allclose(a.points(p), (a.matrix @ np.c_[p, np.ones(5)].T).T[:, :3], atol=1e-12)


def test_nerfstudio_camera_path_round_trips_through_both_worlds(tmp_path: Path) -> None:
    """Cameras of ours written as a camera_path.json in nerfstudio's world (our source map, then nerfstudio's
    dataparser transform) read back as the same cameras; the file holds nerfstudio's matrices and fov."""
    ours_from_source, ns_from_source = random_similarity(3), random_similarity(4)
    write_source_frame(tmp_path, ours_from_source, 1.0, np.zeros(3), np.array([0.0, 0, 1]), "colmap")
    write_source_frame(tmp_path / "ns", ns_from_source, 1.0, np.zeros(3), np.array([0.0, 0, 1]), "nerfstudio")
    to_ours = read_similarity(tmp_path / "ns" / "dataparser_transforms.json").inverse().then(
        read_similarity(tmp_path / "dataparser_transforms.json"))
    rotations = Rotation.random(6, random_state=5).as_matrix()
    c2w = np.concatenate([rotations, np.random.default_rng(6).normal(size=(6, 3, 1))], 2)
    K = np.array([70.0, 70.0, 40.0, 30.0])
    write_camera_path(tmp_path / "camera_path.json", [(m, K, (80, 60)) for m in c2w], 24.0, to_ours.inverse())
    back = read_camera_path(tmp_path / "camera_path.json", to_ours)
    for (m, k, size), original in zip(back, c2w):
        np.testing.assert_allclose(m, original, atol=1e-9)
        np.testing.assert_allclose(k, K, atol=1e-9)
        assert size == (80, 60)
    first = np.array(json.loads((tmp_path / "camera_path.json").read_text())["camera_path"][0]["camera_to_world"])
    expected = ns_from_source.matrix @ np.linalg.inv(ours_from_source.matrix) @ np.vstack([c2w[0], [0, 0, 0, 1]])
    np.testing.assert_allclose(first.reshape(4, 4)[:3, 3], expected[:3, 3], atol=1e-9)  # centres: the full map
    fov = json.loads((tmp_path / "camera_path.json").read_text())["camera_path"][0]["fov"]
    assert fov == pytest.approx(2 * math.degrees(math.atan(30 / 70)))


def test_bad_camera_path_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"camera_path": [{"fov": 50}], "render_height": 10}')
    with pytest.raises(UserError, match="a.json: needs render_height and, per frame, camera_to_world"):
        read_camera_path(tmp_path / "a.json", None)
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(UserError, match="b.json: has no 'camera_path'"):
        read_camera_path(tmp_path / "b.json", None)
