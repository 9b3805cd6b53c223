"""LPIPS, the learned perceptual image distance (Zhang et al. 2018, version 0.1), AlexNet and VGG16 backbones.

Written in plain torch (torchvision cannot be installed beside our torch), with the backbones laid out as
torchvision's `features` stacks so that the public checkpoints load unchanged. Nothing is downloaded: the
weights are read from a directory (`--lpips_weights_dir`, else `~/.cache/mega_nerf/lpips/`) holding the files
of the public releases:

    alexnet-owt-7be5be79.pth  torchvision AlexNet  features.{0,3,6,8,10}.{weight,bias}
    vgg16-397923af.pth        torchvision VGG16    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}
    alex.pth, vgg.pth         LPIPS v0.1 linear    lin{k}.model.1.weight, shape (1, C_k, 1, 1), k = 0..4

Key mapping: `features.<i>.*` -> `LPIPS.features.<i>.*` (same indices; `classifier.*` is ignored) and
`lin<k>.model.1.weight` -> `LPIPS.lins.<k>.weight` (`model.0` is the dropout of the original training code).
To install them, copy torchvision's files (from `~/.cache/torch/hub/checkpoints/` wherever torchvision has
fetched them) and the `lpips` package's `weights/v0.1/{alex,vgg}.pth` into that directory.

When files are missing, `load_lpips` returns None and warns once, so that evaluation reports LPIPS as
unavailable instead of failing.
"""
from __future__ import annotations

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


def default_weights_dir() -> Path:
    """The documented cache directory used when no `--lpips_weights_dir` is given."""
    return Path.home() / ".cache" / "mega_nerf" / "lpips"


_warned: set[tuple[str, Path]] = set()


def load_lpips(net: str, weights_dir: Path | None = None, device: str | torch.device | None = None
               ) -> LPIPS | None:
    """LPIPS with backbone `net` ("alex" or "vgg") and the public weights found in `weights_dir`
    (default `default_weights_dir()`), on `device` (default CUDA when available).

    Returns None, warning once per backbone and directory on stderr, when a weights file is missing.
    Raises UserError naming the file when one is present but unreadable or of the wrong shape.
    """
    model = LPIPS(net)
    spec = _BACKBONES[net]
    directory = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    missing = [name for name in (spec.backbone_file, spec.linear_file) if not (directory / name).is_file()]
    if missing:
        if (net, directory) not in _warned:
            _warned.add((net, directory))
            print(f"warning: LPIPS ({net}) unavailable, reported as null: {', '.join(missing)} not found "
                  f"in {directory} (see --lpips_weights_dir)", file=sys.stderr)
        return None
    _copy_weights(model.features, directory / spec.backbone_file, lambda key: f"features.{key}")
    _copy_weights(model.lins, directory / spec.linear_file,
                  lambda key: f"lin{key.split('.')[0]}.model.1.weight")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def load_lpips_nets(weights_dir: Path | None = None, device: str | torch.device | None = None
                    ) -> dict[str, LPIPS | None]:
    """Both backbones, as `image_metrics` expects them: {"alex": ..., "vgg": ...}, None where unavailable."""
    return {net: load_lpips(net, weights_dir, device) for net in NETS}


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
