"""Training one submodule (or one unpartitioned model) on its cell's rays.

The loop: stream a batch of (image, pixel, rgb), regenerate the rays from the poses on the device, render,
take the MSE (plus the coarse pass's with hierarchical sampling, as Mega-NeRF), step Adam with exponential decay.
Every `ckpt_interval` steps a complete checkpoint is written atomically; rerunning the same command resumes from
the latest one and ends bit-equal (on the CPU) to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mega_nerf.allocator import give_back_freed, keep_freed_blocks
from mega_nerf.bounds import camera_spacing, contracted_axes, foreground_box, mean_segment
from mega_nerf.clock import PartsClock
from mega_nerf.data.chunks import ChunkReader, gather_in_memory, masks_fingerprint, prepare_chunks
from mega_nerf.data.dataset import dataset_fingerprint, load_dataset
from mega_nerf.data.stream import RayStream, memory_pieces
from mega_nerf.distributed import PeerFailure
from mega_nerf.errors import STOP_SIGNALS, Interrupted, UserError, check_device, stop_on_signal
from mega_nerf.fields import build_field, config_differences, old_default_options
from mega_nerf.fields.base import Field
from mega_nerf.fields.encoding import SH_DEGREE
from mega_nerf.io import free_bytes, remove_temp_files, save_torch_atomic, tensor_bytes
from mega_nerf.partition.cells import check_cell_masks
from mega_nerf.rays import Cameras, SceneBounds
from mega_nerf.render import RenderConfig
from mega_nerf.training import checkpoint as ckpt
from mega_nerf.training.adam import Adam
from mega_nerf.training.config import TrainConfig
from mega_nerf.training.graphs import GraphedSteps, capacity_for
from mega_nerf.training.log import Logger
from mega_nerf.training.step import PassOptions, draw_samples, shade_pass, warm_up_in_background
from mega_nerf.training.validation import validate

StepHook = Callable[[int], None]
CPU_PASS_BYTES = 1 << 30  # what one forward/backward pass may take on a CPU by default: room on a small machine
GPU_PASS_FRACTION = 0.75  # of the GPU's memory, by default
STAND_IN_LOG2_TABLE = 19  # the warm-up's stand-in field's hash table, at most (Trainer._stand_in)
# --near_gradient_distance left unset: this many times the median spacing of neighbouring cameras. A point nearer a
# camera than about its spacing is seen by few other cameras. On the presets 0.13 (`street`, whose cameras stand
# 9 m apart), 0.26 (`oblique`) and 0.075 (`city`): `street` gained 1.2-1.6 dB at 0.1-0.2, `oblique` and `city`
# were level at 0.3. A fixed distance in normalised units would grow with a survey's extent, past the height of
# its cameras above what they see (bench/RESULTS.md, thirtieth session)
NEAR_GRADIENT_SPACINGS = 1.5


def pass_budget(device: torch.device) -> int:
    """Bytes one forward/backward pass may take unless --micro_batch says otherwise."""
    if device.type == "cuda":
        return int(GPU_PASS_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    return CPU_PASS_BYTES


def field_config(config: TrainConfig, box: tuple[torch.Tensor, torch.Tensor], contracted: list[bool],
                 n_images: int, occupancy_threshold: float) -> dict[str, Any]:
    """The field's constructor arguments (stored in checkpoints, so a field is rebuilt from plain data)."""
    cfg: dict[str, Any] = {"kind": config.field, "box_min": box[0].tolist(), "box_max": box[1].tolist(),
                           "n_images": n_images, "contracted": contracted}
    if config.appearance_dim is not None:
        cfg["appearance_dim"] = config.appearance_dim
    if config.affine_appearance:
        cfg["affine_appearance"] = True
    # Only over an altitude slab, where it acts; absent in fields saved before the option (read as off) or without it
    if config.horizon_background and not contracted[0]:
        cfg["horizon_background"] = True
    if config.field == "hash":
        cfg.update(n_levels=config.hash_levels, log2_table_size=config.log2_hashmap_size,
                   max_resolution=config.max_resolution, occupancy_resolution=config.occupancy_resolution,
                   occupancy_threshold=occupancy_threshold, occupancy_interval=config.occupancy_interval,
                   occupancy_warmup=config.occupancy_warmup)
        if config.sh_degree != SH_DEGREE:  # stored only when set, as fields saved before the option compare equal
            cfg["sh_degree"] = config.sh_degree
    if config.field == "mlp":
        sizes = {"layers": config.layers, "width": config.layer_dim, "position_frequencies": config.pos_xyz_dim,
                 "direction_frequencies": config.pos_dir_dim}
        cfg.update({k: v for k, v in sizes.items() if v is not None})
    return cfg


