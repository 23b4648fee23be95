"""Time-to-accuracy plot and tables of the Myntra recipes (docs/pretrained.md).

    # each run: <workdir>/wall_start holds the `date +%s` taken just before `prodclip train` started
    python benchmarks/pretrained_recipes.py --out docs/results/pretrained \
        lit=runs/pretrained/lit finetune=runs/pretrained/finetune scratch=runs/pretrained/scratch \
        --seeds lit=runs/pretrained/lit,runs/pretrained/lit_seed1,runs/pretrained/lit_seed2

    # robustness copies of val (written once), then each run evaluated on them (robust_<kind>.json)
    python benchmarks/pretrained_recipes.py --perturb /path/to/myntra/val.parquet --perturbed-dir runs/robust

Reads each run's metrics.jsonl (val t2i R@10 at every train.eval_every, stamped with wall time),
eval.json (the final numbers) and any robust_<kind>.json (`prodclip eval` on a perturbed val copy),
and writes time_to_accuracy.png and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from prodclip.data import robustness  # noqa: E402

FINAL = (("t2i/R@1", "t→i R@1"), ("t2i/R@10", "t→i R@10"), ("i2t/R@1", "i→t R@1"),
         ("zeroshot/articleType/top1", "zero-shot articleType top-1"),
         ("zeroshot/articleType/weighted_f1", "zero-shot articleType weighted F1"),
         ("zeroshot/gender/top1", "zero-shot gender top-1"), ("zeroshot/baseColour/top1", "zero-shot colour top-1"),
         ("baseline/articleType/linear_probe/top1", "articleType linear probe"))


def curve(workdir: pathlib.Path) -> list[tuple[float, float]]:
    """[(wall minutes since start, val t2i R@10)], the final eval last."""
    start_file = workdir / "wall_start"
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = float(start_file.read_text()) if start_file.is_file() else lines[0]["time"]
    points = [((m["time"] - start) / 60, m["val/t2i/R@10"]) for m in lines if "val/t2i/R@10" in m]
    final = workdir / "eval.json"
    if final.is_file():
        points.append(((final.stat().st_mtime - start) / 60, json.loads(final.read_text())["val"]["t2i/R@10"]))
    return points


def split_metrics(results: dict) -> dict:
    """The metrics of the one split in an eval.json / catalog_eval.json ('val', or e.g. 'val_background')."""
    (metrics,) = [v for k, v in results.items() if isinstance(v, dict) and "t2i/R@10" in v][:1]
    return metrics


def seed_table(name: str, workdirs: list[pathlib.Path]) -> list[str]:
    """Markdown rows: each seed's final val metrics, then their mean and standard deviation."""
    finals = [split_metrics(json.loads((w / "eval.json").read_text())) for w in workdirs]
    rows = ["| run | " + " | ".join(label for _, label in FINAL) + " |", "|---|" + "---:|" * len(FINAL)]
    for w, m in zip(workdirs, finals):
        rows.append(f"| {w.name} | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k, _ in FINAL) + " |")
    cells = []
    for k, _ in FINAL:
        values = [m[k] for m in finals if k in m]
        cells.append(f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "-")
    rows.append(f"| {name}, mean ± sd over {len(finals)} seeds | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="name=workdir")
    parser.add_argument("--out", default="docs/results/pretrained")
    parser.add_argument("--perturb", help="a val parquet to write perturbed copies of (val_<kind>.parquet)")
    parser.add_argument("--perturbed-dir", default="runs/robust")
    parser.add_argument("--seeds", help="name=workdir,workdir,... : one recipe's runs with different seeds")
    args = parser.parse_args(argv)
    if args.perturb:
        for kind in robustness.KINDS:
            dst = pathlib.Path(args.perturbed_dir) / f"val_{kind}.parquet"
            print(dst, robustness.perturb_catalog(args.perturb, dst, kind, seed=0), "rows")
    if not args.runs:
        return 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(item.split("=", 1) for item in args.runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = ["| recipe | wall min | " + " | ".join(label for _, label in FINAL) + " |",
            "|---|---:|" + "---:|" * len(FINAL)]
    robust = ["| recipe | val copy | t→i R@1 | t→i R@10 | zero-shot articleType top-1 | weighted F1 |",
              "|---|---|---:|---:|---:|---:|"]
    for name, workdir in runs.items():
        workdir = pathlib.Path(workdir)
        points = curve(workdir)
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
        final = split_metrics(json.loads((workdir / "eval.json").read_text())) if (workdir / "eval.json").is_file() else {}
        wall = f"{points[-1][0]:.1f}" if final and points else "-"
        rows.append(f"| {name} | {wall} | " + " | ".join(f"{final[k]:.3f}" if k in final else "-" for k, _ in FINAL)
                    + " |")
        for kind in ("clean", *robustness.KINDS):
            path = workdir / ("eval.json" if kind == "clean" else f"robust_{kind}.json")
            if path.is_file():
                m = split_metrics(json.loads(path.read_text()))
                robust.append(f"| {name} | {kind} | " + " | ".join(
                    f"{m[k]:.3f}" if k in m else "-" for k in ("t2i/R@1", "t2i/R@10", "zeroshot/articleType/top1",
                                                               "zeroshot/articleType/weighted_f1")) + " |")
    ax.set_xlabel("wall minutes (caching included)")
    ax.set_ylabel("val t→i R@10")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_to_accuracy.png", dpi=120)
    text = "\n".join(rows) + "\n\nRobustness (perturbed copies of val):\n\n" + "\n".join(robust) + "\n"
    if args.seeds:
        name, dirs = args.seeds.split("=", 1)
        text += "\nSeeds:\n\n" + "\n".join(seed_table(name, [pathlib.Path(d) for d in dirs.split(",")])) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
