"""Querybank normalisation on a trained run: the bank size k, and how exact search's candidate pool is.

    PRODCLIP_MYNTRA_DIR=/path/to/myntra python benchmarks/querybank.py --workdir runs/pretrained/sal2 \
        --out docs/results/querybank/sal2_val.json

For one eval split (--split; --data-path for another catalog folder of the same shape), the run's
photos and titles are embedded once, and so are the run's own distinct train titles (the bank for
text->image) and its train photos (the image cache's view 0 when it holds them; the bank for
image->text). Rows:

  plain          R@1 / R@10 by cosine (eval.json's t2i/ and i2t/)
  k=K            by cosine - 0.5 * the gallery item's mean top-K cosine to the bank
                 (evaluate/querybank.py; eval.json's t2i_bank/ and i2t_bank/ for eval.querybank_k)
  short queries  t->i with each title's words kept with probability eval.short_query_keep_prob
  mix store      short queries against `prodclip embed`'s default product vectors (embed.mode=mix:
                 normalise(0.9 image + 0.1 title)), the store's densities taken the same way
  zeroshot       top-1 / weighted F1 per eval.zeroshot_labels label, each class prompt's score
                 lowered by 0.5 * its mean top-K cosine to the train photos (a per-class offset;
                 eval.json's zeroshot/<label>/bank/ for eval.querybank_k)

and, for search's candidate pool (search.QUERYBANK_POOL rows by cosine re-ordered by the normalised
score), the share of queries whose top 10 equals the exact normalised top 10: full titles against the
photos (pool_top10_exact) and against the mix store, full and short (pool_top10_exact_mix, _mix_short);
and for search itself (search.querybank_candidates, which widens that pool until the order is exact),
the share of short queries against the mix store that get the exact top 10 and the share it widened for.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from prodclip import image_cache, run as run_lib, search  # noqa: E402
from prodclip.data import pipeline, sources, view_augment  # noqa: E402
from prodclip.evaluate import querybank, retrieval, store, suite, zeroshot  # noqa: E402
from prodclip.models import inference  # noqa: E402


def recall(queries: np.ndarray, gallery: np.ndarray, keys: np.ndarray) -> dict[str, float]:
    found = retrieval.retrieval_metrics(queries, gallery, keys, keys, ks=(1, 10))
    return {"R@1": round(found["R@1"], 4), "R@10": round(found["R@10"], 4)}


def normalised(queries, gallery, density, keys) -> dict[str, float]:
    return recall(*querybank.with_density(queries, gallery, density), keys)


def zeroshot_rates(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    found = zeroshot.classify_scores(scores, labels)
    return {"top1": round(found["top1"], 4), "weighted_f1": round(found["weighted_f1"], 4)}


def pool_agreement(queries: np.ndarray, gallery: np.ndarray, density: np.ndarray, pool: int, k: int = 10) -> float:
    """Share of queries whose top k by the normalised score over the top `pool` by cosine equals the exact one."""
    cos = queries @ gallery.T
    exact = np.argsort(-(cos - querybank.DENSITY_WEIGHT * density[None, :]), axis=1, kind="stable")[:, :k]
    candidates = np.argsort(-cos, axis=1, kind="stable")[:, :pool]
    rescored = np.take_along_axis(cos, candidates, 1) - querybank.DENSITY_WEIGHT * density[candidates]
    from_pool = np.take_along_axis(candidates, np.argsort(-rescored, axis=1, kind="stable")[:, :k], 1)
    return float(np.mean(np.all(np.sort(exact, 1) == np.sort(from_pool, 1), axis=1)))


def widened_agreement(queries: np.ndarray, gallery: np.ndarray, density: np.ndarray, k: int = 10
                      ) -> tuple[float, float]:
    """(share of queries whose top k from search.querybank_candidates equals the exact normalised top k,
    share of queries for which it widened the first pool), one query at a time as serve searches."""
    cos = queries @ gallery.T
    exact = np.argsort(-(cos - querybank.DENSITY_WEIGHT * density[None, :]), axis=1, kind="stable")[:, :k]
    same = widened = 0
    for q in range(len(queries)):
        asked = []

        def find(_, n, q=q):
            asked.append(n)
            rows = np.argsort(-cos[q], kind="stable")[:n][None, :]
            return np.take_along_axis(cos[q:q + 1], rows, 1), rows

        found_cos, rows = search.querybank_candidates(find, queries[q:q + 1], k, density, len(gallery))
        normalised = found_cos[0] - querybank.DENSITY_WEIGHT * density[rows[0]]
        same += set(rows[0][np.argsort(-normalised, kind="stable")[:k]]) == set(exact[q])
        widened += len(asked) > 1
    return same / len(queries), widened / len(queries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--data-path", default="", help="another catalog folder holding --split (default: the run's)")
    parser.add_argument("--ks", default="3,10,30")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    start = time.time()
    run = run_lib.load_run(args.workdir, splits=("train",))
    config, train = run.config, run.sources["train"]
    eval_config = config.copy_and_resolve_references()
    if args.data_path:
        eval_config.data.path = args.data_path
    vocab = {label: stats["names"] for label, stats in (run.label_stats or {}).items()}
    source = sources.make_source(eval_config, args.split, vocab)
    image_emb, text_emb = inference.embed_source(run.graphdef, run.params, source, run.tokenizer, config)
    keys, _ = suite.retrieval_keys(source)
    encode = inference.title_encoder(run.graphdef, run.params, run.tokenizer, config.eval.batch_size)
    title_bank = suite.title_bank(run.graphdef, run.params, train, run.tokenizer, config)
    photo_bank = suite.train_photo_embeddings(run.graphdef, run.params, train, run.tokenizer, config,
                                              image_cache.cached_train_embeddings(config, args.workdir, run.graphdef,
                                                                                  run.params, train))
    keep = config.eval.short_query_keep_prob or 0.5
    short = encode(view_augment.title_views(pipeline.source_titles(source), 2, seed=0, keep_prob=keep)[1])

    classes = {}
    for label in config.eval.zeroshot_labels:
        if label in getattr(source, "labels", {}):
            _, names, labels = suite.zeroshot_classes(label, source, config, run.label_stats)
            class_emb = zeroshot.class_embeddings(encode, names, zeroshot.label_templates(label, config))
            classes[label] = (class_emb, labels)

    mix = store.product_vectors(image_emb, text_emb, "mix", config.embed.image_weight)
    result = {"workdir": args.workdir, "split": args.split, "data_path": args.data_path or config.data.path,
              "items": len(source), "bank_titles": len(title_bank), "bank_photos": len(photo_bank),
              "short_query_keep_prob": keep, "pool": search.QUERYBANK_POOL,
              "plain": {"t2i": recall(text_emb, image_emb, keys), "i2t": recall(image_emb, text_emb, keys),
                        "t2i_short": recall(short, image_emb, keys), "mix_short": recall(short, mix, keys),
                        "zeroshot": {label: zeroshot_rates(image_emb @ c.T, labels) for label, (c, labels) in classes.items()}}}
    for k in (int(x) for x in args.ks.split(",")):
        photo_density = querybank.densities(image_emb, title_bank, k)
        mix_density = querybank.densities(mix, title_bank, k)
        result[f"k={k}"] = {
            "t2i": normalised(text_emb, image_emb, photo_density, keys),
            "i2t": normalised(image_emb, text_emb, querybank.densities(text_emb, photo_bank, k), keys),
            "t2i_short": normalised(short, image_emb, photo_density, keys),
            "mix_short": normalised(short, mix, mix_density, keys),
            "pool_top10_exact": pool_agreement(text_emb, image_emb, photo_density, search.QUERYBANK_POOL),
            "pool_top10_exact_mix": pool_agreement(text_emb, mix, mix_density, search.QUERYBANK_POOL),
            "pool_top10_exact_mix_short": pool_agreement(short, mix, mix_density, search.QUERYBANK_POOL),
            **dict(zip(("search_top10_exact_mix_short", "search_widened_mix_short"),
                       widened_agreement(short, mix, mix_density))),
            "zeroshot": {label: zeroshot_rates(querybank.normalised_scores(image_emb, c, photo_bank, k), labels)
                         for label, (c, labels) in classes.items()}}
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
