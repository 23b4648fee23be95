"""Does `prodclip audit` rank wrong listings first? Inject listing errors into a split and measure.

    python benchmarks/audit_injection.py --workdir runs/myntra --split val --out runs/myntra_audit

A share of the split's listings get a wrong title (default: 5% an `attribute_swap` title, the
same kind of product in another colour or gender; 5% a `random` title; prodclip/evaluate/pairs.py
draws them). The split is written as a catalog file with the run's column names
(OUT/catalog_injected.parquet, plus an `injected` column the audit does not read), `prodclip
audit` runs on it, and its ranking is scored:

  all        precision@k = recall@k at k = the number of injected listings;
  per kind   the same, ranking the clean listings and that kind's injected ones only (k = that
             kind's count), plus that kind's recall in the top k of the full ranking and the
             ROC-AUC of the audit score between that kind and the clean listings.

Results go to OUT/injection.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import sys

import numpy as np
from sklearn.metrics import roc_auc_score


def _image_bytes(source, i: int) -> bytes:
    if hasattr(source, "image_bytes"):
        return source.image_bytes(i)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(source[i]["image"])).save(buffer, format="PNG")
    return buffer.getvalue()


def write_injected_catalog(config, split: str, fractions: dict[str, float], seed: int,
                           path: pathlib.Path) -> list[str]:
    """Writes the split with injected titles as a parquet catalog; returns the kind per row ("" = clean)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prodclip.data import catalog as catalog_lib
    from prodclip.data import sources
    from prodclip.evaluate import matching, pairs

    d = config.data
    fields = catalog_lib.template_fields(d.title_template)
    if len(fields) != 1 or "{" in d.image_column:
        raise SystemExit(f"this script writes one title column and one image-bytes column; the run's "
                         f"title_template {d.title_template!r} / image_column {d.image_column!r} are not that")
    source = sources.make_source(config, split)
    type_label, swap_labels = matching.benchmark_labels(config, source)
    sampler = pairs.sampler_for_source(source, type_label, swap_labels)
    titles, injected = pairs.inject_errors(sampler, fractions, seed=seed)
    ids = getattr(source, "raw_ids", None) or [int(x) for x in source.ids]
    table = pa.table({d.id_column: ids, fields[0]: titles,
                      d.image_column: [_image_bytes(source, i) for i in range(len(source))],
                      "original_title": list(sampler.titles), "injected": injected})
    pq.write_table(table, path)
    return injected


def ranking_metrics(ranked_injected: list[str]) -> dict:
    """Precision / recall at k from the audit's ranking (likeliest mismatch first), as injected kinds."""
    ranked = np.asarray(ranked_injected)
    scores = -np.arange(len(ranked), dtype=np.float64)  # higher = likelier mismatch
    k_all = int(np.sum(ranked != ""))
    out = {"all": {"k": k_all, "precision_at_k": float(np.mean(ranked[:k_all] != "")) if k_all else float("nan")}}
    out["all"]["recall_at_k"] = out["all"]["precision_at_k"]
    for kind in sorted(set(ranked_injected) - {""}):
        keep = (ranked == kind) | (ranked == "")
        sub = ranked[keep]
        k = int(np.sum(sub == kind))
        hits = int(np.sum(sub[:k] == kind))
        out[kind] = {"k": k, "precision_at_k": hits / k, "recall_at_k": hits / k,
                     "recall_in_top_k_all": float(np.sum(ranked[:k_all] == kind) / k),
                     "roc_auc": float(roc_auc_score(sub == kind, scores[keep]))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True)
    parser.add_argument("--attribute-swap", type=float, default=0.05, help="share of listings (default 0.05)")
    parser.add_argument("--random", type=float, default=0.05, help="share of listings (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)

    from prodclip import cli
    from prodclip import config_loading

    config = config_loading.load(args.workdir, overrides)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = out / "catalog_injected.parquet"
    injected = write_injected_catalog(config, args.split, {"attribute_swap": args.attribute_swap,
                                                           "random": args.random}, args.seed, catalog)
    code = cli.main(["audit", "--workdir", args.workdir, "--catalog", str(catalog), "--out", str(out / "report"),
                     *overrides])
    if code:
        return code
    with open(out / "report" / "audit.csv", newline="") as f:
        ranked_rows = [int(r["row"]) for r in csv.DictReader(f) if r["status"] == "scored"]
    results = {"split": args.split, "seed": args.seed, "num_listings": len(injected),
               "metrics": ranking_metrics([injected[r] for r in ranked_rows])}
    (out / "injection.json").write_text(json.dumps(results, indent=2))
    print("| injected | k | precision@k | recall@k | recall in top k(all) | ROC-AUC |\n|---|---:|---:|---:|---:|---:|")
    for kind, m in results["metrics"].items():
        extra = [f"{m[key]:.3f}" if key in m else "" for key in ("recall_in_top_k_all", "roc_auc")]
        print(f"| {kind} | {m['k']} | {m['precision_at_k']:.3f} | {m['recall_at_k']:.3f} | " + " | ".join(extra) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
