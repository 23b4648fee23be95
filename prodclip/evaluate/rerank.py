"""Retrieval re-ranked by the fusion encoder's ITM head (ALBEF / BLIP style).

For each query, the two-tower top-k (`ranking.chunked_top_k`, k' = min(k, G))
is re-scored pair by pair with the fusion encoder, and re-ordered by

* ``"itm"``: the ITM log-odds log p(match) / p(no match), or
* ``"itm+itc"``: the log-odds plus the two-tower logit ``logit_scale * cosine`` (as BLIP adds them),
  times ``eval.rerank_itc_weight`` (1.0 = BLIP's plain sum).

Equal re-ranking scores keep their two-tower order, so identical captions or images
tie exactly as in `retrieval`. Items outside the top-k keep their two-tower ranks
(all > k'), so the re-ranked list is a full ranking and every `retrieval` metric
(R@K, mAP, MRR, nDCG@10, median rank) applies to it.

Cost: queries x k' fusion passes, in padded batches of `pair_batch` pairs; never
queries x gallery. The towers' token states of the split are kept on the host:
N x (S x Wi + L x Wt) float32 (1,000 items of the quickstart: 18 MB).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from prodclip import losses
from prodclip.data import pipeline
from prodclip.evaluate import ranking, retrieval
from prodclip.models import inference

# (query rows [P] int64, gallery rows [P] int64) -> [P] float32 ITM log-odds of those pairs.
PairScores = Callable[[np.ndarray, np.ndarray], np.ndarray]

MODES = ("itm", "itm+itc")


def enabled(config: ml_collections.ConfigDict) -> bool:
    """True when evaluation re-ranks: the model has a fusion encoder and eval.rerank_k > 0."""
    return bool(config.model.fusion.enabled) and config.eval.rerank_k > 0


def score_candidates(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int, pair_scores: PairScores,
                     pair_batch: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's two-tower top k' = min(k, G) and their ITM log-odds.

    Returns (cosine [Q, k'] float32, candidates [Q, k'] int64 gallery rows in two-tower order,
    itm [Q, k'] float64 log-odds from `pair_scores`, called on batches of <= pair_batch pairs).
    """
    if k < 1:
        raise ValueError(f"rerank k must be >= 1, got {k}")
    cosine, candidates = ranking.chunked_top_k(query_emb, gallery_emb, k)
    num_queries, k_eff = candidates.shape
    flat_queries = np.repeat(np.arange(num_queries, dtype=np.int64), k_eff)
    flat_items = candidates.reshape(-1)
    itm = np.concatenate([np.asarray(pair_scores(flat_queries[s:s + pair_batch], flat_items[s:s + pair_batch]),
                                     np.float32) for s in range(0, len(flat_items), pair_batch)])
    return cosine, candidates, itm.reshape(num_queries, k_eff).astype(np.float64)


def rerank_scores(itm: np.ndarray, cosine: np.ndarray, *, mode: str = "itm", itc_scale: float = 1.0,
                  itc_weight: float = 1.0) -> np.ndarray:
    """The re-ranking score of pairs, shape of `itm`: the ITM log-odds ("itm"), or
    itm + itc_weight * itc_scale * cosine ("itm+itc"). Used by evaluation and `prodclip search`."""
    if mode not in MODES:
        raise ValueError(f"rerank mode {mode!r} is not one of {', '.join(MODES)}")
    return itm + itc_weight * itc_scale * cosine if mode == "itm+itc" else itm


def reorder_candidates(cosine: np.ndarray, candidates: np.ndarray, itm: np.ndarray, *, mode: str = "itm",
                       itc_scale: float = 1.0, itc_weight: float = 1.0) -> np.ndarray:
    """candidates [Q, k'] re-ordered by `rerank_scores`, best first; ties keep two-tower order."""
    scores = rerank_scores(itm, cosine, mode=mode, itc_scale=itc_scale, itc_weight=itc_weight)
    position = np.broadcast_to(np.arange(candidates.shape[1]), scores.shape)
    order = np.lexsort((position, -scores), axis=1)  # the last key of lexsort is the primary one
    return np.take_along_axis(candidates, order, axis=1)


