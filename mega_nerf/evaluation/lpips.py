"""LPIPS, the learned perceptual image distance (Zhang et al. 2018, version 0.1), AlexNet and VGG16 backbones.

Written in plain torch, with the backbones laid out as torchvision's `features` stacks so that the public
checkpoints load unchanged: the `lpips` package itself cannot be used, as it imports torchvision, which does not
install beside our torch (PyPI's torchvision needs its own torch build). Nothing is downloaded. Files read:

    alexnet-owt-7be5be79.pth  torchvision AlexNet  features.{0,3,6,8,10}.{weight,bias}
    vgg16-397923af.pth        torchvision VGG16    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}
    alex.pth, vgg.pth         LPIPS v0.1 linear    lin{k}.model.1.weight, shape (1, C_k, 1, 1), k = 0..4

The ImageNet backbones come from a directory only (`--lpips_weights_dir`, else `~/.cache/mega_nerf/lpips/`):
copy torchvision's files there (from `~/.cache/torch/hub/checkpoints/` wherever torchvision has fetched them).
The linear layers come from that directory when there, else from the `lpips` package's wheel, which ships them
(`lpips/weights/v0.1/`): `pip install --no-deps lpips` installs it without torchvision, and its files are found
through the package's metadata, never by importing it.

Key mapping: `features.<i>.*` -> `LPIPS.features.<i>.*` (same indices; `classifier.*` is ignored) and
`lin<k>.model.1.weight` -> `LPIPS.lins.<k>.weight` (`model.0` is the dropout of the original training code).

When files are missing, `load_lpips_nets` says so in one line, once, and reports LPIPS as unavailable instead of
failing.
"""
from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mega_nerf.errors import UserError
from mega_nerf.io import load_torch

# Input normalisation of LPIPS v0.1, applied to images in [-1, 1] (the `ScalingLayer` of the paper's code).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Added to the feature norm before dividing (the reference code's epsilon).
NORM_EPS = 1e-10
NETS = ("alex", "vgg")


