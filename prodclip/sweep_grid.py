"""A sweep's grid: its definition, read from an ablation config file, and its expansion into named runs.

An ablation config file (configs/ablations/*.py) defines `get_config()` (the base config) and
`get_sweep()` returning a `Sweep`: axes of overrides, seeds, the metrics to tabulate and the
plots to draw. `expand` turns it into `Run`s, each named "<axis>=<label>__...__seed=<s>" (its
directory name), and `run_config` resolves one run's validated config. Running and reporting a
sweep is prodclip/sweep.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import re
from typing import Any, Mapping, Sequence

from prodclip import config as config_lib, config_checks, config_loading

_LABEL = re.compile(r"^[A-Za-z0-9.+_-]+$")
SEP = "__"


class SweepError(config_lib.ConfigError):
    """A sweep definition, a sweep directory or a run name that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- the definition


@dataclasses.dataclass(frozen=True)
class Axis:
    """One dimension of the grid.

    name: the column name in the results (e.g. "loss", "batch_size").
    values: label -> overrides ({dotted config key: value}); labels are short file-name-safe strings.
    stage: "train" (each value is a training run) or "eval" (each value re-evaluates every
      finished training run, e.g. eval.rerank_k, so no retraining).
    """
    name: str
    values: Mapping[str, Mapping[str, Any]]
    stage: str = "train"


def axis(name: str, values: Sequence[Any] | Mapping[str, Mapping[str, Any]], *, key: str | None = None,
         stage: str = "train") -> Axis:
    """An Axis from a list of values of one config key (`key`, default `name`), or from labelled overrides.

        axis("train.batch_size", [16, 32])                     # labels "16", "32"
        axis("loss", {"softmax": {"loss.name": "softmax"},
                      "sigmoid": {"loss.name": "sigmoid", "model.logit_bias_init": -10.0}})
    """
    if isinstance(values, Mapping):
        labelled = {str(label): dict(overrides) for label, overrides in values.items()}
    else:
        labelled = {str(v): {key or name: v} for v in values}
    return Axis(name=name, values=labelled, stage=stage)


@dataclasses.dataclass(frozen=True)
class Plot:
    """A PNG: `metric` (e.g. "test/t2i/R@1") against axis `x`, one line per variant of the other axes.

    Points are means over seeds with error bars of one sample std. `logx` puts numeric
    labels on a log2 scale.
    """
    x: str
    metric: str
    logx: bool = False


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid: the product of `axes`, each variant trained once per seed in `seeds`.

    seed_keys: the config fields each seed is written to (the default `seed` sets model
      initialisation and the data order; the catalog itself stays the same).
    metrics: flat result names ("<split>/<metric>") shown in results.md and summary.csv;
      results.csv holds every metric.
    """
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    seed_keys: tuple[str, ...] = ("seed",)
    metrics: tuple[str, ...] = ("test/t2i/R@1", "test/i2t/R@1")
    plots: tuple[Plot, ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Sweep":
        return cls(axes=tuple(Axis(a["name"], a["values"], a.get("stage", "train")) for a in data["axes"]),
                   seeds=tuple(data["seeds"]), seed_keys=tuple(data["seed_keys"]), metrics=tuple(data["metrics"]),
                   plots=tuple(Plot(**p) for p in data["plots"]))


def check_sweep(sweep: Sweep, where: str = "sweep") -> None:
    """Raises SweepError for an empty or ambiguous grid (names, labels, stages, plots)."""
    if not sweep.axes:
        raise SweepError(f"{where}: a sweep needs at least one axis")
    if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
        raise SweepError(f"{where}: seeds must be distinct and non-empty, got {sweep.seeds}")
    names = [a.name for a in sweep.axes]
    if len(set(names)) != len(names) or "seed" in names:
        raise SweepError(f"{where}: axis names must be distinct and not 'seed', got {names}")
    for a in sweep.axes:
        if a.stage not in ("train", "eval"):
            raise SweepError(f"{where}: axis {a.name!r} has stage {a.stage!r}; valid: 'train', 'eval'")
        if not a.values:
            raise SweepError(f"{where}: axis {a.name!r} has no values")
        for label, overrides in a.values.items():
            if not _LABEL.match(label) or SEP in label:
                raise SweepError(f"{where}: axis {a.name!r} label {label!r} must match {_LABEL.pattern} "
                                 f"without {SEP!r} (it becomes part of a directory name)")
            if a.stage == "eval" and any(not k.startswith("eval.") for k in overrides):
                raise SweepError(f"{where}: eval axis {a.name!r} value {label!r} may only set eval.* keys, "
                                 f"got {sorted(overrides)}")
    for plot in sweep.plots:
        if plot.x not in names:
            raise SweepError(f"{where}: plot x={plot.x!r} is not an axis; axes: {names}")


def load_sweep_file(path: str | pathlib.Path, arg: str | None = None) -> Sweep:
    """The `get_sweep(arg)` of an ablation config file, checked."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config not found: {path}")
    module = config_loading.load_module(path, "prodclip_sweep")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(); an ablation config defines get_config() and get_sweep()")
    sweep = module.get_sweep(arg) if arg is not None else module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise SweepError(f"{path}: get_sweep() must return prodclip.sweep_grid.Sweep, got {type(sweep).__name__}")
    check_sweep(sweep, str(path))
    return sweep


