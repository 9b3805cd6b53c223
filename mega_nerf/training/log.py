"""Training scalars: `log.jsonl` always (the plain-text record), TensorBoard when it is installed."""
from __future__ import annotations

import json
from pathlib import Path


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

    def record(self, **values: object) -> None:
        """One line of plain values that are not per-step scalars (e.g. the start-up breakdown)."""
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
