"""Runs the architecture baselines (configs/ablations/architectures.py), every row x seed, and tables them.

    python benchmarks/architectures.py --root runs/arch --budget-s 120 --seeds 0,1,2 [--rows a,b] [--table-only] \
        [--config.x.y=z ...]   # extra overrides for every run

Each run is `prodclip train` in ROOT/<row>_s<seed> (a finished run, one with eval.json, is not
re-run). After training, the pair ROC-AUC is measured on val: every product's image with its own
title (positive) and with the title of another, differently titled product (negative, a fixed
derangement), scored by the cosine of the embeddings, and by the matcher's probability where the
row has one. The table (mean ± sample standard deviation over the seeds that finished) goes to
stdout and ROOT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ablations" / "architectures.py"
METRICS = (("t2i/R@1", "t2i R@1"), ("t2i/R@5", "t2i R@5"), ("t2i/R@10", "t2i R@10"), ("i2t/R@1", "i2t R@1"),
           ("i2t/R@5", "i2t R@5"), ("i2t/R@10", "i2t R@10"), ("zeroshot/articleType/top1", "zero-shot articleType"),
           ("pair_auc/cosine", "pair ROC-AUC (cosine)"), ("pair_auc/matcher", "pair ROC-AUC (matcher)"),
           ("pairs_per_sec", "pairs/s"), ("train_steps", "steps"))


def run_one(row: str, seed: int, workdir: pathlib.Path, budget_s: float, overrides=()) -> None:
    cmd = [sys.executable, "-m", "prodclip.cli", "train", "--config", str(CONFIG), "--config-arg", row,
           "--workdir", str(workdir), f"--config.seed={seed}", f"--config.train.max_train_seconds={budget_s}",
           *overrides]
    print("+", " ".join(cmd), flush=True)
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


def pair_auc(workdir: pathlib.Path) -> dict[str, float]:
    """ROC-AUC of matching vs non-matching (image, title) pairs of val, by cosine and by the matcher."""
    import jax
    from sklearn.metrics import roc_auc_score

    from prodclip import config_loading
    from prodclip import run as run_lib
    from prodclip.data import pipeline
    from prodclip.models import factory, inference
    from prodclip.models import matcher as matcher_lib

    config = config_loading.load_config_json(workdir / "config.json")
    run = run_lib.load_run(workdir, config, ["val"])
    graphdef, params, tokenizer, sources = run.graphdef, run.params, run.tokenizer, run.sources
    source = sources["val"]
    image_emb, text_emb = inference.embed_source(graphdef, params, source, tokenizer, config)
    titles = pipeline.source_titles(source)
    n = len(titles)
    rng = np.random.default_rng(0)
    partner = rng.permutation(n)
    for i in np.flatnonzero((partner == np.arange(n)) | (np.asarray(titles) == np.asarray(titles)[partner])):
        while partner[i] == i or titles[partner[i]] == titles[i]:
            partner[i] = rng.integers(n)
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    image_rows = np.concatenate([np.arange(n), np.arange(n)])
    text_rows = np.concatenate([np.arange(n), partner])
    cosine = np.sum(image_emb[image_rows] * text_emb[text_rows], axis=1)
    out = {"pair_auc/cosine": float(roc_auc_score(labels, cosine))}
    if config.model.matcher.kind != "none":
        model = factory.merge_model(graphdef, params)
        prob = jax.jit(lambda u, v: matcher_lib.match_probability(model, u, v))(image_emb[image_rows],
                                                                               text_emb[text_rows])
        out["pair_auc/matcher"] = float(roc_auc_score(labels, np.asarray(prob)))
    return out


def summarise(workdir: pathlib.Path) -> dict[str, float]:
    results = json.loads((workdir / "eval.json").read_text())
    summary = {k: results["val"][k] for k, _ in METRICS if k in results["val"]}
    rates = [json.loads(line)["train/pairs_per_sec"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if "train/pairs_per_sec" in line]
    summary["pairs_per_sec"] = float(np.median(rates[1:] if len(rates) > 1 else rates))  # the first includes compiling
    summary["train_steps"] = results.get("train_steps", results["step"])
    summary["num_params"] = results["num_params"]
    auc_path = workdir / "pair_auc.json"
    if not auc_path.exists():
        auc_path.write_text(json.dumps(pair_auc(workdir)))
    summary.update(json.loads(auc_path.read_text()))
    return summary


def table(rows, seeds, root: pathlib.Path) -> str:
    header = ["row", "seeds", "params (M)"] + [name for _, name in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * len(METRICS)]
    for row in rows:
        done = [summarise(root / f"{row}_s{s}") for s in seeds if (root / f"{row}_s{s}" / "eval.json").exists()]
        if not done:
            lines.append(f"| {row} | 0 | " + " | ".join([""] * (len(METRICS) + 1)) + " |")
            continue
        cells = [row, str(len(done)), f"{done[0]['num_params'] / 1e6:.2f}"]
        for key, _ in METRICS:
            values = [d[key] for d in done if key in d]
            if not values:
                cells.append("–")
                continue
            fmt = ".0f" if key in ("pairs_per_sec", "train_steps") else ".3f"
            spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):{fmt}}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/arch")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default="all")
    parser.add_argument("--table-only", action="store_true")
    args, overrides = parser.parse_known_args()
    sys.path.insert(0, str(CONFIG.parent))
    from architectures import ROWS

    rows = ROWS if args.rows == "all" else tuple(args.rows.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    root = pathlib.Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PRODCLIP_TEXT_CACHE", str(root / "text_cache"))
    if not args.table_only:
        for seed in seeds:  # every row once before any row twice, so a cut-short sweep still covers all rows
            for row in rows:
                workdir = root / f"{row}_s{seed}"
                if not (workdir / "eval.json").exists():
                    run_one(row, seed, workdir, args.budget_s, overrides)
    text = table(rows, seeds, root)
    (root / "table.md").write_text(f"budget {args.budget_s:.0f} s of training per run\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
