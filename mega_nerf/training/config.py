"""What one training run needs to know, as one frozen dataclass built at the edge (the CLI) and handed down."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mega_nerf.bounds import FOREGROUND_SCALE
from mega_nerf.data.dataset import MEGA_NERF, PROTOCOLS
from mega_nerf.errors import UserError, parse_device
from mega_nerf.fields import FIELDS
from mega_nerf.fields.encoding import SH_DEGREE


@dataclass(frozen=True)
class TrainConfig:
    """One submodule's (or one whole-scene model's) training run. Lengths are real-world units, as the user
    gives them; the trainer normalises them with the dataset's coordinates."""

    dataset_path: str
    exp_name: str
    chunk_paths: tuple[str, ...] = ()  # directories for the shuffled ray chunks (data_mode disk)
    cluster_mask_path: str | None = None  # this cell's mask directory; None trains on every ray
    data_mode: str = "disk"  # disk: stream shuffled chunks; memory: every ray in RAM
    chunk_rays: int = 2 ** 22  # rays per chunk, which is also what the stream loads at once
    image_store: str | None = None  # the shared decoded images; None: image_store/ beside the first chunk path
    train_scale_factor: int = 1
    # scene bounds (real-world units)
    near: float = 1.0
    far: float | None = None  # None: rays.DEFAULT_FAR in normalised units
    ray_altitude_range: tuple[float, float] | None = None
    foreground_scale: float = FOREGROUND_SCALE  # the foreground box over the cameras' extent (bounds.py)
    # the field: its kind and sizes (None: the field's own default)
    field: str = "hash"
    appearance_dim: int | None = None
    hash_levels: int = 16
    log2_hashmap_size: int = 22
    max_resolution: int = 2048
    occupancy_resolution: int = 128
    occupancy_interval: int = 8
    occupancy_warmup: int = 32
    sh_degree: int = SH_DEGREE  # hash field: spherical-harmonic degree of the view direction in the colour MLP
    affine_appearance: bool = False  # appearance as a per-image affine colour transform (fields/base.py)
    horizon_background: bool = True  # over a slab, rays heading down see the sky at the horizon (fields/base.py)
    # Mega-NeRF's network sizes, for the mlp field (None: its 8 layers of 256, 12 position, 4 direction frequencies)
    layers: int | None = None
    layer_dim: int | None = None
    pos_xyz_dim: int | None = None
    pos_dir_dim: int | None = None
    # optimisation (None: the field's own default, its Field.train_defaults)
    batch_size: int | None = None  # rays per optimiser step
    micro_batch: int | None = None  # rays per forward/backward pass (None: what fits the device, see Trainer)
    lr: float | None = None
    lr_decay_factor: float = 0.1
    # The lr falls by lr_decay_factor every lr_decay_epochs passes over the cell's rays, so a long run settles
    # rather than over-fits; 0: once over train_iterations (Mega-NeRF's schedule). None: the field's default.
    lr_decay_epochs: float | None = None
    train_iterations: int | None = None  # None: the field's default (hash: 2 lr decays, in epochs of the cell)
    samples: int | None = None
    fine_samples: int | None = None
    bg_samples: int = 96  # samples beyond the foreground box, in contracted space
    amp: bool = True  # training steps on a GPU under a bfloat16 autocast
    cuda_graphs: bool = True  # a GPU step's shading, backward and update replayed as CUDA graphs (training.graphs)
    # regularisers against fitting few views (0: off); see Trainer._shade
    distortion_loss: float = 0.0  # weight of mip-NeRF 360's distortion loss (render.distortion)
    hash_decay: float = 0.0  # weight of the hash grid's normalised weight decay (HashGrid.decay_loss)
    # Samples nearer their camera than this (real-world units) learn slower, against floaters in front of it
    # (render.shade); None: NEAR_GRADIENT_SPACINGS times the cameras' spacing (Trainer), the mlp field's default 0
    near_gradient_distance: float | None = None
    ckpt_path: str | None = None  # a checkpoint to start from when exp_name holds none
    # which val pixels train: Mega-NeRF's protocol (left halves) or strict (none); data/dataset.PROTOCOLS
    eval_protocol: str = MEGA_NERF
    # Under it, whether the val left halves train only their own appearance embeddings (Trainer._shade), not
    # the field as well, so that the field cannot fit itself to an embedding fitted to half an image
    val_embeddings_only: bool = False
    # bookkeeping
    ckpt_interval: int = 2000
    keep_checkpoints: int = 3  # the latest checkpoints kept, older ones deleted (0: all)
    val_interval: int = 5000
    val_images: int = 2
    log_interval: int = 100
    seed: int = 42
    device: str | None = None
    progress: bool = True
    # Options left unset whose default depends on the machine (the device; the CPU's smaller batch): filled here,
    # and left out of a saved config.yaml (cli.options.record_options), so that it reads back right elsewhere.
    machine_filled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check the protocol and field, and fill what the user left unset: the device (cuda when available) and
        the field's own defaults for it."""
        if self.eval_protocol not in PROTOCOLS:
            raise UserError(f"--eval_protocol: unknown protocol '{self.eval_protocol}' (choose from "
                            f"{', '.join(PROTOCOLS)})")
        if self.field not in FIELDS:
            raise UserError(f"--field: unknown field '{self.field}' (choose from {', '.join(FIELDS)})")
        machine = ("device", *FIELDS[self.field].cpu_train_defaults)  # what a default depends on the machine for
        filled = {*self.machine_filled, *(key for key in machine if getattr(self, key) is None)}
        object.__setattr__(self, "machine_filled", tuple(sorted(filled)))
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        # whether this machine has it is checked where it is used (Trainer): a config may be a plan for a rank
        on_cpu = parse_device(self.device).type == "cpu"
        field = FIELDS[self.field]
        for key, default in {**field.train_defaults, **(field.cpu_train_defaults if on_cpu else {})}.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)  # frozen: set once, here
        if self.hash_decay and self.field != "hash":
            raise UserError(f"--hash_decay: the {self.field} field has no hash grid (use --field hash)")
        if self.val_embeddings_only and self.eval_protocol != MEGA_NERF:
            raise UserError(f"--val_embeddings_only: --eval_protocol {self.eval_protocol} trains no val pixels")
        if self.val_embeddings_only and self.appearance_dim == 0:
            raise UserError("--val_embeddings_only: --appearance_dim 0 leaves the val pixels nothing to train")
        if self.distortion_loss and self.fine_samples:
            raise UserError("--distortion_loss: needs uniform samples (--fine_samples 0), as the hash field's")
