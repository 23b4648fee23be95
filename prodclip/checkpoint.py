"""Orbax checkpoints of the train state, plus the resolved config beside them."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings, when the leaves have them) for a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def manager(workdir: str | pathlib.Path, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mgr: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores `step` (default: latest) onto the structure/shardings of `target`."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    out = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(target)), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def write_config(workdir: str | pathlib.Path, config) -> None:
    path = pathlib.Path(workdir) / "config.json"
    path.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