def ranks_after_reorder(reordered: np.ndarray, two_tower: list[np.ndarray], query_keys: np.ndarray,
                        gallery_keys: np.ndarray) -> list[np.ndarray]:
    """1-based ranks of each query's positives: those inside the re-ordered top k' by their new
    position, the rest keep their two-tower ranks (all > k'). two_tower: `ranking.positive_ranks`."""
    k_eff = reordered.shape[1]
    hits = gallery_keys[reordered] == query_keys[:, None]  # [Q, k'] positives in re-ranked order
    return [np.sort(np.concatenate([np.flatnonzero(hits[q]) + 1, two_tower[q][two_tower[q] > k_eff]])).astype(np.int64)
            for q in range(len(reordered))]


def reranked_ranks(query_emb: np.ndarray, gallery_emb: np.ndarray, query_keys: Any, gallery_keys: Any, k: int,
                   pair_scores: PairScores, *, mode: str = "itm", itc_scale: float = 1.0, itc_weight: float = 1.0,
                   pair_batch: int = 1024) -> tuple[list[np.ndarray], dict[str, float]]:
    """1-based ranks of every positive after re-ranking each query's two-tower top-k.

    Args:
      query_emb: [Q, D] float32, gallery_emb: [G, D] float32, L2-normalised.
      query_keys: [Q] ints, gallery_keys: [G] ints; g is a positive of q iff the keys are equal.
      k: candidates re-scored per query (clipped to G).
      pair_scores: ITM log-odds of (query, gallery) index pairs, see `PairScores`.
      mode: "itm" or "itm+itc" (adds itc_weight * itc_scale * cosine).
      itc_scale: the model's logit scale.
      itc_weight: weight of the two-tower logit in "itm+itc" (1.0 = BLIP's plain sum).
      pair_batch: pairs handed to `pair_scores` per call.

    Returns:
      (ranks: Q arrays of int64, ascending, like `ranking.positive_ranks`;
       timing: {"ms_per_query": wall ms per query of top-k + fusion scoring + re-ordering,
                "pairs_scored": int, = Q * min(k, G)}).
    """
    if mode not in MODES:
        raise ValueError(f"rerank mode {mode!r} is not one of {', '.join(MODES)}")
    query_keys = np.asarray(query_keys, np.int64)
    gallery_keys = np.asarray(gallery_keys, np.int64)
    two_tower = ranking.positive_ranks(query_emb, gallery_emb, query_keys, gallery_keys)

    start = time.perf_counter()
    cosine, candidates, itm = score_candidates(query_emb, gallery_emb, k, pair_scores, pair_batch)
    reordered = reorder_candidates(cosine, candidates, itm, mode=mode, itc_scale=itc_scale, itc_weight=itc_weight)
    elapsed = time.perf_counter() - start
    timing = {"ms_per_query": 1000.0 * elapsed / max(len(reordered), 1), "pairs_scored": int(candidates.size)}
    return ranks_after_reorder(reordered, two_tower, query_keys, gallery_keys), timing


def reranked_metrics(query_emb, gallery_emb, query_keys, gallery_keys, k: int, pair_scores: PairScores, *,
                     ks: Sequence[int] = (1, 5, 10), **kw) -> dict[str, float]:
    """`retrieval.retrieval_metrics` of the re-ranked lists, plus "ms_per_query", "pairs_scored" and "k"."""
    ranks, timing = reranked_ranks(query_emb, gallery_emb, query_keys, gallery_keys, k, pair_scores, **kw)
    return {**retrieval.metrics_from_ranks(ranks, ks, None), **timing, "k": min(k, len(gallery_emb))}


# ----------------------------------------------------------------------------- a split through the model


