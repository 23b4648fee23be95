"""Chooses the ITM / ITC weight of fusion re-ranking on val, then reports test and compositional.

    python benchmarks/rerank_weight.py runs/qs_fusion_s0 runs/qs_fusion_s1 runs/qs_fusion_s2 \
        [--weights 0,0.25,0.5,1,2] [--k 32] [--splits val,test,compositional] [--out rerank_weight.json]

Re-ranking with eval.rerank_mode="itm+itc" orders each query's two-tower top k by
ITM log-odds + w * logit_scale * cosine; w = 1 is BLIP's plain sum (the default), w = 0 is ITM
alone. For each finished fusion run, this embeds its val, test and compositional splits once,
scores each query's top k with the fusion head once, and re-orders the candidates for every w.
The w with the best val R@1 (mean of text->image and image->text; ties go to the w nearest 1)
is chosen per run, from val alone; test and compositional are only reported (a catalog with val
only, --splits val, reports the chosen w on the split it was chosen on). With a residual ITM head
(model.fusion.itc_residual) the log-odds already hold gain * logit; w = -gain leaves the head alone. It prints one
markdown table (R@1 per split and direction: two-tower, re-ranked with w = 1, re-ranked with the
chosen w) and writes the per-weight numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import numpy as np

SPLITS = ("val", "test", "compositional")
DIRECTIONS = {"t2i": ("text_emb", "image_emb"), "i2t": ("image_emb", "text_emb")}


def run_weights(workdir: pathlib.Path, weights: list[float], k: int, splits=SPLITS) -> dict:
    """{split: {direction: {"two_tower": R@1, "w=<w>": R@1, ...}}} for one run."""
    from prodclip import config_loading
    from prodclip import run as run_lib
    from prodclip import losses
    from prodclip.evaluate import ranking, rerank, retrieval, suite

    config = config_loading.load_config_json(workdir / "config.json")
    if not config.model.fusion.enabled:
        raise SystemExit(f"{workdir}: not a fusion run (model.fusion.enabled=False)")
    run = run_lib.load_run(workdir, config, splits)
    graphdef, params, tokenizer, sources = run.graphdef, run.params, run.tokenizer, run.sources
    itc_scale = float(losses.clip_logit_scale(np.asarray(params["log_logit_scale"]), config.model.logit_scale_max))
    r1 = lambda ranks: retrieval.metrics_from_ranks(ranks, (1,), None)["R@1"]
    out: dict = {}
    for split in splits:
        states = rerank.embed_split(graphdef, params, sources[split], tokenizer, config)
        keys = np.asarray(suite.retrieval_keys(sources[split])[0], np.int64)
        out[split] = {}
        for direction, (query, gallery) in DIRECTIONS.items():
            scorer = rerank.pair_scorer(graphdef, params, states, direction, 1024, itc_scale)
            cosine, candidates, itm = rerank.score_candidates(states[query], states[gallery], k, scorer)
            two_tower = ranking.positive_ranks(states[query], states[gallery], keys, keys)
            row = {"two_tower": r1(two_tower)}
            for w in weights:
                order = rerank.reorder_candidates(cosine, candidates, itm, mode="itm+itc", itc_scale=itc_scale,
                                                  itc_weight=w)
                row[f"w={w:g}"] = r1(rerank.ranks_after_reorder(order, two_tower, keys, keys))
            out[split][direction] = row
    return out


def choose_weight(result: dict, weights: list[float]) -> float:
    """The w with the best val R@1 averaged over both directions; ties go to the w nearest 1."""
    score = lambda w: statistics.mean(result["val"][d][f"w={w:g}"] for d in DIRECTIONS)
    return max(weights, key=lambda w: (round(score(w), 6), -abs(w - 1.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--weights", default="0,0.1,0.25,0.5,0.75,1,1.5,2")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated, val first")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    splits = tuple(args.splits.split(","))
    if 1.0 not in weights:
        weights.append(1.0)

    results = {}
    for workdir in args.workdirs:
        result = run_weights(workdir, weights, args.k, splits)
        results[str(workdir)] = {"per_weight": result, "chosen_weight": choose_weight(result, weights)}
        print(f"{workdir}: chosen w = {results[str(workdir)]['chosen_weight']:g} (on val)", flush=True)

    header = "| split | direction | two-tower R@1 | re-ranked, w = 1 | re-ranked, w chosen on val | gain at w = 1 | gain at chosen w |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    gain = lambda a, b: (f"{100 * np.mean(np.subtract(b, a)):+.1f} ± {100 * np.std(np.subtract(b, a), ddof=1):.1f}"
                         if len(a) > 1 else f"{100 * (b[0] - a[0]):+.1f}")
    for split in splits:
        for direction in DIRECTIONS:
            rows = [(r["per_weight"][split][direction], r["chosen_weight"]) for r in results.values()]
            base = [row["two_tower"] for row, _ in rows]
            plain = [row["w=1"] for row, _ in rows]
            chosen = [row[f"w={w:g}"] for row, w in rows]
            lines.append(f"| {split} | {direction} | {fmt(base)} | {fmt(plain)} | {fmt(chosen)} | "
                         f"{gain(base, plain)} | {gain(base, chosen)} |")
    print("chosen weights:", ", ".join(f"{r['chosen_weight']:g}" for r in results.values()))
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"k": args.k, "weights": weights, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
