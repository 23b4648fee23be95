"""Sweeps: a grid of configs x seeds, run one after another (or emitted for a scheduler), then aggregated.

An ablation config file (configs/ablations/*.py) defines `get_config()` (the base
config, which `prodclip train` also accepts) and `get_sweep()` returning a
`sweep_grid.Sweep`: axes of overrides, seeds, the metrics to tabulate and the plots to draw.

    prodclip sweep configs/ablations/loss_batch.py --workdir runs/sweeps/loss_batch
    prodclip sweep configs/ablations/loss_batch.py --workdir DIR --emit-commands   # one line per run
    prodclip sweep --report runs/sweeps/loss_batch                                  # tables + plots again

Layout of a sweep directory:
    sweep.json                the sweep's definition (config path, overrides, axes, metrics, plots, runs)
    runs/<name>/              one ordinary prodclip workdir per training run (config.json, checkpoints/,
                              eval.json, ...), name = "<axis>=<label>__...__seed=<s>"
    runs/<name>/sweep_eval/   one JSON of results per eval-only variant (axes with stage="eval")
    results.csv               one row per run (and eval variant): labels, seed, status, every metric
    summary.csv, results.md   mean, sample std (ddof=1) and count over seeds per variant
    plots/*.png               a metric against an axis, one line per variant of the other axes

A run is finished when its workdir has eval.json. Running the sweep again skips
finished runs and resumes interrupted ones from their newest checkpoint (the
trainer does that by itself). A run that stops on NaN/Inf is recorded as failed
and the sweep goes on; a SIGTERM/SIGINT stops the whole sweep after saving.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import pathlib
import re
import shlex
from typing import Any, Mapping, Sequence

import numpy as np

from prodclip import files
from prodclip.sweep_grid import Plot, Run, Sweep, SweepError, expand, load_sweep_file, run_config

log = logging.getLogger("prodclip")


# ----------------------------------------------------------------------------- running


def run_status(run_dir: pathlib.Path) -> str:
    """finished | failed | interrupted (checkpoints, no results) | pending."""
    from prodclip import checkpoint

    if (run_dir / "eval.json").exists():
        return "finished"
    if (run_dir / "sweep_failed.json").exists():
        return "failed"
    return "interrupted" if checkpoint.checkpoint_steps(run_dir) else "pending"


def _definition(config_path, config_arg, cli_overrides, sweep: Sweep, runs: list[Run]) -> dict:
    config_path = pathlib.Path(config_path).resolve()
    return {"config": str(config_path), "config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(),
            "config_arg": config_arg, "overrides": list(cli_overrides), "sweep": sweep.to_json(),
            "runs": [r.name for r in runs]}


def write_definition(workdir: pathlib.Path, definition: dict) -> None:
    """Writes sweep.json; refuses a directory that holds a different sweep.

    The config file is identified by its contents, so the same sweep run from another
    checkout or clone of the repository resumes; sweep.json files written before the hash
    was recorded are identified by the config's path.
    """
    path = workdir / "sweep.json"
    definition = json.loads(json.dumps(definition))  # tuples as lists, as read back
    if path.exists():
        old = json.loads(path.read_text())
        identity = "config_sha256" if "config_sha256" in old else "config"
        for key in (identity, "config_arg", "overrides", "sweep"):
            if old.get(key) != definition[key]:
                raise SweepError(f"{workdir} holds another sweep ({key} differs: {old.get(key)!r} vs "
                                 f"{definition[key]!r}); use a new --workdir or delete {path}")
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_text(path, json.dumps(definition, indent=2))  # emitted runs may start together


def _check_finished_config(run_dir: pathlib.Path, config, run: Run) -> None:
    from prodclip import checkpoint

    saved = json.loads((run_dir / "config.json").read_text())
    changes = checkpoint.changed_fields(saved, checkpoint.config_to_dict(config))
    if changes:
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
        raise SweepError(f"finished run {run.name} in {run_dir} was trained with another config ({listing}); "
                         "use a new --workdir or delete that run")


def _evaluate_variants(run_dir: pathlib.Path, config_path, config_arg, cli_overrides, run: Run) -> None:
    """Writes sweep_eval/<name>.json for each eval-only variant that has none yet."""
    from prodclip import run as run_lib
    from prodclip.evaluate import suite

    for name, _, overrides in run.evals:
        out = run_dir / "sweep_eval" / f"{name}.json"
        if out.exists():
            continue
        config = run_config(config_path, config_arg, cli_overrides, run, overrides)
        splits = dict.fromkeys(config.data.eval_splits)
        loaded = run_lib.load_run(run_dir, config, splits)
        results = suite.evaluate_all(loaded.graphdef, loaded.params, loaded.sources, loaded.tokenizer, config,
                                     loaded.label_stats)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"step": loaded.meta.get("step"), **results}, indent=2, sort_keys=True))
        log.info("sweep: %s evaluated with %s", run.name, name)


def run_sweep(config_path: str | pathlib.Path, workdir: str | pathlib.Path, *, config_arg: str | None = None,
              cli_overrides: Sequence[str] = (), only: str | None = None) -> dict[str, str]:
    """Runs every unfinished run of the grid in this process, then writes the report.

    only: run just this run name (what an emitted command does; no report, since emitted runs
    may finish at the same time: `prodclip sweep --report DIR` afterwards). Returns run name -> status.
    Raises faults.Preempted when a run was stopped by SIGTERM/SIGINT (rerun to resume).
    """
    from prodclip import faults, train

    workdir = pathlib.Path(workdir)
    sweep = load_sweep_file(config_path, config_arg)
    runs = expand(sweep)
    configs = {r.name: run_config(config_path, config_arg, cli_overrides, r) for r in runs}  # all errors first
    if only is not None and only not in configs:
        raise SweepError(f"no run named {only!r} in this sweep; runs: {', '.join(configs)}")
    write_definition(workdir, _definition(config_path, config_arg, cli_overrides, sweep, runs))
    statuses = {}
    for index, run in enumerate(runs, 1):
        run_dir = workdir / "runs" / run.name
        status = run_status(run_dir)
        if only is not None and run.name != only:
            statuses[run.name] = status
            continue
        prefix = f"sweep [{index}/{len(runs)}] {run.name}"
        ran = status in ("pending", "interrupted")
        if status == "finished":
            _check_finished_config(run_dir, configs[run.name], run)
            log.info("%s: finished, skipped", prefix)
        elif status == "failed":
            log.info("%s: failed before (%s), skipped; delete its directory to retry", prefix,
                     json.loads((run_dir / "sweep_failed.json").read_text())["error"])
        else:
            log.info("%s: %s", prefix, "resuming" if status == "interrupted" else "training")
            try:
                train.train_and_evaluate(configs[run.name], run_dir)
                status = "finished"
            except faults.NonFiniteError as e:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "sweep_failed.json").write_text(json.dumps({"error": str(e)}))
                log.warning("%s: failed: %s", prefix, e)
                status = "failed"
        if status == "finished":
            _evaluate_variants(run_dir, config_path, config_arg, cli_overrides, run)
        statuses[run.name] = status
        if only is None and ran:
            report(workdir)  # partial results stay readable while the sweep goes on
    if only is None:
        report(workdir)
    return statuses


def emit_commands(config_path: str | pathlib.Path, workdir: str | pathlib.Path, *, config_arg: str | None = None,
                  cli_overrides: Sequence[str] = (), program: str = "prodclip") -> list[str]:
    """One shell command per unfinished run (`prodclip sweep ... --run NAME`), after writing sweep.json.

    Each command trains and evaluates one run in its own workdir, so a scheduler may start
    them in any order or all at once; `prodclip sweep --report DIR` aggregates afterwards.
    """
    workdir = pathlib.Path(workdir)
    sweep = load_sweep_file(config_path, config_arg)
    runs = expand(sweep)
    for r in runs:
        run_config(config_path, config_arg, cli_overrides, r)
    write_definition(workdir, _definition(config_path, config_arg, cli_overrides, sweep, runs))
    base = [program, "sweep", str(config_path), "--workdir", str(workdir)]
    if config_arg is not None:
        base += ["--config-arg", config_arg]
    return [shlex.join([*base, "--run", r.name, *cli_overrides]) for r in runs
            if run_status(workdir / "runs" / r.name) != "finished"]


# ----------------------------------------------------------------------------- aggregation


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """{"test/t2i/R@1": ...} from an eval.json ({split: {metric: value}}); per-class accuracies left out."""
    flat = {}
    for split, metrics in results.items():
        if isinstance(metrics, dict):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "/class/" not in key:
                    flat[f"{split}/{key}"] = float(value)
    for key in ("train_seconds", "num_params"):
        if key in results:
            flat[key] = float(results[key])
    return flat


def collect_rows(workdir: str | pathlib.Path) -> tuple[Sweep, list[dict[str, Any]]]:
    """(the sweep, one row per run and eval variant): axis labels, seed, status, metrics."""
    workdir = pathlib.Path(workdir)
    path = workdir / "sweep.json"
    if not path.exists():
        raise SweepError(f"{workdir} is not a sweep directory (no sweep.json); run `prodclip sweep CONFIG "
                         f"--workdir {workdir}` or `--emit-commands` first")
    definition = json.loads(path.read_text())
    sweep = Sweep.from_json(definition["sweep"])
    rows = []
    for run in expand(sweep):
        run_dir = workdir / "runs" / run.name
        status = run_status(run_dir)
        train_results = json.loads((run_dir / "eval.json").read_text()) if status == "finished" else {}
        for name, eval_labels, _ in (run.evals or (("", {}, {}),)):
            results = train_results
            if run.evals and status == "finished":
                eval_path = run_dir / "sweep_eval" / f"{name}.json"
                results = {**json.loads(eval_path.read_text()), "train_seconds": train_results.get(
                    "train_seconds")} if eval_path.exists() else {}
            row_status = status if (results or status != "finished") else "unevaluated"
            rows.append({**run.labels, **eval_labels, "seed": run.seed, "status": row_status, "run": run.name,
                         **flat_metrics(results)})
    return sweep, rows


def summarize(rows: Sequence[dict[str, Any]], axis_names: Sequence[str],
              metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant (one combination of axis labels, in first-seen order): mean, sample std and n of
    each metric over the finished seeds. std is NaN when n < 2; mean is NaN when n = 0."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[a] for a in axis_names), []).append(row)
    out = []
    for labels, members in groups.items():
        entry: dict[str, Any] = dict(zip(axis_names, labels))
        done = [r for r in members if r["status"] == "finished"]
        entry["n"] = len(done)
        entry["runs"] = len(members)
        for m in metrics:
            values = np.asarray([r[m] for r in done if m in r and r[m] is not None], np.float64)
            entry[f"{m}/mean"] = float(values.mean()) if len(values) else math.nan
            entry[f"{m}/std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            entry[f"{m}/n"] = len(values)
        out.append(entry)
    return out


def format_markdown(summary: Sequence[dict[str, Any]], axis_names: Sequence[str], metrics: Sequence[str],
                    digits: int = 3) -> str:
    """A markdown table: axis labels, seeds finished / planned, then "mean ± std" per metric."""
    lines = ["| " + " | ".join([*axis_names, "seeds", *metrics]) + " |",
             "|" + "---|" * len(axis_names) + "---:|" + "---:|" * len(metrics)]
    for entry in summary:
        cells = []
        for m in metrics:
            mean, std = entry[f"{m}/mean"], entry[f"{m}/std"]
            cells.append("" if math.isnan(mean) else f"{mean:.{digits}f}" if math.isnan(std)
                         else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join([*(str(entry[a]) for a in axis_names),
                                        f"{entry['n']}/{entry['runs']}", *cells]) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]], first: Sequence[str]) -> None:
    columns = list(dict.fromkeys([*first, *(k for r in rows for k in r)]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a results.csv with numbers as floats (seed as int); empty cells left out."""
    rows = []
    with pathlib.Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value == "":
                    continue
                try:
                    row[key] = int(value) if key == "seed" else float(value) if "/" in key or key in (
                        "train_seconds", "num_params") else value
                except ValueError:
                    row[key] = value
            rows.append(row)
    return rows