def embed_split(graphdef, params, source, tokenizer, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Embeddings and token states of every item of `source`, in order, as numpy:
    image_emb [N, D], text_emb [N, D], image_tokens [N, S, Wi], text_tokens [N, L, Wt], text_valid [N, L] bool."""
    encode = inference.split_state_encoder(graphdef)
    batch_size = config.eval.batch_size
    parts: list[tuple] = []
    for batch in pipeline.eval_batches(source, tokenizer, config, batch_size):
        n = len(batch["ids"])
        out = encode(params, inference.pad_to_batch(batch["images"], batch_size),
                     inference.pad_to_batch(batch["token_ids"], batch_size))
        parts.append(tuple(np.asarray(x)[:n] for x in out))
    names = ("image_emb", "text_emb", "image_tokens", "text_tokens", "text_valid")
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def pair_scorer(graphdef, params, split: dict[str, np.ndarray], direction: str, pair_batch: int,
                itc_scale: float) -> PairScores:
    """Fusion log-odds of (query, gallery) index pairs of one split; direction "t2i" (text queries, image
    gallery) or "i2t". Each call's pairs are padded to `pair_batch`, so the fusion encoder compiles once.
    itc_scale: the model's logit scale (a pair's two-tower logit is itc_scale x cosine)."""
    log_odds = inference.fusion_log_odds(graphdef)

    def scores(query_rows: np.ndarray, gallery_rows: np.ndarray) -> np.ndarray:
        image_rows, text_rows = (gallery_rows, query_rows) if direction == "t2i" else (query_rows, gallery_rows)
        n = len(query_rows)
        pad = lambda rows: np.concatenate([rows, np.zeros(pair_batch - n, rows.dtype)]) if n < pair_batch else rows
        image_rows, text_rows = pad(image_rows), pad(text_rows)
        itc = itc_scale * np.sum(split["image_emb"][image_rows] * split["text_emb"][text_rows], axis=-1)
        out = log_odds(params, split["image_tokens"][image_rows], split["text_tokens"][text_rows],
                       split["text_valid"][text_rows], itc.astype(np.float32))
        return np.asarray(out)[:n]

    return scores


def two_way_reranked(graphdef, params, split: dict[str, np.ndarray], keys: np.ndarray,
                     config: ml_collections.ConfigDict, *, pair_batch: int = 1024) -> dict[str, float]:
    """'i2t/rerank/R@1', ..., 't2i/rerank/ms_per_query' for a split embedded by `embed_split`."""
    itc_scale = losses.trained_logit_scale(params, config.model.logit_scale_max)
    metrics = {}
    for direction, (query, gallery) in {"i2t": ("image_emb", "text_emb"), "t2i": ("text_emb", "image_emb")}.items():
        scores = pair_scorer(graphdef, params, split, direction, pair_batch, itc_scale)
        out = reranked_metrics(split[query], split[gallery], keys, keys, config.eval.rerank_k, scores,
                               ks=tuple(config.eval.ks), mode=config.eval.rerank_mode, itc_scale=itc_scale,
                               itc_weight=config.eval.rerank_itc_weight,
                               pair_batch=pair_batch)
        metrics.update({f"{direction}/rerank/{name}": value for name, value in out.items()})
    return metrics


def format_side_by_side(results: dict[str, Any], ks: Sequence[int] = (1, 5, 10)) -> str:
    """A markdown table, one row per (split, direction): two-tower and re-ranked R@k side by side."""
    header = ("| split | direction | k | " + " | ".join(f"two-tower R@{k}" for k in ks) + " | "
              + " | ".join(f"re-ranked R@{k}" for k in ks) + " | ms/query |")
    lines = [header, "|---|---|---:|" + "---:|" * (2 * len(ks) + 1)]
    for split, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for direction in ("t2i", "i2t"):
            if not all(f"{direction}/{part}R@{k}" in metrics for k in ks for part in ("", "rerank/")):
                continue
            plain = " | ".join(f"{metrics[f'{direction}/R@{k}']:.3f}" for k in ks)
            fused = " | ".join(f"{metrics[f'{direction}/rerank/R@{k}']:.3f}" for k in ks)
            lines.append(f"| {split} | {direction} | {metrics[f'{direction}/rerank/k']:.0f} | {plain} | {fused} | "
                         f"{metrics[f'{direction}/rerank/ms_per_query']:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""
