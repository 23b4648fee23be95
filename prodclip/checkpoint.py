"""Orbax checkpoints: periodic async saves, verified resume, config checks, inference export.

A checkpoint of step s is one orbax step directory, `workdir/checkpoints/<s>/`, holding
    state   {step, params, opt_state} (StandardSave; restored onto the target's shardings,
            so a checkpoint written on 8 devices loads on 1 and the reverse)
    data    the grain train iterator's position (one JSON file per process)
    meta    JSON: step, the resolved config, and a digest of every state leaf
The train step draws no random numbers (augmentation randomness lives in the grain
iterator's state), so there is no separate RNG state to save.

Digests are exact integer checksums (float bits as uint32, position-weighted, summed
mod 2**32), computed by jit on whatever mesh holds the state; they do not depend on
the sharding, so they verify a restore onto any device count. A checkpoint whose files
are missing, unreadable or whose restored values do not match its digests is skipped with
a warning and the previous one is tried; once a valid one is restored, the damaged newer ones
are moved to `workdir/damaged_checkpoints/step_<s>/` (one copy per step). When every checkpoint
is damaged nothing is moved and training refuses to start (NoValidCheckpoint) unless it is
allowed to start afresh (`prodclip train --allow-fresh-start`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from prodclip import errors, trees
from prodclip.config import ConfigError, base_config
from prodclip.faults import NonFiniteError

log = logging.getLogger("prodclip")

# Config fields that may change between a run and its resumption: they change neither
# the model nor the data a step sees. Entries ending in '.' cover a whole group.
RESUMABLE_CHANGES = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.progress_bar",
    "data.num_workers", "data.prefetch", "data.eval_splits", "checkpoint.", "eval.",
)


class IncompatibleWorkdir(ConfigError):
    """The workdir holds checkpoints of a run whose model or data config differs."""


class NoValidCheckpoint(errors.CheckpointError):
    """Checkpoints exist but every one of them is damaged."""


DAMAGED_DIR = "damaged_checkpoints"
FRESH_START_FLAG = "--allow-fresh-start"


# ----------------------------------------------------------------------------- digests


def _as_words(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as a flat uint32 vector (exact, whatever the dtype)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _digest_leaves(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """([n] uint32 checksums, [n] bool all-finite) for n leaves, on the leaves' own devices."""
    sums, finite = [], []
    for x in leaves:
        words = _as_words(x)
        weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        sums.append(jnp.sum(words * weights, dtype=jnp.uint32))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
    return jnp.stack(sums), jnp.stack(finite)


def digests(tree: Any) -> tuple[dict[str, int], list[str]]:
    """(leaf path -> uint32 checksum, paths of leaves holding NaN/Inf). One host sync."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0])
    sums, finite = jax.device_get(_digest_leaves(list(leaves)))
    names = [jax.tree_util.keystr(p) for p in paths]
    return {n: int(s) for n, s in zip(names, sums)}, [n for n, ok in zip(names, finite) if not ok]


def _shapes(tree: Any) -> dict[str, list]:
    """Leaf path -> [shape, dtype name], as stored in a checkpoint's meta."""
    return {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)]
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings, when the leaves have them) for a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


