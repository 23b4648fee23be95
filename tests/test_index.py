"""FAISS index over an embedding store: exact kinds match the exact scan, approximate kinds reach
their recall on clustered vectors, stale indexes are refused, compressed stores stay within bounds."""

import json

import numpy as np
import pytest

from prodclip import cli, errors, search
from prodclip import index as index_lib
from prodclip.evaluate import store as store_lib
from prodclip.evaluate import store_codec


def clustered_vectors(n: int, dim: int, clusters: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """[n, dim] unit vectors from a mixture of Gaussian clusters on the sphere (embedding-like neighbourhoods)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_store(path, vectors, dtype="float32", fingerprint="f" * 16, shard_size=1000):
    store_lib.write_vector_store(path, [vectors], fingerprint=fingerprint, num_items=len(vectors),
                                 shard_size=shard_size, dtype=dtype)
    return store_lib.open_store(path)


def test_flat_index_equals_exact_scan(tmp_path):
    vectors = clustered_vectors(2500, 32, 20, seed=0)
    store = make_store(tmp_path / "s", vectors)
    queries = clustered_vectors(40, 32, 20, seed=1)
    index_lib.build_index(store.path, "flat")
    index = index_lib.open_index(store.path)
    assert index.kind == "flat" and len(index) == 2500
    scores, rows = index.search(queries, 10)
    ref = queries @ vectors.T  # numpy reference
    ref_rows = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_rows, axis=1), atol=1e-5)
    np.testing.assert_array_equal(rows, ref_rows)
    # and the project's exact chunked scan agrees
    exact_scores, exact_rows = search.top_k(store.shards, queries, 10, chunk_size=512)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    np.testing.assert_array_equal(rows, exact_rows)
    e_scores, e_rows = index_lib.exact_top_k(store, queries, 10, chunk=700)
    np.testing.assert_array_equal(e_rows, ref_rows)


@pytest.mark.parametrize("kind,floor", [("ivf-flat", 0.95), ("ivf-sq8", 0.9), ("ivf-pq", 0.9), ("hnsw", 0.95)])
def test_approximate_index_recall_on_clustered_vectors(tmp_path, kind, floor):
    vectors = clustered_vectors(6000, 64, 60, seed=2)
    store = make_store(tmp_path / "s", vectors, shard_size=4096)
    index_lib.build_index(store.path, kind, target_recall=0.95)
    index = index_lib.open_index(store.path)
    meta = index_lib.index_meta(store.path)
    assert meta["kind"] == kind and meta["fingerprint"] == "f" * 16
    assert meta["calibrated_recall_at_10"] >= 0.95 or meta["breadth"] in (meta["nlist"], 1024)
    queries = index_lib.calibration_queries(store, 200, seed=7)  # held-out noise draw, not the calibration's
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    scores, rows = index.search(queries, 10)
    assert (rows >= 0).all() and rows.shape == (200, 10)
    assert index_lib.recall_at_k(rows, truth) >= floor
    # scores are cosines: each returned score equals its row's exact inner product (quantised kinds
    # re-scored or within their code error)
    exact = np.take_along_axis(queries @ vectors.T, rows, axis=1)
    np.testing.assert_allclose(scores, exact, atol={"ivf-sq8": 0.02, "ivf-pq": 1e-5}.get(kind, 1e-5))


def test_rescore_with_exact_store_vectors(tmp_path):
    vectors = clustered_vectors(3000, 32, 30, seed=3)
    store = make_store(tmp_path / "s", vectors)
    index_lib.build_index(store.path, "ivf-pq")
    index = index_lib.open_index(store.path)
    queries = index_lib.calibration_queries(store, 100, seed=9)
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    plain = index_lib.recall_at_k(index.search(queries, 10, rescore=0, breadth=index.meta["nlist"])[1], truth)
    rescored = index_lib.recall_at_k(index.search(queries, 10, rescore=8, breadth=index.meta["nlist"])[1], truth)
    assert rescored > plain and rescored >= 0.95


def test_search_uses_the_index_and_stale_indexes_are_refused(tmp_path, monkeypatch):
    vectors = clustered_vectors(1500, 32, 10, seed=4)
    store = make_store(tmp_path / "s", vectors)
    queries = clustered_vectors(3, 32, 10, seed=5)
    exact = search.search(store, queries, 5, index=None)
    assert cli.main(["index", "--store", str(store.path), "--kind", "flat"]) == 0
    calls = []
    original = index_lib.Index.search
    monkeypatch.setattr(index_lib.Index, "search", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    hits = search.search(store, queries, 5)
    assert calls and [[h["index"] for h in q] for q in hits] == [[h["index"] for h in q] for q in exact]
    np.testing.assert_allclose([[h["score"] for h in q] for q in hits], [[h["score"] for h in q] for q in exact],
                               atol=1e-5)
    # the store re-embedded by another model: the old index is refused, not used
    header = json.loads((store.path / "store.json").read_text())
    (store.path / "store.json").write_text(json.dumps({**header, "fingerprint": "0" * 16}))
    with pytest.raises(errors.StoreError, match="rebuild it with `prodclip index"):
        index_lib.open_index(store.path)
    (store.path / "store.json").write_text(json.dumps(header))
    with pytest.raises(errors.StoreError, match="model loaded now"):
        index_lib.open_index(store.path, fingerprint="1" * 16)
    with pytest.raises(errors.StoreError, match="not one of"):
        index_lib.build_index(store.path, "lsh")
    assert index_lib.open_index(tmp_path / "no-index-here") is None


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compressed_store_round_trip_error_bounds(tmp_path, dtype):
    vectors = clustered_vectors(700, 64, 7, seed=6)
    store = make_store(tmp_path / dtype, vectors, dtype=dtype, shard_size=256)
    assert store.dtype == dtype
    assert (tmp_path / dtype / "shards" / "emb_00000.npy").stat().st_size < 256 * 64 * (2 if dtype == "float16" else 1) + 200
    back = np.concatenate([np.asarray(s) for s in store.shards])
    if dtype == "float16":
        bound = np.abs(vectors) * 2.0 ** -11 + 2.0 ** -25  # half an ulp; subnormals below 2**-14
    else:
        bound = (np.abs(vectors).max(axis=1, keepdims=True) / 127.0) / 2 + 1e-7
    assert (np.abs(back - vectors) <= bound).all()
    assert np.abs(back - vectors).max() > 0  # really compressed
    queries = clustered_vectors(20, 64, 7, seed=8)
    cos_error = np.abs(queries @ back.T - queries @ vectors.T).max()
    assert cos_error <= np.sqrt(64) * float(bound.max())
    # store.rows and the chunked scan read the same dequantised values
    np.testing.assert_array_equal(store.rows([699, 3, 300]), back[[699, 3, 300]])
    _, rows = search.top_k(store.shards, queries, 5, chunk_size=100)
    np.testing.assert_array_equal(rows, np.argsort(-(queries @ back.T), axis=1, kind="stable")[:, :5])
    assert store_codec.bytes_per_item(dtype, 256) == {"float16": 512, "int8": 260}[dtype]
