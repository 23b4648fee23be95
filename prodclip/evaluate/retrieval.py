"""Retrieval metrics from the ranks of each query's positives: R@K, mAP, MRR, nDCG@10, median rank.

Gallery item ``g`` is a positive for query ``q`` iff ``gallery_keys[g] ==
query_keys[q]``. Keys are product ids or title ids (``keys_from_strings``:
identical titles share one key, so every gallery item titled like the query is
a correct match). The ranks come from ``ranking.positive_ranks`` (streamed, in
bounded memory, with its tie rule); re-rankers that build their own ranks
aggregate through ``metrics_from_ranks``, so every path reports the same metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prodclip.evaluate.ranking import DEFAULT_CHUNK_SIZE, DEFAULT_QUERY_BLOCK, positive_ranks

__all__ = [
    "keys_from_strings",
    "retrieval_metrics",
    "two_way_retrieval",
]

_NDCG_K = 10


def keys_from_strings(strings: Sequence[str]) -> np.ndarray:
    """Maps identical strings to the same integer key, numbered by first appearance.

    Args:
      strings: N strings (e.g. product titles).

    Returns:
      [N] int64 keys; ``keys[i] == keys[j]`` iff ``strings[i] == strings[j]``.
    """
    ids: dict[str, int] = {}
    return np.fromiter((ids.setdefault(s, len(ids)) for s in strings), dtype=np.int64, count=len(strings))


def metrics_from_ranks(ranks: list[np.ndarray], ks: Sequence[int], map_k: int | None) -> dict[str, float]:
    """Retrieval metrics from per-query positive ranks (as `positive_ranks` returns them).

    ranks: one int array per query, the ascending 1-based ranks of its positives in the
    gallery (empty: no positive, excluded and counted). ks: R@k cut-offs; map_k: also mAP@map_k.
    Returns the dict `retrieval_metrics` documents. Re-rankers that build their own ranks
    (evaluate/rerank.py) aggregate through here, so every path reports the same metrics.
    """
    counts = np.array([len(r) for r in ranks], np.int64)
    valid = counts > 0
    num_valid = int(valid.sum())
    out: dict[str, float] = {}
    if num_valid == 0:
        nan = float("nan")
        out.update({f"R@{k}": nan for k in ks})
        out.update({"mAP": nan, "MRR": nan, f"nDCG@{_NDCG_K}": nan, "median_rank": nan})
        if map_k is not None:
            out[f"mAP@{map_k}"] = nan
    else:
        counts = counts[valid]
        flat = np.concatenate([r for r in ranks if len(r)]).astype(np.float64)
        query = np.repeat(np.arange(num_valid), counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # i-th positive (1-based) at rank r contributes precision i / r.
        position = (np.arange(len(flat)) - starts[query] + 1).astype(np.float64)
        precision = position / flat
        first = flat[starts]

        for k in ks:
            out[f"R@{k}"] = float(np.mean(first <= k))
        out["mAP"] = float(np.mean(np.bincount(query, precision, num_valid) / counts))
        if map_k is not None:
            hits = np.bincount(query, np.where(flat <= map_k, precision, 0.0), num_valid)
            out[f"mAP@{map_k}"] = float(np.mean(hits / np.minimum(counts, map_k)))
        out["MRR"] = float(np.mean(1.0 / first))
        dcg = np.bincount(query, np.where(flat <= _NDCG_K, 1.0 / np.log2(flat + 1.0), 0.0), num_valid)
        ideal = np.cumsum(1.0 / np.log2(np.arange(2, _NDCG_K + 2)))[np.minimum(counts, _NDCG_K) - 1]
        out[f"nDCG@{_NDCG_K}"] = float(np.mean(dcg / ideal))
        out["median_rank"] = float(np.median(first))
    out["num_queries"] = num_valid
    out["num_queries_without_positive"] = len(ranks) - num_valid
    return out


def retrieval_metrics(
    query_emb: Any,
    gallery_emb: Any,
    query_keys: Any,
    gallery_keys: Any,
    *,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> dict[str, float]:
    """Recall@k, mAP, MRR, nDCG@10 and median rank for key-matched retrieval.

    Queries with no positive in the gallery are excluded from every metric and
    counted in ``num_queries_without_positive``; if no query has a positive,
    the metrics are NaN.

    Args:
      query_emb: [Q, D] float32 queries.
      gallery_emb: [G, D] float32 gallery, G >= 1.
      query_keys: [Q] integer keys.
      gallery_keys: [G] integer keys.
      ks: cut-offs for ``R@k``: fraction of queries whose first positive has
        rank <= k.
      map_k: if given, also ``mAP@{map_k}``: AP over the top map_k,
        normalised by min(#positives, map_k).
      chunk_size, query_block: streaming block sizes, see ``positive_ranks``.

    Returns:
      {"R@k" for k in ks, "mAP" (full-ranking AP), ["mAP@K"], "MRR" (mean
      1 / rank of first positive), "nDCG@10" (binary relevance), "median_rank"
      (of the first positive), "num_queries" (queries evaluated, int),
      "num_queries_without_positive" (int)}.
    """
    ranks = positive_ranks(
        query_emb, gallery_emb, query_keys, gallery_keys, chunk_size=chunk_size, query_block=query_block
    )
    return metrics_from_ranks(ranks, ks, map_k)


def two_way_retrieval(image_emb: Any, text_emb: Any, image_keys: Any, text_keys: Any, **kw: Any) -> dict[str, float]:
    """Image->text and text->image ``retrieval_metrics``, keys prefixed "i2t/" and "t2i/".

    Args:
      image_emb: [N_img, D] float32; text_emb: [N_txt, D] float32.
      image_keys: [N_img] integers; text_keys: [N_txt] integers.
      **kw: forwarded to ``retrieval_metrics``.
    """
    i2t = retrieval_metrics(image_emb, text_emb, image_keys, text_keys, **kw)
    t2i = retrieval_metrics(text_emb, image_emb, text_keys, image_keys, **kw)
    return {**{f"i2t/{k}": v for k, v in i2t.items()}, **{f"t2i/{k}": v for k, v in t2i.items()}}
