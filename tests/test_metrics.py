"""PSNR, SSIM and LPIPS against independent re-computations (numpy, scipy, plain functional torch)."""
from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mega_nerf.errors import UserError
from mega_nerf.evaluation import lpips as lpips_module
from mega_nerf.evaluation.lpips import load_lpips, load_lpips_nets
from mega_nerf.evaluation.metrics import image_metrics, psnr, ssim

SIZE = 64


def random_image(seed: int, smooth: float = 0.0) -> torch.Tensor:
    """(SIZE, SIZE, 3) float32 image in [0, 1], optionally blurred so that it has structure to shift."""
    rng = np.random.default_rng(seed)
    image = rng.random((SIZE, SIZE, 3))
    if smooth:
        image = gaussian_filter(image, (smooth, smooth, 0))
        image = (image - image.min()) / (image.max() - image.min())
    return torch.from_numpy(image).float()


def noisy(image: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.from_numpy(np.random.default_rng(seed).normal(0, sigma, image.shape)).float()
    return (image + noise).clamp(0, 1)


def shifted_noisy_pair() -> tuple[torch.Tensor, torch.Tensor]:
    target = random_image(1, smooth=2.0)
    return noisy(torch.roll(target, shifts=(1, 2), dims=(0, 1)), 0.05, seed=2), target


# ---- PSNR ----

def test_psnr_matches_numpy_mse() -> None:
    pred, target = random_image(3), random_image(4)
    mse = np.mean((pred.numpy().astype(np.float64) - target.numpy().astype(np.float64)) ** 2)
    assert psnr(pred, target) == pytest.approx(10 * np.log10(1 / mse), rel=1e-12)


def test_psnr_and_ssim_decrease_with_noise() -> None:
    target = random_image(5, smooth=2.0)
    preds = [noisy(target, sigma, seed=6) for sigma in (0.01, 0.05, 0.2)]
    psnrs = [psnr(p, target) for p in preds]
    ssims = [ssim(p, target) for p in preds]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert ssims[0] > ssims[1] > ssims[2]
    assert psnr(target, target) == math.inf


# ---- SSIM ----

def reference_ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM by the formula (Wang et al. 2004, Eq. 13) with scipy's Gaussian filter (radius 5: an 11x11 window),
    the image mirrored at its borders and the map averaged over every pixel: torchmetrics' convention since 1.4.2,
    the SSIM nerfstudio reports (up to 1.4.1 torchmetrics averaged the 'valid' region only, about 3e-4 apart)."""
    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, 1.5, truncate=5 / 1.5, mode="mirror")  # mirror: d c b | a b c d | c b a

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for channel in range(3):
        x = pred[..., channel].numpy().astype(np.float64)
        y = target[..., channel].numpy().astype(np.float64)
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        ssim_map = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def test_ssim_matches_scipy_reference_on_random_images() -> None:
    pred, target = random_image(7), random_image(8)
    assert ssim(pred, target) == pytest.approx(reference_ssim(pred, target), abs=1e-6)


def test_ssim_matches_scipy_reference_on_shifted_noisy_pair() -> None:
    pred, target = shifted_noisy_pair()
    expected = reference_ssim(pred, target)
    assert 0.2 < expected < 0.95  # a pair in the interesting range, not trivially 0 or 1
    assert ssim(pred, target) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (37, 90), (11, 11), (11, 16)])
def test_ssim_equals_torchmetrics(shape: tuple[int, int]) -> None:
    """Ours applies the window as two 1-D passes of shifted sums; torchmetrics (nerfstudio's SSIM) as one 2-D
    convolution: the same numbers up to float64 rounding, down to the smallest image SSIM takes."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    generator = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    target = torch.rand(*shape, 3, generator=generator)
    pred = (target + 0.2 * torch.randn(*shape, 3, generator=generator)).clamp(0, 1)
    expected = structural_similarity_index_measure(*(image.double().permute(2, 0, 1)[None] for image in (pred, target)),
                                                   data_range=1.0)
    assert 0.1 < float(expected) < 0.9
    assert ssim(pred, target) == pytest.approx(float(expected), abs=1e-12)


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(torch.rand(10, 20, 3), torch.rand(10, 20, 3))


def test_ssim_of_identical_images_is_one() -> None:
    image = random_image(9)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)


# ---- LPIPS ----

SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
# Conv layers of torchvision's feature stacks: index -> (out, in, kernel).
ALEX_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
VGG_BLOCKS = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
VGG_WIDTHS = [64, 128, 256, 512, 512]


def vgg_convs() -> dict[int, tuple[int, int, int]]:
    convs, channels_in = {}, 3
    for block, width in zip(VGG_BLOCKS, VGG_WIDTHS, strict=True):
        for index in block:
            convs[index] = (width, channels_in, 3)
            channels_in = width
    return convs


def write_random_weights(directory: Path, net: str, seed: int) -> None:
    """Random weights in the public files' formats (He-scaled so that activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    convs = ALEX_CONVS if net == "alex" else vgg_convs()
    backbone = {"classifier.1.weight": torch.randn(8, 4, generator=gen)}  # ignored, as in the real files
    for index, (c_out, c_in, k) in convs.items():
        he_std = (2 / (c_in * k * k)) ** 0.5
        backbone[f"features.{index}.weight"] = torch.randn(c_out, c_in, k, k, generator=gen) * he_std
        backbone[f"features.{index}.bias"] = torch.randn(c_out, generator=gen) * 0.1
    widths = [convs[i][0] for i in sorted(convs)] if net == "alex" else VGG_WIDTHS
    linear = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(widths)}
    backbone_name = "alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"
    torch.save(backbone, directory / backbone_name)
    torch.save(linear, directory / f"{net}.pth")


def reference_features(x: torch.Tensor, net: str, sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The five LPIPS layers, computed with functional ops straight from the state dict."""
    def conv(h: torch.Tensor, index: int, **kw: int) -> torch.Tensor:
        return F.relu(F.conv2d(h, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], **kw))

    if net == "alex":
        f1 = conv(x, 0, stride=4, padding=2)
        f2 = conv(F.max_pool2d(f1, 3, 2), 3, padding=2)
        f3 = conv(F.max_pool2d(f2, 3, 2), 6, padding=1)
        f4 = conv(f3, 8, padding=1)
        return [f1, f2, f3, f4, conv(f4, 10, padding=1)]
    feats, h = [], x
    for block_index, block in enumerate(VGG_BLOCKS):
        if block_index:
            h = F.max_pool2d(h, 2, 2)
        for index in block:
            h = conv(h, index, padding=1)
        feats.append(h)
    return feats


