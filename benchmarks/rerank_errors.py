"""What fusion re-ranking fixes and breaks, by the attribute that tells the items apart.

    python benchmarks/rerank_errors.py runs/qs_fusion_s0 [runs/...] [--k 32] [--probe-train 5000] [--out F]

For each finished fusion run on the synthetic catalog (a run without fusion gets the probes only), text->image on test and compositional:
embeds the split once, scores each query's two-tower top k with the fusion head once, and
compares three top-1 lists: two-tower, re-ranked by ITM + ITC (w = 1, the default) and by ITM
alone. Each wrong top-1 is attributed to the labels (category, colour, pattern, trim, brand) in
which the retrieved item differs from the query's own item and which the query's title names
(an error may count under several; "one": exactly one differs; "none": nothing the title names
differs, so no ranker can fix it). It also counts the
queries each re-ranker fixes (two-tower wrong, re-ranked right) and breaks (the reverse), and
the ambiguity ceiling: R@1 of a ranker that knows every attribute a title names and breaks ties
at random (a brand left out of the title matches every brand).

With --probe-train N (default 5000), it also fits a linear probe per label on the image
tower's features of the first N train images (unaugmented; `evaluate.baselines.linear_probe`
on standardised features) and scores it on test: the pooled image embedding and the patch
tokens the fusion encoder cross-attends to (flattened). The fusion head re-scores pairs from
those tokens, so an attribute they do not encode is one re-ranking cannot bind.

Prints one markdown table per run and split; --out writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

SPLITS = ("test", "compositional")
LABELS = ("category", "colour", "pattern", "trim", "brand")


def named_differences(labels: dict[str, np.ndarray], brand_named: np.ndarray, query: int,
                      retrieved: int) -> list[str]:
    """The labels in which item `retrieved` differs from item `query` and which the query's title
    names (all but the brand always; the brand when the title names it). Empty: the title cannot
    tell the two apart, so no ranker can fix that error."""
    return [name for name in LABELS if labels[name][query] != labels[name][retrieved]
            and (name != "brand" or brand_named[query])]


def brand_in_title(labels: dict[str, np.ndarray], titles: list[str]) -> np.ndarray:
    """[N] bool: the title names the item's brand."""
    from prodclip.data import synthetic

    return np.array([synthetic.BRANDS[b].lower() in t.lower() for b, t in zip(labels["brand"], titles)])


def ambiguity_ceiling(labels: dict[str, np.ndarray], brand_named: np.ndarray) -> float:
    """Mean over queries of 1 / (items consistent with everything the query title names).

    Titles name category, colour, trim and a non-solid pattern always (solid may be left out,
    and then the title still means solid: no other pattern is ever omitted); the brand only
    sometimes. So items agreeing on category, colour, pattern and trim, and on the brand when
    the title names it, are indistinguishable from the title.
    """
    base = np.stack([labels[name] for name in LABELS[:4]], axis=1)
    same = np.all(base[:, None, :] == base[None, :, :], axis=-1)
    same_brand = labels["brand"][:, None] == labels["brand"][None, :]
    consistent = same & (same_brand | ~brand_named[:, None])
    return float(np.mean(1.0 / consistent.sum(axis=1)))


def probe_image_features(graphdef, params, tokenizer, config, test_source, test_states: dict[str, np.ndarray],
                         num_train: int) -> dict:
    """{feature: {label: test top-1 of a linear probe fit on num_train train images}}, plus chance.

    test_states: `rerank.embed_split` of test_source (already embedded for the error tables)."""
    from prodclip.data import sources as sources_lib
    from prodclip.evaluate import baselines, rerank

    probe_config = config.copy_and_resolve_references()
    probe_config.data.num_train = num_train  # a synthetic split of n items is the first n of a larger one
    train_source = sources_lib.make_source(probe_config, "train")
    train_states = rerank.embed_split(graphdef, params, train_source, tokenizer, config)
    out: dict = {"chance": {name: 1.0 / len(np.unique(train_source.labels[name])) for name in LABELS}}
    for feature, name in (("image_emb", "image embedding"), ("image_tokens", "patch tokens")):
        x_train = train_states[feature].reshape(num_train, -1)
        x_test = test_states[feature].reshape(len(test_states[feature]), -1)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        out[name] = {label: baselines.linear_probe((x_train - mean) / std, np.asarray(train_source.labels[label]),
                                                   (x_test - mean) / std, np.asarray(test_source.labels[label]),
                                                   c=0.1, max_iter=3000)["linear_probe/top1"]
                     for label in LABELS}
    return out


