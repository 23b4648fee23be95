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


def restore_params(workdir: str | pathlib.Path, like: dict) -> dict:
    """The latest checkpoint's params from another run's workdir, in the structure of `like`.

    Every parameter of `like` must be present with the same shape; the error names the
    first ones that are not. Dtypes follow `like`.
    """
    mgr = manager(workdir)
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory} to initialise from")
    saved = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    if "params" not in saved:
        raise ValueError(f"{mgr.directory} step {step}: no 'params' in the saved state (keys: {sorted(saved)})")
    flat_saved = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved["params"])}
    flat_like = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(like)}
    missing = sorted(set(flat_like) - set(flat_saved))
    unexpected = sorted(set(flat_saved) - set(flat_like))
    wrong = [f"{k} {tuple(flat_saved[k].shape)} (model: {tuple(v.shape)})"
             for k, v in flat_like.items() if k in flat_saved and flat_saved[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {mgr.directory} step {step} does not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jax.numpy.asarray(flat_saved[_path_str(p)], dtype=v.dtype), like)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def write_config(workdir: str | pathlib.Path, config) -> None:
    path = pathlib.Path(workdir) / "config.json"
    path.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
