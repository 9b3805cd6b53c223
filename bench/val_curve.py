"""Val PSNR against training steps for one cell, under named option variants: where quality peaks, whether it
falls after, and what each variant costs in speed. Also the scene bounds each run trains in.

    python bench/val_curve.py --preset oblique --steps 250 500 1000 2000 4000 --variant default= \
        --variant affine=--affine_appearance --variant "sh0=--sh_degree 0"

Val PSNR is taken on a fixed sample of the cell's val pixels, right halves only (never trained on), as
bench/train_speed.py does, beside a sample of the pixels training fits; rays/s and samples/ray over the training
steps only (evaluation excluded). At the last step both samples' PSNR is split by where the field puts each pixel's
surface (foreground box, beyond it, none: transparent), and with `--truth` the held-out one by the preset's true
depth (sky or surface; the surfaces' rendered opacity; floaters in front of them). `--warmup_steps` keeps kernel
compilation out of every variant's seconds; `--resume` lets a curve outlast one device call (rerun the same
command); `--json_out`, rewritten after every point, feeds bench/plot_curves.py; `--seeds` runs every variant at
each seed and tabulates their spread; `--target_psnr` adds when each curve first reaches a val PSNR.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, cell_args, ensure_city, ensure_partition  # noqa: E402
from train_speed import render_sample, sync, val_pixels, val_psnr  # noqa: E402

from mega_nerf.cli.train import config_from_argv  # noqa: E402
from mega_nerf.data.dataset import STRICT  # noqa: E402
from mega_nerf.errors import run_cli  # noqa: E402
from mega_nerf.io import write_json  # noqa: E402
from mega_nerf.synthetic.surface import depth_map  # noqa: E402
from mega_nerf.training.trainer import Trainer  # noqa: E402


def bounds_ratio(trainer: Trainer, dataset: Path) -> float | None:
    """The field box's horizontal extent over the synthetic town's (scene.json), the larger of y and z."""
    summary = json.loads((dataset / "scene.json").read_text())
    if "town" not in summary:
        return None
    lo, hi = trainer.field.box_min.tolist(), trainer.field.box_max.tolist()
    town_lo, town_hi = summary["town"]["min"], summary["town"]["max"]
    return max((hi[a] - lo[a]) / (town_hi[a] - town_lo[a]) for a in (1, 2))


def nearest_train_appearance(trainer: Trainer) -> torch.Tensor:
    """(I,) per image index: a val image's nearest training image (camera centres), others themselves. Rendering
    val pixels with it tells appearance embeddings fitted to val left halves from the scene itself."""
    index = torch.arange(len(trainer.dataset.images))
    for meta in trainer.dataset.val:  # the strict protocol's choice of appearance
        index[meta.index] = trainer.dataset.appearance_for(meta, STRICT)
    return index


def embedding_move(trainer: Trainer, before: torch.Tensor) -> tuple[float | None, float | None]:
    """How far the val and the train images' appearance embeddings moved since `before` (a copy of the table): the
    root mean square change per dimension of each group's rows that moved (the rows of images with no ray in the
    cell never do); None for a group with none. An embedding fitted to half an image that keeps moving while the
    field has settled is the drift that lowers its right half's PSNR (bench/RESULTS.md, ninth and eleventh
    sessions)."""
    change = (trainer.field.appearance.weight.detach() - before).square().sum(1)  # (I,) per row
    is_val = torch.zeros(len(change), dtype=torch.bool, device=change.device)
    is_val[[m.index for m in trainer.dataset.val]] = True

    def rms(rows: torch.Tensor) -> float | None:
        rows = rows & (change > 0)
        return float((change[rows].mean() / before.shape[1]).sqrt()) if rows.any() else None
    return rms(is_val), rms(~is_val)


def ema_psnr(trainer: Trainer, ema: torch.Tensor, sample: tuple[torch.Tensor, ...]) -> float:
    """val_psnr with the appearance table swapped for `ema` (a running average of it), then restored bit for bit:
    whether averaging the embeddings over recent steps removes the val embeddings' drift."""
    weight = trainer.field.appearance.weight
    with torch.no_grad():
        kept = weight.detach().clone()
        weight.copy_(ema)
        try:
            return val_psnr(trainer, sample)
        finally:
            weight.copy_(kept)