class Trainer:
    def __init__(self, config: TrainConfig, on_step: StepHook | None = None, started: float | None = None,
                 on_ready: Callable[[], None] | None = None, same_render: bool = False) -> None:
        """config: the run; on_step: called after every optimiser step with the step number (tests use it to
        stop a run abruptly); started: when the process started (the command line passes it, so that the
        start-up breakdown counts imports), else start-up is timed from here; on_ready: called once the data
        and any checkpoint to resume are verified, before training, and only when there are steps left to train
        (the commands save the run's options then, so a refused or finished run leaves the experiment's saved
        options alone); same_render: a resumed checkpoint's render settings must be this run's (train_cells: the
        cells are merged together), where a lone run only warns."""
        self.clock = PartsClock(started)
        if started is not None:
            self.clock.mark("imports")
        if config.data_mode == "disk" and not config.chunk_paths:
            raise UserError("missing option --chunk_paths")
        self.config, self.on_step, self.on_ready, self.same_render = config, on_step, on_ready, same_render
        self.device = check_device(config.device)  # resolved by TrainConfig, checked against this machine here
        keep_freed_blocks(self.device)  # a CPU pass's gigabyte of temporaries, reused instead of faulted in again
        self.render_config = RenderConfig(config.samples, config.fine_samples, perturb=True,
                                          bg_samples=config.bg_samples)
        # Its near-camera distance needs the dataset (below); the warm-up shades without one
        self.pass_options = PassOptions(self.render_config, self.device.type == "cuda" and config.amp,
                                        config.distortion_loss, near_gradient=0.0)
        self.warming: threading.Thread | None = None  # joined before the first step
        if self.device.type == "cuda":
            torch.empty(1, device=self.device)  # creates the context now, so the breakdown shows it
            self.warming = warm_up_in_background(self._stand_in(), self.pass_options)
            torch.cuda.synchronize(self.device)
        self.clock.mark("device init")
        self.exp_dir = Path(config.exp_name)
        self.dataset = load_dataset(config.dataset_path, config.train_scale_factor)
        self.bounds = SceneBounds.from_real(config.near, config.far, config.ray_altitude_range,
                                           self.dataset.coordinates)
        if self.bounds.altitude is None:
            print("warning: no --ray_altitude_range: rays are not clipped to the scene's altitude slab, and the "
                  "foreground box's height is guessed from the cameras (bounds.foreground_box); give [top, ground] "
                  "in real down-coordinates (the converters estimate it from sparse points; preview_dataset.py "
                  "draws it)", file=sys.stderr)
        self.cameras = Cameras.from_dataset(self.dataset)
        self.pass_options = dataclasses.replace(self.pass_options, near_gradient=self._near_gradient())
        self.clock.mark("dataset")
        self.mask_dir = Path(config.cluster_mask_path) if config.cluster_mask_path else None
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise UserError(f"--cluster_mask_path: {self.mask_dir} is not a directory")
        if self.mask_dir is not None:
            check_cell_masks(self.mask_dir, self.dataset)
        self.masks = masks_fingerprint(self.mask_dir)
        self.clock.mark("masks")
        box = foreground_box(self.cameras.c2w[:, :, 3], self.bounds.altitude, config.foreground_scale)
        segment = mean_segment(self.cameras, self.bounds, box)
        # A cell is empty space once a sample there would be under 1% opaque (alpha = 1 - exp(-sigma * dt)).
        self.occupancy_threshold = 0.01 / (segment / config.samples)
        torch.manual_seed(config.seed)
        self.field_config = field_config(config, box, contracted_axes(self.bounds.altitude),
                                         len(self.dataset.images), self.occupancy_threshold)
        self.field = self._build_field(config)
        self.optimizer = Adam(self.field.parameters(), lr=config.lr)  # one fused kernel, CPU and GPU alike
        self.cameras = self.cameras.to(self.device)
        # Memory grows with the samples a pass shades: a step's rays go in passes of at most micro_batch rays.
        self.bytes_per_ray = self.field.train_bytes_per_sample() * (config.samples + config.bg_samples
                                                                    + config.fine_samples)
        budget_rays = max(1, pass_budget(self.device) // self.bytes_per_ray)
        self.micro_batch = min(config.batch_size, config.micro_batch or budget_rays)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.val_image = None  # (I,) bool on the device: which appearance indices are val images (_shade)
        if config.val_embeddings_only:
            self.val_image = torch.zeros(len(self.dataset.images), dtype=torch.bool, device=self.device)
            self.val_image[[m.index for m in self.dataset.val]] = True
        self.graphs: GraphedSteps | None = None  # made at the first graphed step (train_step), dropped by run
        self.graphs_captured = 0  # how many graphs the last run captured
        self.stopped_by: int | None = None  # the stop signal (SIGINT, SIGTERM) that came in the last run's last step
        self.step = 0
        self.clock.mark("model")

    def _stand_in(self) -> Field:
        """A field of this run's kind for the warm-up (training.step), on the device: its options, but over the
        unit box, for one image, and with a hash table of at most 2^19 entries per level (its
        parameters, gradients and Adam moments are four copies of it, beside the run's own). Built before the
        run's seed is set and its field made, so the run draws the same numbers as without it."""
        box = (torch.full((3,), -1.0), torch.ones(3))
        config = dataclasses.replace(self.config, log2_hashmap_size=min(self.config.log2_hashmap_size,
                                                                        STAND_IN_LOG2_TABLE))
        with torch.device(self.device):
            return build_field(field_config(config, box, contracted_axes(config.ray_altitude_range), 1, 1.0))

    def validate(self) -> dict[str, float]:
        """Validation at the current step on the first `val_images` val images (training.validation), scored
        and rendered as the evaluation protocol says."""
        images, protocol = self.dataset.val[: self.config.val_images], self.config.eval_protocol
        return validate(self.field, images, self.mask_dir, self.bounds, self.render_config, self.exp_dir / "val",
                        self.step, protocol, [self.dataset.appearance_for(m, protocol) for m in images])

    def lr_at(self, step: int) -> float:
        """lr * decay_factor ** (epochs / lr_decay_epochs), epochs counted in the cell's rays; with
        lr_decay_epochs 0, Mega-NeRF's lr * decay_factor ** (step / train_iterations)."""
        c = self.config
        if c.lr_decay_epochs:
            return c.lr * c.lr_decay_factor ** (self.epochs(step) / c.lr_decay_epochs)
        return c.lr * c.lr_decay_factor ** (step / self.iterations)

    def _build_field(self, config: TrainConfig) -> Field:
        """The field, made on its device (drawing a 2^22-entry table's initial values on the host took 0.35 s of
        start-up), or a one-line UserError naming the options that size it where it does not fit (torch's own error
        is a traceback from deep inside the allocator)."""
        try:
            with torch.device(self.device):
                return build_field(self.field_config)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            asked = re.search(r"allocate ([0-9.]+ ?[GMK]iB|[0-9]+ bytes)", str(e))
            size = f" (asked for {asked.group(1)})" if asked else ""
            memory = "GPU" if isinstance(e, torch.OutOfMemoryError) else "host"
            raise UserError(f"the {config.field} field does not fit in {memory} memory{size}: lower "
                            f"--log2_hashmap_size ({config.log2_hashmap_size}), --max_resolution or "
                            "--occupancy_resolution") from None

    def memory_report(self) -> str:
        """One line on a step's passes and the memory each takes (Field.train_bytes_per_sample's estimate)."""
        passes = -(-self.config.batch_size // self.micro_batch)
        gib = self.bytes_per_ray * self.micro_batch / 2 ** 30
        return (f"step: {self.config.batch_size:,} rays in {passes} pass(es) of at most {self.micro_batch:,}, "
                f"about {gib:.2f} GiB each on {self.device.type} (estimate; --micro_batch bounds it)")

    def checkpoint_bytes(self) -> int:
        """What one checkpoint takes on disk: the model's tensors and Adam's two moments of its parameters (the
        rest is small)."""
        return tensor_bytes(self.field.state_dict()) + 2 * sum(p.numel() * p.element_size()
                                                               for p in self.field.parameters())

    def checkpoint_report(self) -> str:
        """One line on what checkpoints take on disk, so that the cost of a large table is seen before the first
        one is written."""
        each = self.checkpoint_bytes() / 2 ** 20
        kept = self.config.keep_checkpoints
        held = f"the latest {kept} kept, about {kept * each:,.0f} MiB" if kept else "every one kept"
        return (f"checkpoints: about {each:,.0f} MiB each, every {self.config.ckpt_interval:,} steps to "
                f"{self.exp_dir / 'checkpoints'}; {held} (--keep_checkpoints)")

    def check_checkpoint_room(self) -> None:
        """UserError now, not when a checkpoint is due, if the disk cannot hold the rest of the run's checkpoints
        at their peak: with --keep_checkpoints K, K + 1 at once (the next is written before the oldest goes)."""
        k, keep = self.config.ckpt_interval, self.config.keep_checkpoints
        saves = self.iterations // k - self.step // k + (self.iterations % k != 0)
        existing = len(ckpt.checkpoint_files(self.exp_dir))
        more = saves if keep == 0 else max(min(keep + 1, existing + saves) - existing, 0)
        folder, each = self.exp_dir / "checkpoints", self.checkpoint_bytes()
        if (free := free_bytes(folder)) < more * each:
            raise UserError(f"{folder}: not enough disk space for this run's checkpoints ({more} more of {each:,} "
                            f"bytes at once, {free:,} free); free some, lower --keep_checkpoints or give an "
                            "--exp_name on a larger disk")

    def foreground_report(self) -> str:
        """One line on the foreground box: its horizontal extent, over the cameras' (docs/DESIGN.md, Scene bounds)."""
        lo, hi = self.field_config["box_min"], self.field_config["box_max"]
        centres = self.cameras.c2w[:, :, 3].cpu()
        spread = (centres.max(0).values - centres.min(0).values).tolist()
        ratio = max((hi[a] - lo[a]) / max(spread[a], 1e-9) for a in (1, 2))
        beyond = "contracted" if any(self.field_config.get("contracted", [])) else "empty"
        return (f"foreground box y [{lo[1]:.2f}, {hi[1]:.2f}], z [{lo[2]:.2f}, {hi[2]:.2f}] (normalised), "
                f"{ratio:.2f}x the cameras' horizontal extent; the world beyond it {beyond}")

    def _near_gradient(self) -> float:
        """The distance (normalised) within which samples learn slower near their camera (render.shade):
        --near_gradient_distance (real-world units), else NEAR_GRADIENT_SPACINGS times the cameras' spacing."""
        if self.config.near_gradient_distance is not None:
            return self.config.near_gradient_distance / self.dataset.coordinates.pose_scale_factor
        return NEAR_GRADIENT_SPACINGS * camera_spacing(self.cameras.c2w[:, :, 3])

    def near_gradient_report(self) -> str:
        """One line on where gradients are scaled near the cameras (render.shade)."""
        distance, given = self.pass_options.near_gradient, self.config.near_gradient_distance is not None
        if distance == 0:
            why = "--near_gradient_distance 0" if given else "the cameras all stand at one place"
            return f"near the cameras: gradients as they are ({why})"
        how = ("--near_gradient_distance" if given else
               f"{NEAR_GRADIENT_SPACINGS}x the cameras' median spacing; --near_gradient_distance sets it, 0: off")
        real = distance * self.dataset.coordinates.pose_scale_factor
        return (f"near the cameras: gradients scaled by (distance / d)^2 within d = {real:.3g} ({distance:.3g} "
                f"normalised; {how})")

    def epochs(self, step: int) -> float:
        """Passes over the cell's rays after `step` steps."""
        return step * self.config.batch_size / self.cell_rays

    def _plan(self, cell_rays: int) -> None:
        """The run's length once the cell's ray count is known: train_iterations, or two lr decays (the lr then
        is 1% of its start and the model has settled)."""
        self.cell_rays = cell_rays
        c = self.config
        decay_steps = c.lr_decay_epochs * cell_rays / c.batch_size
        self.iterations = c.train_iterations or (max(1, math.ceil(2 * decay_steps)) if decay_steps else 30000)

    def prepare_data(self) -> RayStream | None:
        """The cell's rays as a stream; None when the cell has no rays."""
        a = self.config
        if a.data_mode == "memory":
            read, counts = memory_pieces(gather_in_memory(self.dataset, self.mask_dir, a.seed, a.eval_protocol))
            self.clock.mark("rays in memory")
        else:
            paths = [Path(p) for p in a.chunk_paths]
            store = Path(a.image_store) if a.image_store else None
            reused = (paths[0] / "manifest.json").is_file()
            manifest = prepare_chunks(self.dataset, self.mask_dir, paths, a.chunk_rays, a.seed, store,
                                      masks=self.masks, protocol=a.eval_protocol)
            read = ChunkReader(manifest, paths, self.dataset, store)
            counts = read.counts
            self.clock.mark("chunks", "reused" if reused else f"written, {manifest.count:,} rays")
        total = sum(counts)
        if total == 0:
            return None
        if a.batch_size > total:
            raise UserError(f"--batch_size {a.batch_size} is larger than the {total} rays in this cell")
        self._plan(total)
        return RayStream(read, counts, a.batch_size, a.seed, self.device)

    def state(self, stream: RayStream | None, empty: bool = False) -> dict[str, Any]:
        return {"version": ckpt.VERSION, "step": self.step,
                "iterations": self.step if stream is None else self.iterations, "field_config": self.field_config,
                "model": self.field.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stream": stream.state_dict() if stream else {}, "rng": ckpt.rng_state(self.generator),
                "dataset": dataset_fingerprint(self.dataset), "empty": empty,
                "cell": self.mask_dir.name if self.mask_dir else None, "masks": self.masks,
                "eval_protocol": self.config.eval_protocol, "val_embeddings_only": self.config.val_embeddings_only,
                "render": self._render_settings(),
                "scene": {"near": self.bounds.near, "far": self.bounds.far,
                          "altitude_range": list(self.bounds.altitude) if self.bounds.altitude else None}}

    def _render_settings(self) -> dict[str, int]:
        """The sample counts a checkpoint records, which the merge requires equal in every cell."""
        return {"samples": self.config.samples, "fine_samples": self.config.fine_samples,
                "bg_samples": self.config.bg_samples}

    def save(self, stream: RayStream | None, empty: bool = False) -> Path:
        """Write this step's checkpoint atomically, then delete all but the --keep_checkpoints latest."""
        path = ckpt.checkpoint_path(self.exp_dir, self.step)
        save_torch_atomic(self.state(stream, empty), path)  # a reader never sees a half-written one
        ckpt.prune_checkpoints(self.exp_dir, self.config.keep_checkpoints, path)
        return path

    def resume(self, stream: RayStream) -> Path | None:
        """Continue from the latest checkpoint in exp_name or, when it holds none, from --ckpt_path."""
        self.graphs = None  # they would update the optimiser state that loading replaces
        path = ckpt.latest_checkpoint(self.exp_dir)
        other = "use another --exp_name"  # what a mismatch asks: for --ckpt_path, another checkpoint
        if path is not None:
            if self.config.ckpt_path:  # Mega-NeRF's option starts a run; a rerun goes on from its own
                print(f"note: --ckpt_path {self.config.ckpt_path} is not read: {self.exp_dir} holds checkpoints of "
                      f"its own, the latest {path.name}", file=sys.stderr)
            state = ckpt.load_run_checkpoint(path, self.device)
        elif self.config.ckpt_path:
            other = "give --ckpt_path another checkpoint"
            path = Path(self.config.ckpt_path)
            if not path.is_file():
                raise UserError(f"--ckpt_path: {path} is not a file")
            state = ckpt.load_checkpoint(path, self.device)
        else:
            return None
        missing = [key for key in ckpt.RESUME_KEYS if key not in state]
        if missing:  # a merge needs less of a checkpoint than a resume does: an edited or stripped file
            raise UserError(f"{path}: a checkpoint without {', '.join(missing)}: it cannot be resumed")
        if state["dataset"] != dataset_fingerprint(self.dataset):
            raise UserError(f"{path}: checkpoint of another dataset; {other}")
        saved = ckpt.comparable_field_config(state, self.field_config, self.config.samples)
        differences = config_differences(saved, self.field_config)
        if differences:
            old = old_default_options(saved, self.field_config)
            if old:  # and the far samples', which changed with the table: one message gives back the whole run
                old += old_default_options(state["render"], self._render_settings())
            before = f" (trained at earlier defaults: add {' '.join(old)})" if old else ""
            raise UserError(f"{path}: checkpoint of another field ({', '.join(differences)}: its value, then this "
                            f"run's); give the options it was trained with{before} or {other}")
        cell = self.mask_dir.name if self.mask_dir else None
        if state["cell"] != cell or state.get("masks", self.masks) != self.masks:
            given = f"cell {cell}" if cell else "no masks"
            raise UserError(f"{path}: checkpoint trained on cell {state['cell']}'s masks, but --cluster_mask_path "
                            f"gives {given}{' with other masks' if state['cell'] == cell else ''}; {other} or "
                            "the masks it was trained with")
        trained = state["eval_protocol"]
        if trained != self.config.eval_protocol:
            raise UserError(f"{path}: checkpoint trained under --eval_protocol {trained}, but this run gives "
                            f"{self.config.eval_protocol}; {other} or the protocol it was trained with")
        if state["val_embeddings_only"] != self.config.val_embeddings_only:
            given = "with" if state["val_embeddings_only"] else "without"
            raise UserError(f"{path}: checkpoint trained {given} --val_embeddings_only; {other} or the setting "
                            "it was trained with")
        render = self._render_settings()
        if state["render"] != render:  # allowed; the merge then needs the other cells to match
            old = old_default_options(state["render"], render)
            keep = f" ({' '.join(old)} keeps the old default)" if old else ""
            if self.same_render and int(state["step"]) < self.iterations:  # a finished cell trains no more
                raise UserError(f"{path}: trained with render settings {state['render']}, this job gives {render}"
                                f"{keep}; the cells are merged together: give the options it was trained with")
            print(f"warning: {path} was trained with render settings {state['render']}, this run goes on with "
                  f"{render}{keep}; the merge needs every cell's equal", file=sys.stderr)
        try:
            self.field.load_state_dict(state["model"])
        except RuntimeError as e:  # tensors that its own field config does not make: a damaged or edited file
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise UserError(f"{path}: its model does not fit its field config ({detail})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        ckpt.restore_rng(state["rng"], self.generator)
        self.step = int(state["step"])
        if self.step > self.iterations:
            print(f"warning: {path} is at step {self.step}, past the {self.iterations} steps this run asks for: "
                  "nothing to train (its checkpoint stays the result)", file=sys.stderr)
        return path

    def _samples(self, image: torch.Tensor, pixel: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rays of (image, pixel) (R,), their jittered samples and which of those are worth shading:
        everything a pass draws or counts before its field is evaluated (render_samples' inputs)."""
        origins, dirs = self.cameras.rays(image, pixel)
        near, far = self.bounds.clip(origins, dirs)
        return draw_samples(self.field, origins, dirs, near, far, image, self.render_config, self.generator)

    def _shade(self, s: dict[str, torch.Tensor], rgb: torch.Tensor, batch: int, capacity: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of one pass over the rays of `_samples` (training.step.shade_pass)."""
        return shade_pass(self.field, s, rgb, batch, self.pass_options, self.generator, self.val_image, capacity)

    def _update(self, loss: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        """The step's end, once its passes' gradients are in: the hash decay term, then Adam (at `lr` if given, a
        0-d device tensor, else the optimiser's own). Returns the step's loss."""
        if self.config.hash_decay:  # a term of the step, not of its rays: once, whatever the passes
            decay = self.config.hash_decay * self.field.grid.decay_loss()
            decay.backward()
            loss = loss + decay.detach()
        self.optimizer.step(lr)
        return loss

    def _graphed_body(self, s: dict[str, torch.Tensor], capacity: int, lr: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """What GraphedSteps captures: one pass at `capacity` and the update (s["rgb"]: the colours)."""
        self.optimizer.zero_grad()
        loss, mse, _ = self._shade(s, s["rgb"], s["rgb"].shape[0], capacity)
        return self._update(loss, lr), mse

    def _use_graphs(self, rays: int) -> bool:
        """Whether this step runs through CUDA graphs: on a GPU, asked for, with uniform samples only (a fine
        pass would count its samples again), in one pass of a full batch, and past the occupancy grid's
        warm-up, once the grid has been estimated (before, every sample in the box is shaded: a graph at that
        capacity would hold its memory all run)."""
        c = self.config
        return (self.device.type == "cuda" and c.cuda_graphs and c.fine_samples == 0 and rays == c.batch_size
                and self.micro_batch == c.batch_size and self.field.occupancy_estimated(self.step))

    def train_step(self, stream: RayStream) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step over `batch_size` rays, in passes of at most `micro_batch` rays whose gradients
        add up (`_shade`), or through CUDA graphs (`_use_graphs`, training.graphs). On the CPU the jitter of
        consecutive passes is drawn in the order of the unsplit step, so without hierarchical sampling a split
        step equals the unsplit one up to float rounding. Returns the loss and the fine-pass MSE (device
        tensors, no sync)."""
        image, pixel, rgb = stream.next_batch()
        self.optimizer.lr = self.lr_at(self.step)
        batch = len(image)
        if self._use_graphs(batch):
            s = {**self._samples(image, pixel), "rgb": rgb}
            count = int(s["occupied"].sum())  # the step's one sync, as nonzero's in an eager step
            if self.graphs is None:
                self.graphs = GraphedSteps(self._graphed_body, s)
            loss, mse = self.graphs.step(s, capacity_for(count, s["occupied"].numel()), self.optimizer.lr)
            self.optimizer.zero_grad()  # the gradients lie in the graphs' pool, which the next graph reuses
            self.last_samples = count
        else:
            self.optimizer.zero_grad()
            loss, mse, self.last_samples = 0.0, 0.0, 0  # samples: logged per ray
            for start in range(0, batch, self.micro_batch):
                part = slice(start, start + self.micro_batch)
                pass_loss, pass_mse, samples = self._shade(self._samples(image[part], pixel[part]), rgb[part],
                                                           batch)
                loss, mse, self.last_samples = loss + pass_loss, mse + pass_mse, self.last_samples + samples
            loss = self._update(loss)
        self.step += 1
        self.field.after_step(self.step, self.generator)
        return loss.detach(), mse.detach()

    def _time_first_steps(self, steps: int, loss: torch.Tensor, stream: RayStream, log: Logger) -> None:
        """Start-up parts of the first two steps: the first step, less the wait for its data and less a second
        step's time, is kernel compilation (and other first-call costs); logged after the second."""
        float(loss)  # waits for the device
        if steps == 1:
            self.clock.mark("first step")
            self.clock.split("first step", "first data", stream.wait_seconds)
            self._step_started = time.time()
        else:
            second = time.time() - self._step_started
            self.clock.split("first step", "kernel compilation", self.clock.parts["first step"] - second)
            self._log_startup(log)

    def _log_startup(self, log: Logger) -> None:
        # On a line of its own, not into the progress bar's.
        tqdm.write(self.clock.summary("start-up {total} to the first step"))
        log.record(startup={**self.clock.parts, "total": self.clock.total}, startup_notes=self.clock.notes)

    def run(self) -> Path:
        """Train `iterations` steps, resuming if checkpoints exist. Returns the final checkpoint. However the run
        ends, the warm-up thread has ended too (the next cell of train_cells.py starts its own)."""
        try:
            return self._train()
        finally:
            # The graphs and their memory pool (they and the trainer refer to each other), however the run ends:
            # train_cells.py goes on to the next cell
            self.graphs = None
            self._join_warm_up()

    def _saved_step(self, stream: RayStream, last_good: Path | None) -> Path:
        """This step's checkpoint: `last_good` when it is this step's, else saved now (a run stopping mid-way)."""
        here = ckpt.checkpoint_path(self.exp_dir, self.step)
        return last_good if last_good == here else self.save(stream)

    def _join_warm_up(self) -> bool:
        """Wait for the warm-up thread, if one is running; whether one was."""
        if self.warming is None:
            return False
        self.warming.join()
        self.warming = None
        return True

    def _train(self) -> Path:
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        # What runs killed mid-write left in the folders this one writes atomically into (a checkpoint's temp file
        # is about 0.9 GB at the defaults); io removes only dead processes' files
        for folder in (self.exp_dir, self.exp_dir / "checkpoints", self.exp_dir / "val"):
            if (note := remove_temp_files(folder)) is not None:  # a run requeued from another host left them
                print(note, file=sys.stderr)
        stream = self.prepare_data()
        last_good = None if stream is None else self.resume(stream)
        if last_good is not None:
            self.clock.mark("resume")
            print(f"resuming from {last_good} (step {self.step})")
        if stream is None:
            latest = ckpt.latest_checkpoint(self.exp_dir)
            if latest is not None and latest != ckpt.checkpoint_path(self.exp_dir, 0):  # it would stay the latest
                raise UserError(f"{latest}: a checkpoint of a run with rays, but --cluster_mask_path "
                                f"{self.mask_dir} gives this cell none (other masks?); use another --exp_name")
            if self.on_ready is not None and latest is None:  # a finished empty cell keeps its saved options
                self.on_ready()
            print(f"warning: cell {self.mask_dir} has no rays; writing an empty checkpoint", file=sys.stderr)
            return self.save(None, empty=True)
        if self.on_ready is not None and (last_good is None or self.step < self.iterations):
            self.on_ready()
        print(f"training {self.iterations} steps, {self.epochs(self.iterations):.1f} epochs of the cell's "
              f"{self.cell_rays:,} rays; {self.foreground_report()}")
        print(self.memory_report())
        print(self.near_gradient_report())
        print(self.checkpoint_report())
        if self.step < self.iterations:  # a finished run writes nothing
            self.check_checkpoint_room()
        # Both closed however the run ends: the log's files and threads, and the bar's line (an error's one line
        # then starts a line of its own)
        with (Logger(self.exp_dir, self.step) as log,
              tqdm(total=self.iterations, initial=self.step, disable=not self.config.progress, desc="train") as bar):
            return self._loop(stream, log, bar, last_good)

    def _loop(self, stream: RayStream, log: Logger, bar: tqdm, last_good: Path | None) -> Path:
        """Train from self.step to self.iterations, logging, checkpointing and validating as configured; the last
        checkpoint saved."""
        a = self.config
        first_bad = torch.tensor(-1, device=self.device)
        t0, rays0 = time.perf_counter(), 0
        first = self.step
        if self._join_warm_up():
            self.clock.mark("warm-up")
        with stop_on_signal() as stop:  # a first Ctrl-C or SIGTERM stops after a whole step, saved
            while self.step < self.iterations:
                loss, mse = self.train_step(stream)
                if self.step - first <= 2:
                    self._time_first_steps(self.step - first, loss, stream, log)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), self.step, first_bad)
                rays0 += a.batch_size
                bar.update(1)
                if self.on_step is not None and not stop.is_set():  # stopping already: no peer news needed
                    try:
                        self.on_step(self.step)
                    except PeerFailure:  # another rank failed (train_cells): this step is whole, keep it
                        if int(first_bad) < 0 and (saved := self._saved_step(stream, last_good)) != last_good:
                            print(f"saved {saved} before stopping", file=sys.stderr)
                        raise
                # read once: a signal later in this step stops after the next; on the last step the run ends anyway
                stopping = stop.is_set() and self.step < self.iterations
                at_ckpt = self.step % a.ckpt_interval == 0 or self.step == self.iterations
                if (self.step % a.log_interval == 0 or at_ckpt or stopping) and int(first_bad) >= 0:
                    raise UserError(f"non-finite loss at step {int(first_bad)}; stopped, last good checkpoint: "
                                    f"{last_good or 'none'} (likely cause: --lr too high for this scene)")
                if self.step % a.log_interval == 0 or at_ckpt:
                    rate = rays0 / (time.perf_counter() - t0)
                    psnr = -10 * math.log10(max(float(mse), 1e-10))
                    log.scalars(self.step, loss=float(loss), psnr=psnr, lr=self.lr_at(self.step), rays_per_s=rate,
                                epoch=self.epochs(self.step), samples_per_ray=int(self.last_samples) / a.batch_size,
                                data_waits=stream.waits, data_wait_s=stream.wait_seconds)
                    bar.set_postfix(psnr=f"{psnr:.2f}", rays_s=f"{rate:,.0f}", epoch=f"{self.epochs(self.step):.1f}")
                    t0, rays0 = time.perf_counter(), 0
                    if self.device.type == "cpu":
                        give_back_freed()  # what the heap kept since the last line (allocator.py)
                if at_ckpt:
                    last_good = self.save(stream)
                if self.step % a.val_interval == 0 or self.step == self.iterations:
                    metrics = self.validate()
                    log.scalars(self.step, **metrics, seconds=time.time() - self.clock.start)  # since the start
                if stopping:
                    last_good = self._saved_step(stream, last_good)
                    raise Interrupted(f"{STOP_SIGNALS[stop.signum]} at step {self.step}: saved {last_good}; the same "
                                      "command resumes from it", stop.signum)
        self.stopped_by = stop.signum  # a signal during the last step, which ended the run anyway (train_cells)
        bar.close()  # before the lines below (closing it again is nothing)
        if self.graphs is not None:  # dropped, with their pool, as run() ends
            self.graphs_captured = len(self.graphs.graphs)
            print(f"CUDA graphs: {self.graphs_captured} captured, one per sample capacity the steps needed")
        if self.step - first == 1:  # a one-step run: no second step to tell compilation apart
            self._log_startup(log)
        return last_good