def draw_metric(ax, summary: Sequence[dict[str, Any]], axis_names: Sequence[str], plot: Plot) -> None:
    """Draws `plot.metric` (mean ± std over seeds) against `plot.x` on a matplotlib Axes, one line
    per variant of the other axes. Entries without finished runs are left out."""
    summary = [e for e in summary if not math.isnan(e.get(f"{plot.metric}/mean", math.nan))]
    others = [a for a in axis_names if a != plot.x]
    x_labels = list(dict.fromkeys(str(e[plot.x]) for e in summary))
    numeric = bool(x_labels) and all(_is_number(v) for v in x_labels)
    positions = {v: (float(v) if numeric else i) for i, v in enumerate(x_labels)}
    lines: dict[str, list[dict]] = {}
    for entry in summary:
        lines.setdefault(", ".join(f"{a}={entry[a]}" for a in others) or plot.metric, []).append(entry)
    for label, entries in lines.items():
        entries = sorted(entries, key=lambda e: positions[str(e[plot.x])])
        xs = [positions[str(e[plot.x])] for e in entries]
        means = np.asarray([e[f"{plot.metric}/mean"] for e in entries])
        stds = np.nan_to_num(np.asarray([e[f"{plot.metric}/std"] for e in entries]))
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    if numeric and plot.logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks([positions[v] for v in x_labels], x_labels)
    ax.set_xlabel(plot.x)
    ax.set_ylabel(f"{plot.metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)


def plot_metric(summary: Sequence[dict[str, Any]], axis_names: Sequence[str], plot: Plot,
                path: str | pathlib.Path) -> None:
    """`draw_metric` into a PNG file (a bare Figure: no pyplot state, any backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    draw_metric(fig.subplots(), summary, axis_names, plot)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def plot_filename(plot: Plot) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", f"{plot.metric}_vs_{plot.x}") + ".png"


def report(workdir: str | pathlib.Path) -> dict[str, Any]:
    """Writes results.csv, summary.csv, results.md and plots/*.png from the runs in a sweep directory.

    Returns {"rows", "summary", "markdown", "plots"}. Plots are drawn once a variant has a finished run.
    """
    workdir = pathlib.Path(workdir)
    sweep, rows = collect_rows(workdir)
    axis_names = [a.name for a in sweep.axes]
    _write_csv(workdir / "results.csv", rows, [*axis_names, "seed", "status", *sweep.metrics])
    summary = summarize(rows, axis_names, sweep.metrics)
    _write_csv(workdir / "summary.csv", summary, axis_names)
    markdown = format_markdown(summary, axis_names, sweep.metrics)
    (workdir / "results.md").write_text(markdown)
    plots = []
    if any(e["n"] for e in summary):
        (workdir / "plots").mkdir(exist_ok=True)
        for plot in sweep.plots:
            path = workdir / "plots" / plot_filename(plot)
            plot_metric(summary, axis_names, plot, path)
            plots.append(path)
    return {"rows": rows, "summary": summary, "markdown": markdown, "plots": plots}
