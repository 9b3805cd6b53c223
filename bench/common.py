"""Shared set-up for the GPU benchmarks: the synthetic scene, its partition, and where results go."""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mega_nerf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CODE = ("mega_nerf", "scripts", "bench", "tests")  # the repository's Python folders


def ensure_city(preset: str, work: Path, depth: bool = False) -> Path:
    """Generate the synthetic preset under `work` once (with its depth maps if `depth`: a missing one is then a
    one-line error naming what to delete); return the dataset path."""
    from mega_nerf.synthetic import generate_city
    path = work / f"{preset}-data"
    if not (path / "coordinates.pt").exists():
        generate_city(path, preset=preset, write_depth=depth, progress=False)
    elif depth and not (path / "depth").is_dir():
        raise UserError(f"{path} was generated without depth maps: delete it to generate it with them")
    return path


PARTITION = ROOT / "scripts/create_cluster_masks.py"


def partition_args(dataset: Path, output: Path, grid: Sequence[int | str], ray_samples: int | None = None
                   ) -> list[str]:
    """PARTITION's options: the exact rule, or Mega-NeRF's sampled one with `ray_samples` points per ray."""
    sampled = ["--ray_samples", str(ray_samples)] if ray_samples else []
    return ["--config_file", str(dataset / "config.yaml"), "--dataset_path", str(dataset), "--output", str(output),
            "--grid_dim", *map(str, grid), *sampled, "--no_progress"]


def ensure_partition(dataset: Path, work: Path, grid: tuple[int, int]) -> Path:
    """Run create_cluster_masks once (the exact rule); return the mask directory."""
    masks = work / f"masks-{grid[0]}x{grid[1]}"
    if not (masks / "params.pt").exists():
        subprocess.run([sys.executable, str(PARTITION), *partition_args(dataset, masks, grid)], check=True)
    return masks


def timed(cmd: list[str], environ: dict[str, str], check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a whole command run from the repository root (process start and exit included), and its
    result; with `check`, a failure ends the benchmark with the command and its stderr's end."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {shlex.join(cmd)}\n{result.stderr[-4000:]}")
    return seconds, result


def cell_args(dataset: Path, masks: Path, work: Path, cell: int, exp_name: str) -> list[str]:
    """The training options that point a run at one cell of a benchmark scene (its chunks kept under `work`)."""
    return ["--config_file", str(dataset / "config.yaml"), "--dataset_path", str(dataset), "--exp_name",
            str(work / exp_name), "--chunk_paths", str(work / f"chunks-{cell}"), "--cluster_mask_path",
            str(masks / str(cell)), "--no_progress"]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def append_results(path: Path, title: str, command: str, table: str) -> None:
    """Append a dated block (device, command, table) to a RESULTS.md-style file."""
    stamp = datetime.date.today().isoformat()
    block = f"\n## {title} ({stamp}, {device_name()})\n\nCommand: `{command}`\n\n{table}\n"
    with open(path, "a") as f:
        f.write(block)
    print(block)


# NVLink multicast stays off in every child process (the device machines' rule), and so do progress bars.
QUIET = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
         "TQDM_DISABLE": "1"}


def bytecode_env(cache: Path | None) -> dict[str, str]:
    """The environment for timed child processes. With `cache`, bytecode is written and read under it
    (PYTHONPYCACHEPREFIX, PYTHONDONTWRITEBYTECODE dropped), compiled there first for the standard library, the
    installed packages and the repository, so start-up is timed as on a normal install: pip writes bytecode, but
    the device machines set PYTHONDONTWRITEBYTECODE and ship torch without it, so each of their processes compiles
    torch from source. None: the inherited environment."""
    environ = dict(os.environ)
    if cache is None:
        return environ
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    environ["PYTHONPYCACHEPREFIX"] = str(cache.resolve())
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["purelib"], paths["platlib"], *(str(ROOT / d) for d in CODE),
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    # Some files never compile (other Python versions' syntax in vendored tests): compileall's status is not used;
    # torch's own bytecode is checked instead. Timestamps, not hashes: SOURCE_DATE_EPOCH would choose hashes.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "timestamp",
                    *sorted(roots)], env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    package = Path(torch.__file__).resolve().parent  # under a prefix: <prefix>/<source folder>/<name>.<tag>.pyc
    if not any((cache.resolve() / package.relative_to(package.anchor)).glob("__init__.*.pyc")):
        raise SystemExit(f"--bytecode_cache {cache}: torch's bytecode was not written there")
    return environ


def profiled(run: Callable[[], object], record_shapes: bool = False
             ) -> tuple[torch.profiler.profile, float, float]:
    """`run` once under torch.profiler (CPU and CUDA activities): the profile, its wall seconds (up to the GPU's
    last kernel; the profiler's overhead included) and the seconds the GPU was busy (the kernels' self time)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return prof, wall, sum(e.self_device_time_total for e in kernels) / 1e6