def _alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features`, without the final max-pool (no LPIPS layer follows it)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 `features` (configuration D), without the final max-pool."""
    layers: list[nn.Module] = []
    channels_in = 3
    for block, (width, depth) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        if block > 0:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(depth):
            layers += [nn.Conv2d(channels_in, width, 3, padding=1), nn.ReLU()]
            channels_in = width
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class _Backbone:
    build: Callable[[], nn.Sequential]
    taps: tuple[int, ...]  # indices in `features` of the ReLUs whose outputs LPIPS compares
    backbone_file: str
    linear_file: str


_BACKBONES = {
    # AlexNet: ReLU after conv1..conv5.
    "alex": _Backbone(_alexnet_features, (1, 4, 7, 9, 11), "alexnet-owt-7be5be79.pth", "alex.pth"),
    # VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    "vgg": _Backbone(_vgg16_features, (3, 8, 15, 22, 29), "vgg16-397923af.pth", "vgg.pth"),
}


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with one backbone, `net` "alex" or "vgg" (random weights; see `load_lpips`)."""

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in _BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {NETS}")
        spec = _BACKBONES[net]
        self.net = net
        self.taps = spec.taps
        self.features = spec.build()
        channels = [self.features[tap - 1].out_channels for tap in spec.taps]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone activations at the five LPIPS layers.

        images: (N, 3, H, W) in [0, 1]. Returns five (N, C_k, H_k, W_k) tensors.
        """
        h = (images * 2 - 1 - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.taps:
                out.append(h)
        return out

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> float:
        """Distance between two (H, W, 3) images in [0, 1], 0 when identical; runs on this module's device."""
        device = self.shift.device
        images = torch.stack([pred, target]).permute(0, 3, 1, 2).to(device, torch.float32)
        total = torch.zeros((), device=device)
        for feats, lin in zip(self.layer_features(images), self.lins, strict=True):
            unit = feats / (feats.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
            # Eq. 1 of the paper: channel-weighted squared difference, averaged over positions.
            total += lin((unit[:1] - unit[1:]).square()).mean()
        return float(total)


LPIPS_IMPLEMENTATION = ("mega_nerf.evaluation.lpips: LPIPS v0.1 (Zhang et al. 2018), our torch code reading "
                        "torchvision's AlexNet / VGG16 weights and the lpips package's linear layers; inputs scaled "
                        "to [-1, 1]")


def default_weights_dir() -> Path:
    """The documented cache directory used when no `--lpips_weights_dir` is given."""
    return Path.home() / ".cache" / "mega_nerf" / "lpips"


def package_linear_file(net: str) -> Path | None:
    """The installed `lpips` package's v0.1 linear weights of `net`, or None when it is not installed. Found
    through the package's metadata: importing it would import torchvision."""
    try:
        path = Path(importlib.metadata.distribution("lpips").locate_file(f"lpips/weights/v0.1/{net}.pth"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def weight_files(net: str, directory: Path) -> tuple[Path | None, Path | None]:
    """(backbone, linear) weight files of `net`, None where absent: the backbone from `directory` only; the
    linear layers from `directory` when there, else from the installed `lpips` package."""
    spec = _BACKBONES[net]
    backbone, linear = directory / spec.backbone_file, directory / spec.linear_file
    return (backbone if backbone.is_file() else None,
            linear if linear.is_file() else package_linear_file(net))


def load_lpips(net: str, weights_dir: Path | None = None, device: str | torch.device | None = None
               ) -> LPIPS | None:
    """LPIPS with backbone `net` ("alex" or "vgg") and the public weights (`weight_files` in `weights_dir`,
    default `default_weights_dir()`), on `device` (default CUDA when available); None when a file is missing.
    Raises UserError naming the file when one is present but unreadable or of the wrong shape.
    """
    backbone, linear = weight_files(net, _directory(weights_dir))
    if backbone is None or linear is None:
        return None
    model = LPIPS(net)
    _copy_weights(model.features, backbone, lambda key: f"features.{key}")
    _copy_weights(model.lins, linear, lambda key: f"lin{key.split('.')[0]}.model.1.weight")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


_warned: set[Path] = set()


def load_lpips_nets(weights_dir: Path | None = None, device: str | torch.device | None = None
                    ) -> dict[str, LPIPS | None]:
    """Both backbones, as `image_metrics` expects them: {"alex": ..., "vgg": ...}, None where unavailable. What
    is missing is said once per directory, in one line on stderr."""
    directory = _directory(weights_dir)
    files = {net: weight_files(net, directory) for net in NETS}
    backbones = [_BACKBONES[net].backbone_file for net in NETS if files[net][0] is None]
    linears = [_BACKBONES[net].linear_file for net in NETS if files[net][1] is None]
    if (backbones or linears) and directory not in _warned:
        _warned.add(directory)
        missing = [f"{', '.join(backbones)} (torchvision's ImageNet backbones, never downloaded) not in {directory}"
                   ] if backbones else []
        if linears:
            missing.append(f"{', '.join(linears)} (linear layers) neither there nor in an installed lpips package "
                           "(pip install --no-deps lpips)")
        print(f"warning: LPIPS reported as null where its weights are missing: {'; '.join(missing)} "
              "(see --lpips_weights_dir)", file=sys.stderr)
    return {net: load_lpips(net, directory, device) for net in NETS}


def _directory(weights_dir: Path | None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()


def _copy_weights(module: nn.Module, path: Path, file_key: Callable[[str], str]) -> None:
    """Fill every tensor of `module` from the state dict in `path`, where our key `k` is `file_key(k)`."""
    state = load_torch(path, "PyTorch weights file")
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    ours = module.state_dict()
    loaded = {}
    for key, expected in ours.items():
        value = state.get(file_key(key))
        if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
            found = ("nothing" if value is None else f"shape {tuple(value.shape)}"
                     if isinstance(value, torch.Tensor) else type(value).__name__)
            raise UserError(f"{path}: '{file_key(key)}' should be a tensor of shape {tuple(expected.shape)}, "
                            f"found {found}")
        if not torch.isfinite(value).all():
            raise UserError(f"{path}: '{file_key(key)}' holds non-finite values")
        loaded[key] = value
    module.load_state_dict(loaded)
