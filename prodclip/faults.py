"""Stopping a run cleanly: preemption signals and numerical faults, with their exit codes.

`prodclip train` exits with
    0                 the run finished
    2                 a bad config, or a workdir whose saved config differs (nothing ran)
    EXIT_NONFINITE    a NaN/Inf loss, gradient or state; the last good checkpoint is kept
    EXIT_PREEMPTED    SIGTERM/SIGINT: the current step finished and was saved; rerun to resume
"""

from __future__ import annotations

import signal
import threading
from typing import Sequence

import jax
import numpy as np

from prodclip import errors

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which is what a scheduler should do


class Preempted(errors.ProdclipError):
    """The run stopped on a signal after saving `step`."""

    kind = "preempted"
    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after saving step {step}; rerun the same command to resume")
        self.step = step


class NonFiniteError(errors.ProdclipError, FloatingPointError):
    """A loss, gradient or state value became NaN/Inf; nothing after the last good checkpoint was saved."""

    kind = "numerical fault"
    exit_code = EXIT_NONFINITE


class StopRequests:
    """Turns SIGTERM/SIGINT into a request to stop after the current step.

    Use as a context manager around the loop and ask `requested(step)` once per step.
    With several processes, a stop counts only when JAX's preemption sync point says
    so, so every host stops (and saves) at the same step; a lone SIGINT on one host of
    many is only logged, because that host cannot save alone.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopRequests":
        multihost = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if multihost and sig == signal.SIGTERM:
                    continue  # JAX's preemption notifier owns SIGTERM on multi-host runs
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """True when the run should save `step` and stop; the same answer on every host."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
            reached = False
        if reached:
            self.received = self.received or "SIGTERM"
        return reached


def check_finite(metrics: Sequence[dict], first_step: int, names: Sequence[str] = ("loss", "grad_norm")) -> None:
    """Raises NonFiniteError naming the first step and quantity that is NaN/Inf.

    `metrics[i]` holds the step `first_step + i` scalars (device arrays; fetched here,
    so call this only at log and save points).
    """
    for i, m in enumerate(metrics):
        for name in names:
            value = float(np.asarray(jax.device_get(m[name])))
            if not np.isfinite(value):
                raise NonFiniteError(
                    f"{name} = {value} at step {first_step + i}; stopping. "
                    "No checkpoint was written after the last good one (lower optim.learning_rate, "
                    "check the data, or use model.dtype=float32)")
