"""Training one submodule (or one unpartitioned model) on its cell's rays.

The loop: stream a batch of (image, pixel, rgb), regenerate the rays from the poses on the device, render,
take the MSE (plus the coarse pass's with hierarchical sampling, as Mega-NeRF), step Adam with exponential decay.
Every `ckpt_interval` steps a complete checkpoint is written atomically; rerunning the same command resumes from
the latest one and ends bit-equal (on the CPU) to an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mega_nerf.bounds import scene_box
from mega_nerf.cli.options import require, scene_bounds
from mega_nerf.data.chunks import dataset_fingerprint, gather_in_memory, prepare_chunks
from mega_nerf.data.dataset import load_dataset
from mega_nerf.data.stream import RayStream
from mega_nerf.errors import UserError
from mega_nerf.fields import FIELDS, build_field
from mega_nerf.rays import Cameras, near_far
from mega_nerf.render import RenderConfig, render_rays
from mega_nerf.training import checkpoint as ckpt
from mega_nerf.training.validation import validate

# Per-field defaults where Mega-NeRF's settings (mlp) and Instant-NGP's (hash) differ.
FIELD_DEFAULTS = {
    "hash": {"lr": 1e-2, "samples": 128, "fine_samples": 0, "batch_size": 32768},
    "mlp": {"lr": 5e-4, "samples": 256, "fine_samples": 512, "batch_size": 1024},
}
KILL_HOOK = "MEGA_NERF_TEST_KILL_AT_STEP"  # tests: exit abruptly after this step, as kill -9 would


def field_config(args: Any, box: tuple[torch.Tensor, torch.Tensor], n_images: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"kind": args.field, "box_min": box[0].tolist(), "box_max": box[1].tolist(),
                           "n_images": n_images}
    if args.appearance_dim is not None:
        cfg["appearance_dim"] = args.appearance_dim
    if args.field == "hash":
        cfg.update(n_levels=args.hash_levels, log2_table_size=args.log2_hashmap_size,
                   max_resolution=args.max_resolution,
                   occupancy_resolution=args.occupancy_resolution)
    return cfg


class Trainer:
    def __init__(self, args: Any) -> None:
        for option in ("dataset_path", "exp_name"):
            require(getattr(args, option), option)
        if args.field not in FIELDS:
            raise UserError(f"--field: unknown field '{args.field}' (choose from {', '.join(FIELDS)})")
        if args.data_mode == "disk":
            require(args.chunk_paths, "chunk_paths")
        defaults = FIELD_DEFAULTS[args.field]
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.exp_dir = Path(args.exp_name)
        self.dataset = load_dataset(args.dataset_path, args.train_scale_factor)
        self.mask_dir = Path(args.cluster_mask_path) if args.cluster_mask_path else None
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise UserError(f"--cluster_mask_path: {self.mask_dir} is not a directory")
        self.near, self.far, self.altitude = scene_bounds(args, self.dataset.coordinates)
        self.cameras = Cameras.from_dataset(self.dataset)
        box_min, box_max, segment = scene_box(self.cameras, self.near, self.far, self.altitude)
        self.render_config = RenderConfig(args.samples, args.fine_samples, perturb=True)
        # A cell is empty space once a sample there would be under 1% opaque (alpha = 1 - exp(-sigma * dt)).
        self.occupancy_threshold = 0.01 / (segment / args.samples)
        torch.manual_seed(args.seed)
        self.field_config = field_config(args, (box_min, box_max), len(self.dataset.images))
        self.field = build_field(self.field_config).to(self.device)
        # One fused kernel for the whole update on the GPU (the CPU keeps the default, bit-reproducible path).
        self.optimizer = torch.optim.Adam(self.field.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-15,
                                          fused=self.device.type == "cuda" or None)
        self.cameras = self.cameras.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(args.seed)
        self.step = 0

    def lr_at(self, step: int) -> float:
        """Mega-NeRF's schedule: lr * decay_factor ** (step / train_iterations)."""
        return self.args.lr * self.args.lr_decay_factor ** (step / self.args.train_iterations)

    def prepare_data(self) -> RayStream | None:
        """The cell's rays as a stream; None when the cell has no rays."""
        a = self.args
        if a.data_mode == "memory":
            rays = gather_in_memory(self.dataset, self.mask_dir, a.seed)
            sources, counts = [rays], [len(rays)]
        else:
            paths = [Path(p) for p in a.chunk_paths]
            manifest = prepare_chunks(self.dataset, self.mask_dir, paths, a.chunk_rays, a.seed,
                                      progress=not a.no_progress)
            sources = [paths[d] / name for d, name, _ in manifest.chunks]
            counts = [c for _, _, c in manifest.chunks]
        total = sum(counts)
        if total == 0:
            return None
        if a.batch_size > total:
            raise UserError(f"--batch_size {a.batch_size} is larger than the {total} rays in this cell")
        return RayStream(sources, counts, a.batch_size, a.seed, self.device)

    def state(self, stream: RayStream | None, empty: bool = False) -> dict[str, Any]:
        return {"version": ckpt.VERSION, "step": self.step, "field_config": self.field_config,
                "model": self.field.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stream": stream.state_dict() if stream else {}, "rng": ckpt.rng_state(self.generator),
                "dataset": dataset_fingerprint(self.dataset), "empty": empty,
                "cell": self.mask_dir.name if self.mask_dir else None,
                "render": {"samples": self.args.samples, "fine_samples": self.args.fine_samples},
                "scene": {"near": self.near, "far": self.far,
                          "altitude_range": list(self.altitude) if self.altitude else None}}

    def save(self, stream: RayStream | None, empty: bool = False) -> Path:
        path = ckpt.checkpoint_path(self.exp_dir, self.step)
        ckpt.save_atomic(self.state(stream, empty), path)
        return path

    def resume(self, stream: RayStream) -> Path | None:
        path = ckpt.latest_checkpoint(self.exp_dir)
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, self.device)
        if state["dataset"] != dataset_fingerprint(self.dataset) or state["field_config"] != self.field_config:
            raise UserError(f"{path}: checkpoint of another dataset or field; use another --exp_name")
        self.field.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        ckpt.restore_rng(state["rng"], self.generator)
        self.step = int(state["step"])
        return path

    def train_step(self, stream: RayStream) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step. Returns the loss and the fine-pass MSE (device tensors, no sync)."""
        image, pixel, rgb = stream.next_batch()
        origins, dirs = self.cameras.rays(image, pixel)
        near, far = near_far(origins, dirs, self.near, self.far, self.altitude)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = render_rays(self.field, origins, dirs, near, far, image, self.render_config, self.generator)
        self.last_samples = out["samples"]  # device tensor: points shaded this step (benchmarks read it)
        mse = torch.mean((out["rgb"] - rgb) ** 2)
        loss = mse + torch.mean((out["rgb_coarse"] - rgb) ** 2) if "rgb_coarse" in out else mse
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        a = self.args
        if a.field == "hash" and self.step >= a.occupancy_warmup and self.step % a.occupancy_interval == 0:
            self.field.update_occupancy(self.occupancy_threshold, self.generator)
        return loss.detach(), mse.detach()

    def run(self) -> Path:
        """Train to `train_iterations`, resuming if checkpoints exist. Returns the final checkpoint."""
        a = self.args
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        stream = self.prepare_data()
        if stream is None:
            print(f"warning: cell {self.mask_dir} has no rays; writing an empty checkpoint", file=sys.stderr)
            return self.save(None, empty=True)
        last_good = self.resume(stream)
        log = Logger(self.exp_dir)
        bar = tqdm(total=a.train_iterations, initial=self.step, disable=a.no_progress, desc="train")
        first_bad = torch.tensor(-1, device=self.device)
        t0, rays0 = time.perf_counter(), 0
        kill_at = int(os.environ.get(KILL_HOOK, "-1"))
        while self.step < a.train_iterations:
            loss, mse = self.train_step(stream)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), self.step, first_bad)
            rays0 += a.batch_size
            bar.update(1)
            if self.step == kill_at:
                os._exit(3)
            at_ckpt = self.step % a.ckpt_interval == 0 or self.step == a.train_iterations
            if self.step % a.log_interval == 0 or at_ckpt:
                if int(first_bad) >= 0:
                    raise UserError(f"non-finite loss at step {int(first_bad)}; stopped, last good checkpoint: "
                                    f"{last_good or 'none'} (likely cause: --lr too high for this scene)")
                rate = rays0 / (time.perf_counter() - t0)
                psnr = -10 * math.log10(max(float(mse), 1e-10))
                log.scalars(self.step, loss=float(loss), psnr=psnr, lr=self.lr_at(self.step), rays_per_s=rate)
                bar.set_postfix(psnr=f"{psnr:.2f}", rays_s=f"{rate:,.0f}")
                t0, rays0 = time.perf_counter(), 0
            if at_ckpt:
                last_good = self.save(stream)
            if self.step % a.val_interval == 0 or self.step == a.train_iterations:
                metrics = validate(self, self.step)
                log.scalars(self.step, **metrics)
        bar.close()
        log.close()
        return last_good


class Logger:
    """Scalars to `log.jsonl` always, and to TensorBoard when it is installed."""

    def __init__(self, exp_dir: Path) -> None:
        self.file = open(exp_dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(exp_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def scalars(self, step: int, **values: float) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()

