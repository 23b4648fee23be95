"""Tests for prodclip.evaluate.ranking and retrieval against a brute-force full-matrix reference."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prodclip.evaluate.ranking import chunk_step_memory_bytes, chunked_top_k, positive_ranks
from prodclip.evaluate.retrieval import keys_from_strings, retrieval_metrics, two_way_retrieval

REPO_ROOT = Path(__file__).resolve().parents[1]
# Multiples of 0.5 keep every dot product exact in float32, so the reference's
# ties are exactly the implementation's ties; 0 and negatives produce -0.0.
DISCRETE_VALUES = (-1.0, -0.5, 0.0, 0.5, 1.0)


# ----------------------------------------------------------------------------
# Brute-force reference: full Q x G matrix, stable lexsort with the tie rule.
# ----------------------------------------------------------------------------


def reference_order(query_emb, gallery_emb):
    """[Q, G] gallery indices per query: score descending, then index ascending."""
    scores = query_emb.astype(np.float64) @ gallery_emb.astype(np.float64).T
    index = np.arange(gallery_emb.shape[0])
    return np.stack([np.lexsort((index, -row)) for row in scores]), scores


def reference_metrics(query_emb, gallery_emb, query_keys, gallery_keys, ks, map_k):
    order, _ = reference_order(query_emb, gallery_emb)
    per_query, all_ranks = [], []
    for q in range(len(query_keys)):
        relevant = gallery_keys[order[q]] == query_keys[q]
        all_ranks.append(np.flatnonzero(relevant) + 1)
        if relevant.any():
            per_query.append(relevant)
    out = {"num_queries": len(per_query), "num_queries_without_positive": len(query_keys) - len(per_query)}
    if not per_query:
        return out, all_ranks
    first, ap, ap_k, mrr, ndcg = [], [], [], [], []
    for rel in per_query:
        hits = np.cumsum(rel)
        precision_at = hits / np.arange(1, len(rel) + 1)
        first.append(np.argmax(rel) + 1)
        ap.append(precision_at[rel].mean())
        if map_k is not None:
            ap_k.append(precision_at[:map_k][rel[:map_k]].sum() / min(rel.sum(), map_k))
        mrr.append(1.0 / first[-1])
        gains = rel[:10] / np.log2(np.arange(2, 2 + len(rel[:10])))
        ideal = (1.0 / np.log2(np.arange(2, 2 + min(rel.sum(), 10)))).sum()
        ndcg.append(gains.sum() / ideal)
    first = np.array(first)
    for k in ks:
        out[f"R@{k}"] = np.mean(first <= k)
    out.update({"mAP": np.mean(ap), "MRR": np.mean(mrr), "nDCG@10": np.mean(ndcg), "median_rank": np.median(first)})
    if map_k is not None:
        out[f"mAP@{map_k}"] = np.mean(ap_k)
    return out, all_ranks


@st.composite
def retrieval_problems(draw):
    """Small problems with many exact score ties and several positives per query."""
    num_q = draw(st.integers(1, 40))
    num_g = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = np.array(DISCRETE_VALUES, np.float32)
    query_emb = rng.choice(values, size=(num_q, dim))
    if draw(st.booleans()):
        # Few distinct gallery rows -> whole groups of identical scores.
        base = rng.choice(values, size=(draw(st.integers(1, 3)), dim))
        gallery_emb = base[rng.integers(0, len(base), num_g)]
    else:
        gallery_emb = rng.choice(values, size=(num_g, dim))
    num_keys = draw(st.integers(1, 6))
    query_keys = rng.integers(0, num_keys + 1, num_q)  # key num_keys may be absent
    gallery_keys = rng.integers(0, num_keys, num_g)
    chunk_size = draw(st.integers(1, num_g + 3))
    query_block = draw(st.integers(1, num_q + 3))
    return query_emb.astype(np.float32), gallery_emb.astype(np.float32), query_keys, gallery_keys, chunk_size, query_block


# ----------------------------------------------------------------------------
# Property tests.
# ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(problem=retrieval_problems(), map_k=st.sampled_from([None, 1, 3, 7]))
def test_metrics_match_bruteforce(problem, map_k):
    query_emb, gallery_emb, query_keys, gallery_keys, chunk_size, query_block = problem
    ks = (1, 5, 10)
    got = retrieval_metrics(
        query_emb, gallery_emb, query_keys, gallery_keys,
        ks=ks, map_k=map_k, chunk_size=chunk_size, query_block=query_block,
    )
    want, want_ranks = reference_metrics(query_emb, gallery_emb, query_keys, gallery_keys, ks, map_k)
    ranks = positive_ranks(
        query_emb, gallery_emb, query_keys, gallery_keys, chunk_size=chunk_size, query_block=query_block
    )
    assert len(ranks) == len(want_ranks)
    for r, w in zip(ranks, want_ranks):
        np.testing.assert_array_equal(r, w)
    assert got["num_queries"] == want["num_queries"]
    assert got["num_queries_without_positive"] == want["num_queries_without_positive"]
    for key, value in want.items():
        if want["num_queries"]:
            assert got[key] == pytest.approx(value, abs=1e-6), key
    if want["num_queries"] == 0:
        assert all(math.isnan(got[k]) for k in ("R@1", "mAP", "MRR", "nDCG@10", "median_rank"))


@settings(max_examples=30, deadline=None)
@given(problem=retrieval_problems(), k=st.integers(1, 45))
def test_top_k_matches_full_sort_with_ties(problem, k):
    query_emb, gallery_emb, _, _, chunk_size, query_block = problem
    scores, indices = chunked_top_k(query_emb, gallery_emb, k, chunk_size=chunk_size, query_block=query_block)
    order, full = reference_order(query_emb, gallery_emb)
    k_eff = min(k, gallery_emb.shape[0])
    assert indices.shape == scores.shape == (query_emb.shape[0], k_eff)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices, order[:, :k_eff])
    np.testing.assert_allclose(scores, np.take_along_axis(full, order[:, :k_eff], 1), atol=1e-6)


# ----------------------------------------------------------------------------
# chunked_top_k on continuous embeddings, chunk/k edge cases.
# ----------------------------------------------------------------------------


def _normalised(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("num_g", "chunk_size", "k"),
    [
        (96, 32, 10),  # chunk divides G
        (100, 32, 10),  # ragged last chunk
        (100, 7, 100),  # k == G
        (50, 16, 80),  # k > G: clipped to G
        (50, 500, 5),  # one chunk larger than G
        (1, 4, 3),  # single gallery item
    ],
)
@pytest.mark.parametrize("as_jax", [False, True])
def test_top_k_matches_full_matrix(num_g, chunk_size, k, as_jax):
    rng = np.random.default_rng(num_g * 1000 + chunk_size)
    query_emb, gallery_emb = _normalised(rng, 37, 16), _normalised(rng, num_g, 16)
    full = query_emb.astype(np.float64) @ gallery_emb.astype(np.float64).T
    want = np.argsort(-full, axis=1, kind="stable")[:, : min(k, num_g)]
    args = (jnp.asarray(query_emb), jnp.asarray(gallery_emb)) if as_jax else (query_emb, gallery_emb)
    scores, indices = chunked_top_k(*args, k, chunk_size=chunk_size, query_block=8)
    np.testing.assert_array_equal(indices, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), atol=1e-5)


def test_top_k_ties_prefer_lower_index_across_chunks():
    gallery_emb = np.ones((10, 2), np.float32)  # all scores equal
    _, indices = chunked_top_k(np.ones((1, 2), np.float32), gallery_emb, 4, chunk_size=3)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3]])


# ----------------------------------------------------------------------------
# Errors, exclusions, helpers.
# ----------------------------------------------------------------------------


def test_empty_gallery_raises():
    query_emb, gallery_emb = np.ones((3, 4), np.float32), np.zeros((0, 4), np.float32)
    with pytest.raises(ValueError, match="empty gallery"):
        chunked_top_k(query_emb, gallery_emb, 5)
    with pytest.raises(ValueError, match="empty gallery"):
        positive_ranks(query_emb, gallery_emb, np.arange(3), np.arange(0))
    with pytest.raises(ValueError, match="empty gallery"):
        retrieval_metrics(query_emb, gallery_emb, np.arange(3), np.arange(0))


def test_bad_inputs_raise():
    q, g = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="dims differ"):
        chunked_top_k(q, np.ones((4, 2), np.float32), 1)
    with pytest.raises(ValueError, match="non-finite"):
        chunked_top_k(q, np.full((4, 3), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="integers"):
        retrieval_metrics(q, g, np.array([0.5, 1.0]), np.arange(4))


def test_queries_without_positive_are_excluded_and_counted():
    # Gallery scores for query 0 are [1, 0, -1]; query 1 has the same
    # embedding. Query 2's key 9 is absent from the gallery.
    gallery_emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    query_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    got = retrieval_metrics(query_emb, gallery_emb, [0, 1, 9], [1, 0, 1], ks=(1, 2), map_k=1)
    # Query 0: positive at rank 2. Query 1: positives at ranks 1 and 3.
    assert got["num_queries"] == 2
    assert got["num_queries_without_positive"] == 1
    assert got["R@1"] == pytest.approx(0.5)
    assert got["R@2"] == pytest.approx(1.0)
    assert got["MRR"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["mAP"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)
    assert got["mAP@1"] == pytest.approx((0 + 1) / 2)
    assert got["median_rank"] == pytest.approx(1.5)
    ndcg_q1 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert got["nDCG@10"] == pytest.approx((1 / np.log2(3) + ndcg_q1) / 2)

    none = retrieval_metrics(query_emb, gallery_emb, [7, 8, 9], [1, 0, 1])
    assert none["num_queries"] == 0 and none["num_queries_without_positive"] == 3
    assert math.isnan(none["R@1"]) and math.isnan(none["mAP"])


def test_keys_from_strings_first_appearance_order():
    keys = keys_from_strings(["red mug", "blue mug", "red mug", "", "blue mug"])
    np.testing.assert_array_equal(keys, [0, 1, 0, 2, 1])
    assert keys.dtype == np.int64
    assert keys_from_strings([]).shape == (0,)


def test_two_way_retrieval_runs_both_directions():
    rng = np.random.default_rng(3)
    image_emb, text_emb = _normalised(rng, 12, 8), _normalised(rng, 20, 8)
    image_keys, text_keys = rng.integers(0, 5, 12), rng.integers(0, 5, 20)
    got = two_way_retrieval(image_emb, text_emb, image_keys, text_keys, ks=(1, 5), chunk_size=6)
    i2t = retrieval_metrics(image_emb, text_emb, image_keys, text_keys, ks=(1, 5), chunk_size=6)
    t2i = retrieval_metrics(text_emb, image_emb, text_keys, image_keys, ks=(1, 5), chunk_size=6)
    assert got == {**{f"i2t/{k}": v for k, v in i2t.items()}, **{f"t2i/{k}": v for k, v in t2i.items()}}
    assert i2t != t2i  # directions are genuinely different problems


# ----------------------------------------------------------------------------
# Bounded memory.
# ----------------------------------------------------------------------------


def test_compiled_step_memory_is_independent_of_gallery_size():
    small = chunk_step_memory_bytes(256, 20_000, 64, 10, chunk_size=4096)
    large = chunk_step_memory_bytes(256, 200_000, 64, 10, chunk_size=4096)
    assert small == large
    # The step holds a [256, 4096] score block (4 MiB) plus small operands,
    # not a [256, G] matrix (20 MiB at G=20k, 195 MiB at G=200k).
    assert max(large.values()) < 16 * 2**20
    # ... and it does respond to the chunk size, so the measurement is live.
    bigger_chunk = chunk_step_memory_bytes(256, 200_000, 64, 10, chunk_size=16384)
    assert bigger_chunk["score"] > 3 * large["score"]


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from prodclip.evaluate.ranking import chunked_top_k
    from prodclip.evaluate.retrieval import retrieval_metrics

    mode, num_g = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((256, 64), dtype=np.float32)
    gallery = rng.standard_normal((num_g, 64), dtype=np.float32)

    def naive(q, g, k):
        values, index = jax.lax.top_k(jnp.dot(q, g.T), k)
        return np.asarray(values), np.asarray(index)

    def ranks(q, g):
        keys = np.arange(len(g)) % 5000  # 4 to 40 positives per query
        return retrieval_metrics(q, g, np.arange(len(q)), keys, chunk_size=4096)

    run = {
        "chunked": lambda q, g: chunked_top_k(q, g, 10, chunk_size=4096),
        "ranks": ranks,
        "naive": lambda q, g: naive(q, g, 10),
    }[mode]
    def peak_rss_kib():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

    run(queries, gallery[:8192])  # compile + allocator warm-up, same step shapes
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = peak_rss_kib()  # gallery already resident
    run(queries, gallery)
    print(json.dumps({"growth_kib": peak_rss_kib() - base, "base_kib": base}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_bounded_as_gallery_grows_10x():
    # ru_maxrss is unusable here: Linux carries the parent's (pytest + jax)
    # peak across fork/exec, so the child reads pytest's peak, not its own.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cases = [(mode, g) for mode in ("chunked", "ranks", "naive") for g in (20_000, 200_000)]
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-c", _RSS_SCRIPT, case[0], str(case[1])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for case in cases
    }
    growth_mib = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        growth_mib[case] = json.loads(out.strip().splitlines()[-1])["growth_kib"] / 1024
    print(f"peak RSS growth MiB: {growth_mib}")
    # Going 20k -> 200k adds 44 MiB of embeddings (excluded: resident before
    # the baseline). A [256, G] score matrix would add 176 MiB more, a single
    # float32 gallery copy 44 MiB. 24 MiB covers allocator/thread noise (seen
    # up to ~13 MiB) plus the O(G) int64 key arrays of the "ranks" mode (~8 MiB).
    for mode in ("chunked", "ranks"):
        small, large = growth_mib[(mode, 20_000)], growth_mib[(mode, 200_000)]
        assert large - small < 24, (mode, growth_mib)
    # Negative control: the same measurement does see a materialised Q x G.
    assert growth_mib[("naive", 200_000)] - growth_mib[("naive", 20_000)] > 100, growth_mib