def reference_lpips(pred: torch.Tensor, target: torch.Tensor, net: str, directory: Path) -> float:
    """LPIPS v0.1 by the paper's formula (Eq. 1) from the saved files."""
    backbone_name = "alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"
    sd = torch.load(directory / backbone_name)
    lins = torch.load(directory / f"{net}.pth", map_location="cpu")  # the lpips wheel's were saved on CUDA
    total = 0.0
    per_image = []
    for image in (pred, target):
        x = (image.permute(2, 0, 1)[None].double() * 2 - 1 - SHIFT.double()) / SCALE.double()
        per_image.append(reference_features(x, net, {k: v.double() for k, v in sd.items()}))
    for k, (a, b) in enumerate(zip(*per_image, strict=True)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        weight = lins[f"lin{k}.model.1.weight"].double()
        total += float(((a - b) ** 2 * weight).sum(dim=1).mean())
    return total


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lpips")
    write_random_weights(directory, "alex", seed=10)
    write_random_weights(directory, "vgg", seed=11)
    return directory


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_reference_and_is_a_distance(net: str, weights_dir: Path) -> None:
    lpips = load_lpips(net, weights_dir, device="cpu")
    assert lpips is not None
    pred, target = shifted_noisy_pair()
    distance = lpips(pred, target)
    assert distance > 1e-3
    assert distance == pytest.approx(reference_lpips(pred, target, net, weights_dir), rel=1e-4)
    assert lpips(target, pred) == pytest.approx(distance, rel=1e-5)
    assert abs(lpips(target, target)) < 1e-7


def test_image_metrics_reports_every_metric(weights_dir: Path) -> None:
    pred, target = shifted_noisy_pair()
    nets = load_lpips_nets(weights_dir, device="cpu")
    metrics = image_metrics(pred, target, nets)
    assert metrics["psnr"] == psnr(pred, target) and metrics["ssim"] == ssim(pred, target)
    assert metrics["lpips_alex"] == nets["alex"](pred, target)
    assert metrics["lpips_vgg"] == nets["vgg"](pred, target)
    assert image_metrics(pred, target, {"alex": None})["lpips_alex"] is None


def lpips_package_dir() -> Path:
    """The installed lpips package's folder, found by the import system without running the package (it imports
    torchvision): an independent route to the files `package_linear_file` finds through the package metadata."""
    spec = importlib.util.find_spec("lpips")
    assert spec is not None, "the tests need the lpips wheel's weights: pip install --no-deps lpips==0.1.4 (make does)"
    return Path(spec.submodule_search_locations[0])


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_linear_layers_come_from_the_lpips_package(net: str, weights_dir: Path, tmp_path: Path) -> None:
    """A directory with only the backbone: the linear layers are the lpips wheel's v0.1 files."""
    backbone = "alexnet-owt-7be5be79.pth" if net == "alex" else "vgg16-397923af.pth"
    (tmp_path / "backbone_only").mkdir()
    shutil.copy(weights_dir / backbone, tmp_path / "backbone_only" / backbone)
    lpips = load_lpips(net, tmp_path / "backbone_only", device="cpu")
    assert lpips is not None
    (tmp_path / "reference").mkdir()
    shutil.copy(weights_dir / backbone, tmp_path / "reference" / backbone)
    shutil.copy(lpips_package_dir() / "weights" / "v0.1" / f"{net}.pth", tmp_path / "reference" / f"{net}.pth")
    pred, target = shifted_noisy_pair()
    expected = reference_lpips(pred, target, net, tmp_path / "reference")
    assert expected > 1e-3 and all(bool((lin.weight >= 0).all()) for lin in lpips.lins)  # the trained ones
    assert lpips(pred, target) == pytest.approx(expected, rel=1e-4)
    # a linear file in the directory comes first
    assert load_lpips(net, weights_dir, device="cpu")(pred, target) == pytest.approx(
        reference_lpips(pred, target, net, weights_dir), rel=1e-4)


def test_missing_weights_give_none_and_one_line_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_lpips_nets(tmp_path) == {"alex": None, "vgg": None}
    assert load_lpips_nets(tmp_path) == {"alex": None, "vgg": None}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1  # the lpips package is installed: only the backbones are missing
    assert lines[0] == (f"warning: LPIPS reported as null where its weights are missing: alexnet-owt-7be5be79.pth, "
                        f"vgg16-397923af.pth (torchvision's ImageNet backbones, never downloaded) not in {tmp_path} "
                        "(see --lpips_weights_dir)")
    monkeypatch.setattr(lpips_module, "package_linear_file", lambda net: None)
    assert load_lpips_nets(tmp_path / "other") == {"alex": None, "vgg": None}
    line = capsys.readouterr().err.strip()
    assert "alex.pth, vgg.pth (linear layers) neither there nor in an installed lpips package" in line
    assert "\n" not in line


def test_malformed_weights_are_one_line_user_errors(tmp_path: Path, weights_dir: Path) -> None:
    backbone = "alexnet-owt-7be5be79.pth"
    (tmp_path / backbone).write_bytes((weights_dir / backbone).read_bytes())
    (tmp_path / "alex.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="alex.pth") as error:
        load_lpips("alex", tmp_path)
    assert "\n" not in str(error.value)
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "alex.pth")
    with pytest.raises(UserError, match=r"alex\.pth: 'lin0\.model\.1\.weight' .*\(1, 64, 1, 1\)"):
        load_lpips("alex", tmp_path)