def analyse(workdir: pathlib.Path, k: int, probe_train: int = 0) -> dict:
    from prodclip import config_loading
    from prodclip import run as run_lib
    from prodclip import losses
    from prodclip.evaluate import rerank, suite

    config = config_loading.load_config_json(workdir / "config.json")
    if config.data.name != "synthetic":
        raise SystemExit(f"{workdir}: needs a run on the synthetic catalog (its labels name what a title says)")
    run = run_lib.load_run(workdir, config, SPLITS)
    graphdef, params, tokenizer, sources = run.graphdef, run.params, run.tokenizer, run.sources
    itc_scale = float(losses.clip_logit_scale(np.asarray(params["log_logit_scale"]), config.model.logit_scale_max))
    states_by_split = {}
    out = {}
    for split in SPLITS if config.model.fusion.enabled else ():  # without fusion: the probes only
        source = sources[split]
        labels = {name: np.asarray(source.labels[name]) for name in LABELS}
        states = states_by_split[split] = rerank.embed_split(graphdef, params, source, tokenizer, config)
        scorer = rerank.pair_scorer(graphdef, params, states, "t2i", 1024, itc_scale)
        cosine, candidates, itm = rerank.score_candidates(states["text_emb"], states["image_emb"], k, scorer)
        top1 = {
            "two_tower": candidates[:, 0],
            "itm+itc": rerank.reorder_candidates(cosine, candidates, itm, mode="itm+itc", itc_scale=itc_scale)[:, 0],
            "itm": rerank.reorder_candidates(cosine, candidates, itm, mode="itm")[:, 0],
        }
        keys = np.asarray(suite.retrieval_keys(source)[0], np.int64)  # identical titles match, as in eval
        queries = np.arange(len(candidates))
        right = {name: keys[top] == keys for name, top in top1.items()}
        brand_named = brand_in_title(labels, list(source.titles))
        row = {"ceiling_R@1": ambiguity_ceiling(labels, brand_named),
               "positive_in_top_k": float(np.mean(np.any(keys[candidates] == keys[:, None], axis=1)))}
        for name, top in top1.items():
            differences = [named_differences(labels, brand_named, q, int(top[q])) for q in queries[~right[name]]]
            errors = {a: sum(a in d for d in differences) for a in LABELS}
            errors.update(one=sum(len(d) == 1 for d in differences), none=sum(not d for d in differences))
            row[name] = {"R@1": float(np.mean(right[name])), "wrong": len(differences), "errors": errors}
            if name != "two_tower":
                row[name]["fixed"] = int(np.sum(right[name] & ~right["two_tower"]))
                row[name]["broken"] = int(np.sum(~right[name] & right["two_tower"]))
        out[split] = row
    if probe_train:
        test_states = states_by_split["test"] if "test" in states_by_split else rerank.embed_split(
            graphdef, params, sources["test"], tokenizer, config)
        out["probe"] = probe_image_features(graphdef, params, tokenizer, config, sources["test"], test_states, probe_train)
    return out


def table(result: dict) -> str:
    kinds = (*LABELS, "one", "none")
    lines = ["| ranker | R@1 | wrong | " + " | ".join(f"{a} differs" for a in LABELS)
             + " | one attribute differs | none differs | fixed | broken |",
             "|---|---:|---:|" + "---:|" * (len(kinds) + 2)]
    for name in ("two_tower", "itm+itc", "itm"):
        r = result[name]
        lines.append(f"| {name} | {r['R@1']:.3f} | {r['wrong']} | " + " | ".join(str(r["errors"][a]) for a in kinds)
                     + f" | {r.get('fixed', '')} | {r.get('broken', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--probe-train", type=int, default=5000, help="train images for the probes (0: none)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    results = {}
    for workdir in args.workdirs:
        results[str(workdir)] = analyse(workdir, args.k, args.probe_train)
        for split in (s for s in SPLITS if s in results[str(workdir)]):
            row = results[str(workdir)][split]
            print(f"\n{workdir} {split} text->image (top {args.k}; positive in top k: "
                  f"{row['positive_in_top_k']:.3f}; ambiguity ceiling R@1 {row['ceiling_R@1']:.3f})")
            print(table(row), flush=True)
        if "probe" in results[str(workdir)]:
            probe = results[str(workdir)]["probe"]
            print(f"\n{workdir} linear probes on test (fit on {args.probe_train} train images), top-1")
            print("| features | " + " | ".join(LABELS) + " |\n|---|" + "---:|" * len(LABELS))
            for name, row in probe.items():
                print(f"| {name} | " + " | ".join(f"{row[label]:.3f}" for label in LABELS) + " |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"k": args.k, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