# ----------------------------------------------------------------------------- grid expansion


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid, and the eval-only variants evaluated on it."""
    name: str
    labels: dict[str, str]  # train axis name -> label
    seed: int
    overrides: dict[str, Any]  # axis overrides and seed fields, applied in this order
    evals: tuple[tuple[str, dict[str, str], dict[str, Any]], ...]  # (name, eval labels, eval overrides)


def _name(labels: Mapping[str, str], seed: int | None = None) -> str:
    parts = [f"{k}={v}" for k, v in labels.items()] + ([f"seed={seed}"] if seed is not None else [])
    return SEP.join(parts)


def expand(sweep: Sweep) -> list[Run]:
    """Every run of the grid, seeds outermost, so the first |variants| runs cover each variant once.

    Later axes override earlier ones where they set the same key; the seed fields come last.
    """
    train_axes = [a for a in sweep.axes if a.stage == "train"]
    eval_axes = [a for a in sweep.axes if a.stage == "eval"]
    evals = []
    for combo in itertools.product(*(a.values.items() for a in eval_axes)):
        labels = {a.name: label for a, (label, _) in zip(eval_axes, combo)}
        overrides = {k: v for _, values in combo for k, v in values.items()}
        evals.append((_name(labels), labels, overrides))
    runs = []
    for seed in sweep.seeds:
        for combo in itertools.product(*(a.values.items() for a in train_axes)):
            labels = {a.name: label for a, (label, _) in zip(train_axes, combo)}
            overrides = {k: v for _, values in combo for k, v in values.items()}
            overrides.update({key: seed for key in sweep.seed_keys})
            runs.append(Run(_name(labels, seed), labels, seed, overrides, tuple(evals) if eval_axes else ()))
    return runs


def run_config(config_path: str | pathlib.Path, config_arg: str | None, cli_overrides: Sequence[str], run: Run,
               eval_overrides: Mapping[str, Any] | None = None):
    """The resolved, validated config of one run: the file's get_config(), the CLI overrides, the run's."""
    config = config_loading.load_config_file(config_path, config_arg)
    config_loading.apply_overrides(config, cli_overrides)
    for key, value in {**run.overrides, **(eval_overrides or {})}.items():
        try:
            config_loading.set_field(config, key, value)
        except config_lib.ConfigError as e:
            raise SweepError(f"run {run.name}: {e}") from e
    try:
        config_checks.validate(config)
    except config_lib.ConfigError as e:
        raise SweepError(f"run {run.name}: {e}") from e
    return config

