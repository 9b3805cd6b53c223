"""Training scalars: `log.jsonl` always (the plain-text record), TensorBoard when it is installed."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

from mega_nerf.io import atomic_write, write_error


def _kept(line: str, start_step: int) -> bool:
    """Whether a line of an earlier run stays: a whole JSON object, either a record (no step) or a step's
    scalars up to `start_step`; a line a killed run left half-written does not."""
    try:
        values = json.loads(line)
        return isinstance(values, dict) and int(values.get("step", 0)) <= start_step
    except (ValueError, TypeError):
        return False


class Logger:
    """Scalars to `log.jsonl` always, and to TensorBoard when it is installed."""

    def __init__(self, exp_dir: Path, start_step: int = 0) -> None:
        """start_step: the step the run starts (or resumes) from. What a killed run logged after it (the steps
        between its last checkpoint and the kill) is dropped, so that each step appears once; records stay."""
        self.path = exp_dir / "log.jsonl"
        if self.path.is_file():
            lines = self.path.read_text(errors="replace").splitlines()
            kept = [line for line in lines if _kept(line, start_step)]
            atomic_write(self.path, "".join(line + "\n" for line in kept).encode())
        self.file = open(self.path, "a")
        self.exp_dir, self.start_step = exp_dir, start_step
        if start_step:
            self.tb  # noqa: B018 (made now: its purge drops what the killed run logged, even if this one logs nothing)

    @functools.cached_property
    def tb(self) -> Any:
        """TensorBoard's SummaryWriter, made at the first scalars of a fresh run, so that importing TensorBoard (a
        tenth of a second) is not part of the time to the first step; None when TensorBoard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        # TensorBoard hides events at and after purge_step; the step resumed from keeps its own, as log.jsonl does.
        return SummaryWriter(str(self.exp_dir / "tensorboard"), purge_step=self.start_step + 1 if self.start_step
                             else None)

    def _write(self, values: dict) -> None:
        try:
            self.file.write(json.dumps(values) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(self.path, e) from None

    def scalars(self, step: int, **values: float) -> None:
        self._write({"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def record(self, **values: object) -> None:
        """One line of plain values that are not per-step scalars (e.g. the start-up breakdown)."""
        self._write(values)

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # the error in flight says what went wrong (e.g. log.jsonl's full disk)
            self.close()

    def close(self) -> None:
        """Close log.jsonl and TensorBoard's writer, its file and its thread (a cell of train_cells.py that stops
        on an error would otherwise leave both open in a process that goes on to the next cell)."""
        try:
            self.file.close()
        finally:
            if self.__dict__.get("tb") is not None:  # made (cached_property stores it in __dict__) and installed
                self.tb.close()