def psnr_where(error: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR of the per-pixel squared errors (N,) where `mask` (N,) holds; nan where it holds nowhere."""
    return -10 * math.log10(float(error[mask].mean())) if mask.any() else float("nan")


Rendered = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]  # render_sample's output


def depth_and_error(rendered: Rendered) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of a rendered sample (N,): the depth of its rendered surface (the expected depth over the
    opacity) and its squared colour error (mean over the channels)."""
    out, rgb, _, _ = rendered
    return out["depth"] / out["opacity"].clamp_min(1e-6), ((out["rgb"] - rgb) ** 2).mean(-1)


def region_psnr(trainer: Trainer, rendered: Rendered) -> dict[str, tuple[float, float]]:
    """Where the error of a rendered pixel sample (render_sample's output) lies, by where the trained field puts
    each pixel's surface: inside the foreground box, beyond it (the contracted far world), or nowhere (opacity
    under 1/2: the background shows, which is the sky or ground the field left transparent; --truth tells them
    apart). Per region: (share of the pixels, PSNR)."""
    out, _, origins, dirs = rendered
    exit_t = trainer.field.foreground_exit(origins, dirs)
    depth, error = depth_and_error(rendered)
    clear = out["opacity"] < 0.5
    beyond = ~clear & (depth > exit_t) if exit_t is not None else torch.zeros_like(clear)
    regions = {"foreground": ~clear & ~beyond, "beyond": beyond, "transparent": clear}
    return {name: (float(m.float().mean()), psnr_where(error, m)) for name, m in regions.items()}


def true_depth(trainer: Trainer, sample: tuple[torch.Tensor, ...], dataset: Path) -> torch.Tensor:
    """(N,) the generator's depth of each sampled pixel (inf: sky), from the preset's depth maps."""
    image, pixel = sample[0], sample[1]
    depth = torch.empty(len(image))
    for meta in trainer.dataset.images:
        rows = image == meta.index
        if rows.any():
            depth[rows] = depth_map(dataset, meta).float()[pixel[rows]]
    return depth


def truth_split(rendered: Rendered, depth: torch.Tensor) -> dict[str, float]:
    """A rendered sample's error (render_sample's output) split by its true depth (true_depth): the true sky's
    share and PSNR; on true surfaces the PSNR, the mean rendered opacity (under 1: the background shows through the
    ground) and the share rendered in front of the surface (depth under 0.7x the true one: floaters)."""
    opacity = rendered[0]["opacity"]
    surface_depth, error = depth_and_error(rendered)
    depth = depth.to(error.device)
    sky = ~torch.isfinite(depth)
    surface = ~sky
    return {"sky_share": float(sky.float().mean()), "sky_psnr": psnr_where(error, sky),
            "surface_psnr": psnr_where(error, surface),
            "surface_opacity": float(opacity[surface].mean()) if surface.any() else float("nan"),
            "in_front": float((surface & (surface_depth < 0.7 * depth)).float().sum() / surface.sum().clamp_min(1))}


def run(base: list[str], steps: list[int], sample_count: int, dataset: Path, resume: bool = False,
        on_point: Callable[[dict], None] | None = None, ema_decay: float | None = None, truth: bool = False
        ) -> dict:
    """Train to each of `steps` and score there, handing the curve so far (and the embeddings' moves,
    embedding_move) to `on_point` after each point. With `resume`, a variant continues from the checkpoint and
    curve it saved at its last point (a curve longer than one device call takes: rerun the same command). With
    `ema_decay`, a running average of the appearance table (updated after every step, started at the first) is
    scored too (`ema_psnr`); its scores are kept for --resume, the table itself is not: a resumed run restarts the
    average from the checkpoint's table. With `truth`, the last point is also split by the preset's true depth
    (truth_split)."""
    trainer = Trainer(config_from_argv(base))
    stream = trainer.prepare_data()
    sample = val_pixels(trainer, sample_count)
    fitted = val_pixels(trainer, sample_count, trained=True)
    neighbour = nearest_train_appearance(trainer)
    depth = true_depth(trainer, sample, dataset) if truth else None
    progress = trainer.exp_dir / "curve.json"
    curve, moves, averaged, trained, done, shaded = [], [], [], 0.0, 0, 0
    if resume and progress.is_file() and trainer.resume(stream) is not None:
        saved = json.loads(progress.read_text())
        curve, trained, shaded = [tuple(point) for point in saved["curve"]], saved["trained"], saved["shaded"]
        moves = [tuple(move) for move in saved.get("embedding_moves", [])]
        averaged = [tuple(point) for point in saved.get("ema_psnr", [])]
        done = trainer.step
        print(f"resumed at step {done} ({trained:.1f} s)", flush=True)
        if on_point is not None:  # --json_out holds the curve so far even if nothing more is trained
            on_point({"curve": curve, "embedding_moves": moves, "ema_psnr": averaged})
    table = trainer.field.appearance.weight.detach().clone()
    ema = table.clone()
    for target in (s for s in steps if s > done):
        sync()
        start = time.perf_counter()
        while done < target:
            trainer.train_step(stream)
            if ema_decay is not None:
                ema.lerp_(trainer.field.appearance.weight.detach(), 1 - ema_decay)
            shaded += int(trainer.last_samples) if done % 50 == 0 else 0
            done += 1
        sync()
        trained += time.perf_counter() - start
        curve.append((done, round(trained, 1), round(val_psnr(trainer, sample), 3),
                      round(val_psnr(trainer, sample, neighbour), 3), round(val_psnr(trainer, fitted), 3)))
        moves.append((done, *(None if m is None else round(m, 5) for m in embedding_move(trainer, table))))
        table = trainer.field.appearance.weight.detach().clone()
        if ema_decay is not None:
            averaged.append((done, round(ema_psnr(trainer, ema, sample), 3)))
        val_move, train_move = ("n/a" if m is None else f"{m:.4f}" for m in moves[-1][1:])
        print(f"step {done} ({trained:.1f} s): val PSNR {curve[-1][2]:.2f} dB, with the nearest train image's "
              f"appearance {curve[-1][3]:.2f} dB; trained pixels {curve[-1][4]:.2f} dB; embeddings moved "
              f"{val_move} (val), {train_move} (train) since the last point"
              + (f"; with the averaged embeddings {averaged[-1][1]:.2f} dB" if ema_decay is not None else ""),
              flush=True)
        if on_point is not None:
            on_point({"curve": curve, "embedding_moves": moves, "ema_psnr": averaged})
        if resume:
            trainer.save(stream)
            write_json(progress, {"curve": curve, "embedding_moves": moves, "ema_psnr": averaged, "trained": trained,
                                  "shaded": shaded})
    held_out = render_sample(trainer, sample)
    regions = {"held-out": region_psnr(trainer, held_out),
               "fitted": region_psnr(trainer, render_sample(trainer, fitted))}
    for name, split in regions.items():
        print(f"{name} pixels at step {done}: " + ", ".join(f"{r} {share:.0%} {psnr:.2f} dB"
                                                           for r, (share, psnr) in split.items() if share),
              flush=True)
    split = truth_split(held_out, depth) if depth is not None else None
    if split is not None:
        print(f"held-out pixels at step {done} by true depth: sky {split['sky_share']:.1%} {split['sky_psnr']:.2f} dB; "
              f"surfaces {split['surface_psnr']:.2f} dB, mean opacity {split['surface_opacity']:.3f}, "
              f"{split['in_front']:.1%} rendered in front", flush=True)
    batch = trainer.config.batch_size
    return {"curve": curve, "embedding_moves": moves, "ema_psnr": averaged, "regions": regions, "truth": split,
            "rays_per_s": done * batch / trained,
            "samples_per_ray": shaded / (len(range(0, done, 50)) * batch),
            "bounds_ratio": bounds_ratio(trainer, dataset),
            "box": [trainer.field.box_min.tolist(), trainer.field.box_max.tolist()]}


def time_to(curve: list[tuple], target: float) -> tuple[float, float] | None:
    """(training seconds, steps) where a curve's val PSNR first reaches `target`, interpolated linearly between
    its points (the first point's, an upper bound, if that already reaches it); None if it never does."""
    if curve and curve[0][2] >= target:
        return curve[0][1], curve[0][0]
    for (s0, t0, p0, *_), (s1, t1, p1, *_) in pairwise(curve):
        if p0 < target <= p1:
            f = (target - p0) / (p1 - p0)
            return t0 + f * (t1 - t0), s0 + f * (s1 - s0)
    return None


def table(results: dict[str, dict], target: float | None = None) -> str:
    truth = any(r.get("truth") for r in results.values())  # --truth: one more column
    rows = ["| variant | rays/s | samples/ray | box / town | val PSNR by step (training seconds; in brackets: with "
            "the nearest train image's appearance; then the trained pixels' PSNR) | best | last - best |"
            + (f" to {target:.2f} dB |" if target is not None else "")
            + (" last point by true depth: sky share, PSNR; surfaces PSNR, mean opacity, in front |" if truth else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if target is not None else "") + ("---|" if truth else "")]
    for name, r in results.items():
        curve = ", ".join(f"{s}: {p:.2f} [{q:.2f}; {f:.2f}] ({t:.0f} s)" for s, t, p, q, f in r["curve"])
        best = max(p for _, _, p, _, _ in r["curve"])
        ratio = "n/a" if r["bounds_ratio"] is None else f"{r['bounds_ratio']:.2f}"
        split = r.get("truth")
        depth = "" if not truth else " n/a |" if not split else (
            f" {split['sky_share']:.1%}, {split['sky_psnr']:.2f} dB; {split['surface_psnr']:.2f} dB, "
            f"{split['surface_opacity']:.3f}, {split['in_front']:.1%} |")
        reached = None if target is None else time_to(r["curve"], target)
        to = "" if target is None else " not reached |" if reached is None else \
            f" {reached[0]:.1f} s ({reached[1]:,.0f} steps) |"
        rows.append(f"| {name} | {r['rays_per_s']:,.0f} | {r['samples_per_ray']:.1f} | {ratio} | {curve} | "
                    f"{best:.2f} | {r['curve'][-1][2] - best:+.2f} |{to}{depth}")
    return "\n".join(rows)


def spread(results: dict[str, dict], variants: list[str], seeds: list[int]) -> str:
    """Per variant, its runs over `seeds` (results named NAME@SEED): the last point's val PSNR of each, their mean
    and the worst fall from a run's best. One run differs from the next by up to 1 dB on `oblique` (GPU atomics,
    amplified by the val embeddings: bench/RESULTS.md, ninth session), so a variant is judged on several."""
    rows = ["| variant | seeds | last val PSNR of each | mean | worst last - best |", "|---|---|---|---|---|"]
    for name in variants:
        ran = [seed for seed in seeds if f"{name}@{seed}" in results]
        if not ran:
            continue
        curves = [results[f"{name}@{seed}"]["curve"] for seed in ran]
        last = [c[-1][2] for c in curves]
        worst = min(c[-1][2] - max(p for _, _, p, _, _ in c) for c in curves)
        rows.append(f"| {name} | {' '.join(map(str, ran))} | {', '.join(f'{v:.2f}' for v in last)} | "
                    f"{sum(last) / len(last):.2f} | {worst:+.2f} |")
    return "\n".join(rows)


def variant(text: str) -> tuple[str, str]:
    """--variant's NAME=OPTIONS as (name, options). One argument, not two: argparse would take a second one that
    starts with '-' (as "--affine_appearance") for an option of this script."""
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=OPTIONS (e.g. default= or sh0='--sh_degree 0'), got {text!r}")
    return name, options


def decay(text: str) -> float:
    """--embedding_ema's DECAY: a number in [0, 1) (the average keeps that share of itself at every step)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {text}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="oblique")
    p.add_argument("--steps", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    p.add_argument("--variant", type=variant, action="append", metavar="NAME=OPTIONS",
                   help="a named set of training options (repeatable); default: one run with the defaults")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run each variant once per seed (as NAME@SEED) and add a table of their spread; default: "
                        "one run at the trainer's seed")
    p.add_argument("--cell", type=int, default=0)
    p.add_argument("--grid_dim", type=int, nargs=2, default=[2, 2])
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--val_rays", type=int, default=16384)
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="steps of an untimed run first, so that no variant's times include kernel compilation")
    p.add_argument("--resume", action="store_true",
                   help="save a checkpoint at each point and continue from it when rerun (curves longer than a call)")
    p.add_argument("--embedding_ema", type=decay, default=None, metavar="DECAY",
                   help="also score val PSNR with a running average of the appearance embeddings (e.g. 0.999)")
    p.add_argument("--truth", action="store_true",
                   help="also split the last point's held-out pixels by the preset's true depth: sky, surfaces, "
                        "their rendered opacity and what lies in front of them")
    p.add_argument("--target_psnr", type=float, default=None, metavar="DB",
                   help="also tabulate the training seconds and steps at which each curve first reaches this val "
                        "PSNR, interpolated between points (e.g. 24.28: mlp's 8-minute value on oblique)")
    p.add_argument("--json_out", type=Path, default=None)
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    dataset = ensure_city(args.preset, args.work, depth=args.truth)
    masks = ensure_partition(dataset, args.work, tuple(args.grid_dim))
    results = {}

    def save(partial: dict) -> None:
        """--json_out after every point, so a run cut short by its call's time keeps what it measured."""
        if args.json_out:
            write_json(args.json_out, partial)
    if args.warmup_steps:
        warm = Trainer(config_from_argv(cell_args(dataset, masks, args.work, args.cell, "curve-warmup")))
        stream = warm.prepare_data()
        for _ in range(args.warmup_steps):
            warm.train_step(stream)
        del warm, stream
    variants = args.variant or [("default", "")]
    runs = variants if args.seeds is None else \
        [(f"{name}@{seed}", f"{options} --seed {seed}") for name, options in variants for seed in args.seeds]
    for name, options in runs:
        base = [*cell_args(dataset, masks, args.work, args.cell, f"curve-{name}"), *shlex.split(options)]
        print(f"== {name}: {options}", flush=True)
        results[name] = run(base, args.steps, args.val_rays, dataset, args.resume,
                            lambda point, name=name: save({**results, name: point}), args.embedding_ema, args.truth)
        save(results)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    text = table(results, args.target_psnr)
    if args.seeds is not None:
        seeds = spread(results, [name for name, _ in variants], args.seeds)
        print(seeds)
        text += "\n\n" + seeds
    append_results(args.results, f"Val PSNR against steps, {args.preset} preset, cell {args.cell}",
                   "python " + shlex.join(sys.argv), text)


if __name__ == "__main__":
    run_cli(main)
