"""Fusion re-ranking of the two-tower top-k against a brute-force numpy ranking."""

import numpy as np
import pytest

from prodclip.evaluate import ranking, rerank, retrieval


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def data(seed=0, q=30, g=40, d=8):
    """Queries and a gallery with duplicated rows (identical captions) and repeated keys."""
    rng = np.random.default_rng(seed)
    gallery = unit(rng.normal(size=(g, d)))
    dup = min(5, g // 2)
    gallery[g - dup:] = gallery[:dup]  # duplicated gallery rows...
    gallery_keys = rng.integers(0, 12, g)
    gallery_keys[g - dup:] = gallery_keys[:dup]  # ...with the same key, as duplicated captions have
    queries = unit(rng.normal(size=(q, d)) + 0.5 * gallery[rng.integers(0, g, q)])
    query_keys = rng.integers(0, 14, q)  # keys 12, 13: queries without any positive
    itm = rng.normal(size=(q, g)).astype(np.float32)
    itm[:, g - dup:] = itm[:, :dup]  # the fusion sees identical items identically
    return queries, gallery, query_keys, gallery_keys, itm


def brute_force_ranks(queries, gallery, query_keys, gallery_keys, itm, k, mode, scale):
    """Full sort in float64: two-tower order (score desc, index asc), its first k re-sorted by the
    re-ranking score (desc, two-tower position asc), the rest as is."""
    cosine = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    ranks = []
    for q in range(len(queries)):
        order = sorted(range(len(gallery)), key=lambda g: (-cosine[q, g], g))
        head = order[:k]
        score = {g: itm[q, g] + (scale * cosine[q, g] if mode == "itm+itc" else 0.0) for g in head}
        head = [head[pos] for _, pos in sorted((-score[g], pos) for pos, g in enumerate(head))]
        full = head + order[k:]
        ranks.append(np.array([r + 1 for r, g in enumerate(full) if gallery_keys[g] == query_keys[q]], np.int64))
    return ranks


class CountingScorer:
    def __init__(self, itm):
        self.itm, self.calls = itm, []

    def __call__(self, query_rows, gallery_rows):
        self.calls.append((np.array(query_rows), np.array(gallery_rows)))
        return self.itm[query_rows, gallery_rows]


@pytest.mark.parametrize("k", [1, 5, 17, 40, 100])
@pytest.mark.parametrize("mode,weight", [("itm", 1.0), ("itm+itc", 1.0), ("itm+itc", 0.3)])
def test_reranked_ranks_match_brute_force(k, mode, weight):
    queries, gallery, query_keys, gallery_keys, itm = data()
    scorer = CountingScorer(itm)
    ranks, timing = rerank.reranked_ranks(queries, gallery, query_keys, gallery_keys, k, scorer, mode=mode,
                                          itc_scale=7.0, itc_weight=weight, pair_batch=64)
    want = brute_force_ranks(queries, gallery, query_keys, gallery_keys, itm, min(k, len(gallery)), mode,
                             7.0 * weight)
    for q, (got, expected) in enumerate(zip(ranks, want)):
        np.testing.assert_array_equal(got, expected, err_msg=f"query {q}")
    # Cost: exactly queries x min(k, G) pairs, in calls of at most pair_batch, each a two-tower top-k item.
    k_eff = min(k, len(gallery))
    assert timing["pairs_scored"] == len(queries) * k_eff == sum(len(c[0]) for c in scorer.calls)
    assert all(len(c[0]) <= 64 for c in scorer.calls)
    _, top = ranking.chunked_top_k(queries, gallery, k)
    scored = {(int(q), int(g)) for rows, items in scorer.calls for q, g in zip(rows, items)}
    assert scored == {(q, int(g)) for q in range(len(queries)) for g in top[q]}
    assert timing["ms_per_query"] > 0


def test_oracle_scorer_puts_a_positive_first_whenever_one_is_in_the_top_k():
    queries, gallery, query_keys, gallery_keys, _ = data(seed=1)
    oracle = (query_keys[:, None] == gallery_keys[None, :]).astype(np.float32)
    k = 10
    metrics = rerank.reranked_metrics(queries, gallery, query_keys, gallery_keys, k,
                                      lambda qs, gs: oracle[qs, gs], ks=(1, 5, 10, 20))
    plain = retrieval.retrieval_metrics(queries, gallery, query_keys, gallery_keys, ks=(1, 5, 10, 20))
    assert metrics["R@1"] == pytest.approx(plain["R@10"])  # every positive in the top 10 moves to rank 1
    assert metrics["R@1"] > plain["R@1"]  # and that is a real change on this data
    assert metrics["R@20"] == pytest.approx(plain["R@20"])  # beyond k nothing moves
    assert metrics["num_queries"] == plain["num_queries"] and metrics["k"] == k


def test_k_beyond_the_gallery_reranks_everything():
    queries, gallery, query_keys, gallery_keys, itm = data(seed=2, g=7)
    big = rerank.reranked_ranks(queries, gallery, query_keys, gallery_keys, 50, CountingScorer(itm))[0]
    exact = rerank.reranked_ranks(queries, gallery, query_keys, gallery_keys, 7, CountingScorer(itm))[0]
    for a, b in zip(big, exact):
        np.testing.assert_array_equal(a, b)
    # With k = G the order is the ITM order alone (ties by two-tower position).
    want = brute_force_ranks(queries, gallery, query_keys, gallery_keys, itm, 7, "itm", 1.0)
    for a, b in zip(big, want):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments():
    queries, gallery, query_keys, gallery_keys, itm = data()
    with pytest.raises(ValueError, match="mode"):
        rerank.reranked_ranks(queries, gallery, query_keys, gallery_keys, 5, CountingScorer(itm), mode="itc")
    with pytest.raises(ValueError, match="k must be >= 1"):
        rerank.reranked_ranks(queries, gallery, query_keys, gallery_keys, 0, CountingScorer(itm))


def test_side_by_side_table():
    results = {"test": {f"{d}/{p}R@{k}": 0.5 for d in ("t2i", "i2t") for p in ("", "rerank/") for k in (1, 5, 10)}}
    for d in ("t2i", "i2t"):
        results["test"].update({f"{d}/rerank/k": 32, f"{d}/rerank/ms_per_query": 1.25})
    table = rerank.format_side_by_side(results)
    assert "| test | t2i | 32 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 1.25 |" in table
    assert rerank.format_side_by_side({"test": {"t2i/R@1": 0.5}}) == ""