# ----------------------------------------------------------------------------- config


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def restore_params(workdir: str | pathlib.Path, like: dict) -> dict:
    """The latest checkpoint's params from another run's workdir, in the structure of `like`.

    Every parameter of `like` must be present with the same shape; the error names the
    first ones that are not. Dtypes follow `like`.
    """
    mgr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints")
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory} to initialise from")
    saved = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    if "params" not in saved:
        raise ValueError(f"{mgr.directory} step {step}: no 'params' in the saved state (keys: {sorted(saved)})")
    flat_saved = {trees.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved["params"])}
    flat_like = {trees.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(like)}
    missing = sorted(set(flat_like) - set(flat_saved))
    unexpected = sorted(set(flat_saved) - set(flat_like))
    wrong = [f"{k} {tuple(flat_saved[k].shape)} (model: {tuple(v.shape)})"
             for k, v in flat_like.items() if k in flat_saved and flat_saved[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {mgr.directory} step {step} does not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jax.numpy.asarray(flat_saved[trees.path_str(p)], dtype=v.dtype), like)


def write_config(workdir: str | pathlib.Path, config) -> None:
    path = pathlib.Path(workdir) / "config.json"
    path.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_fields(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for each field that changes the model or the data."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        free = any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUMABLE_CHANGES)
        if not free and old.get(key, "<absent>") != new.get(key, "<absent>"):
            changes.append((key, old.get(key, "<absent>"), new.get(key, "<absent>")))
    return changes


def _fill_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with every key it lacks taken from `defaults` (nested dicts)."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _fill_defaults(out[key], value)
    return out


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
    """Steps with a committed checkpoint directory (in-progress `*.orbax-checkpoint-tmp*` excluded)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def damaged_steps(workdir: str | pathlib.Path) -> list[str]:
    """Names of the checkpoints moved aside as damaged (workdir/damaged_checkpoints/*)."""
    directory = pathlib.Path(workdir) / DAMAGED_DIR
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def check_loadable(workdir: str | pathlib.Path) -> None:
    """Raises CheckpointError unless `workdir` is an export or holds a checkpoint; writes nothing."""
    workdir = pathlib.Path(workdir)
    if (workdir / EXPORT_MARKER).exists() or checkpoint_steps(workdir):
        return
    if not workdir.is_dir():
        raise errors.CheckpointError(f"{workdir} does not exist; give the --workdir of a trained run or an export")
    damaged = damaged_steps(workdir)
    extra = f" (its damaged checkpoints are in {workdir / DAMAGED_DIR}: {', '.join(damaged)})" if damaged else ""
    raise errors.CheckpointError(f"no checkpoint in {workdir / 'checkpoints'} and no {EXPORT_MARKER} in {workdir}"
                                 f"{extra}; give the --workdir of a trained run or an export")


def check_workdir(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, *,
                  allow_config_change: bool = False, allow_fresh_start: bool = False) -> None:
    """Refuses to resume checkpoints in `workdir` written with a different model or data config.

    Raises IncompatibleWorkdir naming every differing field, unless `allow_config_change`.
    A workdir without checkpoints starts afresh, whatever its config.json says, except one whose
    checkpoints were all moved aside as damaged: that raises NoValidCheckpoint unless
    `allow_fresh_start`, so that a run never silently starts over.
    """
    workdir = pathlib.Path(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        damaged = damaged_steps(workdir)
        if damaged and not allow_fresh_start:
            raise NoValidCheckpoint(
                f"{workdir} has no valid checkpoint; its damaged ones are in {workdir / DAMAGED_DIR}: "
                f"{', '.join(damaged)}. Rerun with {FRESH_START_FLAG} to train this workdir again from step 0, "
                "or use a new --workdir")
        return
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        raise IncompatibleWorkdir(f"{workdir} has checkpoints (steps {steps}) but no config.json to compare with")
    # A field added to prodclip after the run was saved counts as its default (e.g. model.fusion.*).
    saved = _fill_defaults(json.loads(saved_path.read_text()), config_to_dict(base_config()))
    changes = changed_fields(saved, config_to_dict(config))
    if not changes:
        return
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
    if allow_config_change:
        log.warning("resuming %s with a changed config (allowed): %s", workdir, listing)
        return
    raise IncompatibleWorkdir(
        f"{workdir} holds checkpoints of a run with a different config in {len(changes)} field(s) that change "
        f"the model or the data: {listing}. Use a new --workdir, or pass --allow-config-change to resume anyway. "
        f"Fields that may change freely: {', '.join(RESUMABLE_CHANGES)}")


def trim_metrics_log(workdir: str | pathlib.Path, step: int) -> None:
    """Drops metrics.jsonl lines after `step`, which a resumed run writes again."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


# ----------------------------------------------------------------------------- the manager


class Checkpointer:
    """The run's checkpoints: `save` every config.checkpoint.every_steps, `restore` the latest valid one.

    Keeps the last `checkpoint.keep` checkpoints plus the best one by `checkpoint.best_metric`
    (a val metric, e.g. 'val/t2i/R@1', compared by `checkpoint.best_mode`).
    """

    def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict):
        c = config.checkpoint
        self.workdir = pathlib.Path(workdir).absolute()
        self.config = config
        self.every_steps = c.every_steps
        self.best_metric = c.best_metric
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=c.keep)]
        best_fn = None
        if c.best_metric:
            best_fn = lambda metrics: metrics[c.best_metric]  # noqa: E731
            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=c.best_mode == "min", n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=True, best_fn=best_fn, best_mode=c.best_mode, cleanup_tmp_directories=True,
            preservation_policy=policies.AnyPreservationPolicy(keep), enable_async_checkpointing=c.async_save)
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.manager.wait_until_finished()  # a save in flight when the loop stops is still completed

    def should_save(self, step: int, num_steps: int, *, stopping: bool, val_metrics: dict | None) -> bool:
        periodic = self.every_steps > 0 and step % self.every_steps == 0
        return periodic or step == num_steps or stopping or bool(self.best_metric and val_metrics)

    def save(self, step: int, state: Any, data_iterator: Iterator | None, val_metrics: dict | None = None) -> None:
        """Starts an async save of `state` at `step`. Raises NonFiniteError (saving nothing) on NaN/Inf."""
        leaf_digests, non_finite = digests(state)
        if non_finite:
            raise NonFiniteError(f"state at step {step} has NaN/Inf in {', '.join(non_finite[:5])}; not saved, "
                                 f"the last good checkpoint stays {self.manager.latest_step()}")
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({"step": step, "config": config_to_dict(self.config),
                                            "digests": leaf_digests, "shapes": _shapes(state)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_grain_iterator(data_iterator))
        metrics = None
        if self.best_metric and val_metrics:
            metrics = {k if k.startswith("val/") else f"val/{k}": float(v) for k, v in val_metrics.items()}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.best_metric else None

    def restore(self, target: Any, data_iterator: Iterator | None = None,
                step: int | None = None, *, move_damaged: bool = True,
                allow_fresh_start: bool = False) -> tuple[Any, dict] | None:
        """The newest valid checkpoint (or `step`) restored onto `target`'s structure and shardings.

        Returns (state, meta), or None when there is no checkpoint. A damaged checkpoint is
        skipped with a warning and the previous one tried; once one restores, a resuming run
        (`move_damaged`) moves the damaged newer ones aside so that it can save those steps
        again, while read-only users (eval, export) leave the workdir untouched.
        `data_iterator`, if given, is set to the restored position.

        When every checkpoint is damaged, raises NoValidCheckpoint naming them and moves nothing;
        with `allow_fresh_start` (and `move_damaged`) they are moved aside and None is returned.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        problems, damaged = [], []
        for candidate in steps:
            try:
                restored = self._restore_verified(candidate, target, data_iterator)
            except IncompatibleWorkdir:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read back means this checkpoint is unusable
                problems.append(f"step {candidate}: {type(e).__name__}: {str(e)[:300]}")
                damaged.append(candidate)
                log.warning("checkpoint at step %d is damaged (%s); trying the previous one", candidate, problems[-1])
                continue
            if move_damaged:
                for bad in damaged:
                    self._move_aside(bad)
            return restored
        if move_damaged and allow_fresh_start:
            for bad in damaged:
                self._move_aside(bad)
            log.warning("every checkpoint was damaged (steps %s); moved to %s; starting from step 0",
                        ", ".join(map(str, damaged)), self.workdir / DAMAGED_DIR)
            return None
        listing = "; ".join(problems)
        hint = (f" Nothing was moved or deleted. Rerun with {FRESH_START_FLAG} to move them to "
                f"{self.workdir / DAMAGED_DIR} and train again from step 0, or use a new --workdir."
                if move_damaged else " Give another run, or a --step whose checkpoint is intact.")
        raise NoValidCheckpoint(f"every checkpoint in {self.manager.directory} is damaged ({listing}).{hint}")

    def _restore_verified(self, step: int, target: Any, data_iterator: Iterator | None) -> tuple[Any, dict]:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if "shapes" not in meta or "digests" not in meta:
            raise IncompatibleWorkdir(f"the checkpoint of step {step} in {self.manager.directory} was written by an "
                                      "older prodclip (no shapes/digests in its meta); it is left untouched")
        wanted = _shapes(target)
        differ = [f"{k}: saved {v}, now {wanted.get(k)}" for k, v in meta["shapes"].items() if wanted.get(k) != v]
        differ += [f"{k}: not in the checkpoint" for k in wanted.keys() - meta["shapes"].keys()]
        if differ:
            raise IncompatibleWorkdir(f"the checkpoint of step {step} in {self.manager.directory} does not fit "
                                      f"this model: {'; '.join(differ[:5])}")
        items = {"state": ocp.args.StandardRestore(abstract(target))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_grain_iterator(data_iterator))
        state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        restored, _ = digests(state)
        wrong = [k for k, v in meta["digests"].items() if restored.get(k) != v]
        if wrong or meta["step"] != step:
            raise ValueError(f"restored values differ from their saved digests in {', '.join(wrong[:5])}")
        return state, meta

    def _move_aside(self, step: int) -> None:
        """Moves a damaged step out of orbax's view, so a resumed run can save that step again."""
        if jax.process_index() == 0:
            source = pathlib.Path(self.manager.directory) / str(step)
            target = self.workdir / DAMAGED_DIR / f"step_{step}"
            target.parent.mkdir(exist_ok=True)
            if source.exists():
                if target.exists():  # one copy per step: the latest damaged copy replaces an older one
                    shutil.rmtree(target)
                shutil.move(str(source), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"prodclip_move_aside_{step}")
        self.manager.reload()


# ----------------------------------------------------------------------------- export


EXPORT_MARKER = "export.json"


def export(out_dir: str | pathlib.Path, params: Any, config: ml_collections.ConfigDict,
           tokenizer_dir: str | pathlib.Path, step: int) -> pathlib.Path:
    """Writes an inference-only export: params (no optimizer state), config.json, tokenizer/.

    `prodclip eval --workdir OUT` and `load_params` read it like a training workdir.
    """
    out_dir = pathlib.Path(out_dir).absolute()
    if (out_dir / EXPORT_MARKER).exists() or (out_dir / "params").exists():
        raise errors.CheckpointError(f"{out_dir} already holds an export; choose a new --out (nothing was written)")
    out_dir.mkdir(parents=True, exist_ok=True)
    leaf_digests, non_finite = digests(params)
    if non_finite:
        raise NonFiniteError(f"params of step {step} have NaN/Inf in {', '.join(non_finite[:5])}; not exported")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", params)
    write_config(out_dir, config)
    shutil.copytree(tokenizer_dir, out_dir / "tokenizer", dirs_exist_ok=True)
    (out_dir / EXPORT_MARKER).write_text(json.dumps({"step": step, "digests": leaf_digests}, indent=1))
    return out_dir


def load_params(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, target_state: Any,
                step: int | None = None) -> tuple[Any, dict]:
    """(params, meta) from an export dir, or from a training workdir's newest valid checkpoint (or `step`).

    `target_state` is {step, params, opt_state} with the wanted shardings (an export uses
    only its params). Raises errors.CheckpointError when there is nothing to load.
    """
    workdir = pathlib.Path(workdir).absolute()
    marker = workdir / EXPORT_MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(workdir / "params", abstract(target_state["params"]))
        restored, _ = digests(params)
        wrong = [k for k, v in meta["digests"].items() if restored.get(k) != v]
        if wrong:
            raise errors.CheckpointError(f"export {workdir} is damaged: params differ from their digests in {', '.join(wrong[:5])}")
        return params, meta
    restored = Checkpointer(workdir, config).restore(target_state, step=step, move_damaged=False)
    if restored is None:
        raise errors.CheckpointError(f"no checkpoint in {workdir / 'checkpoints'} and no {EXPORT_MARKER} in {workdir}: "
                                     "train this run first, or give the directory of a finished run or export")
    state, meta = restored
    return state["params"], meta


def _grain_iterator(data_iterator: Iterator) -> Iterator:
    """The grain DatasetIterator inside prodclip's ResumableIterator wrapper (or the iterator itself)."""
    return getattr(data_iterator, "iterator", data_iterator)
