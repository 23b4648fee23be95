"""Metrics to JSONL (one object per line) and TensorBoard event files, in the workdir."""

from __future__ import annotations

import json
import pathlib
import time

import jax


class MetricsWriter:
    """Writes `{"step": s, "time": t, name: value, ...}` lines to workdir/metrics.jsonl and TB events.

    Only process 0 writes, so a multi-host run logs once.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name.replace("@", "_at_"), value, step)  # TB tag names allow no '@'

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
