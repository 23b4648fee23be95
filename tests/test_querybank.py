"""Querybank normalisation (evaluate/querybank.py): the densities, the exact inner-product form, and a
hub that steals a query under the raw cosine and loses it once normalised."""

import numpy as np
import pytest

from prodclip.evaluate import querybank, retrieval


def unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_densities_are_the_mean_of_the_k_highest_cosines_to_the_bank():
    rng = np.random.default_rng(0)
    gallery, bank = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(30, 5)))
    expected = np.sort(gallery @ bank.T, axis=1)[:, -4:].mean(axis=1)
    np.testing.assert_allclose(querybank.densities(gallery, bank, 4), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="eval.querybank_k"):
        querybank.densities(gallery, bank[:3], 4)


def test_extra_column_gives_the_normalised_score_exactly():
    rng = np.random.default_rng(1)
    queries, gallery = unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(9, 6)))
    density = rng.uniform(0.2, 0.8, size=9)
    q, g = querybank.with_density(queries, gallery, density)
    np.testing.assert_allclose(q @ g.T, queries @ gallery.T - 0.5 * density[None, :], rtol=0, atol=1e-6)


def test_bank_titles_keep_each_title_once_in_first_order():
    assert querybank.bank_titles(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_a_hub_photo_loses_the_query_it_does_not_answer():
    # Photo 0 is a hub: close to the query and to every bank title. Photo 1 is the query's own match, a
    # little further from it by cosine but close to few titles.
    hub, own, other = unit([1.0, 0.0, 0.0]), unit([0.8, 0.6, 0.0]), unit([0.0, 0.0, 1.0])
    images = np.stack([hub, own, other])
    query = unit([0.95, 0.31, 0.0])
    texts = np.stack([unit([1.0, 0.05, 0.0]), query, other])  # text i pairs with image i
    keys = np.arange(3)
    assert float(query @ hub) > float(query @ own)  # the raw cosine ranks the hub first
    bank = unit(np.concatenate([np.tile([1.0, 0.0, 0.0], (20, 1)) + 0.05 * np.random.default_rng(2).normal(size=(20, 3)),
                                unit([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])]))
    raw = retrieval.retrieval_metrics(texts, images, keys, keys, ks=(1,))
    normalised = querybank.normalised_retrieval(images, texts, keys, title_bank=bank, photo_bank=None, k=3, ks=(1,))
    assert raw["R@1"] == pytest.approx(2 / 3)  # query 1 finds the hub
    assert normalised["t2i_bank/R@1"] == pytest.approx(1.0)
    assert not any(name.startswith("i2t_bank/") for name in normalised)  # no photo bank, no i2t


def test_benchmark_pool_agreement_is_one_for_the_whole_gallery_and_drops_for_a_small_pool():
    import importlib
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("querybank")
    rng = np.random.default_rng(3)
    queries, gallery = unit(rng.normal(size=(20, 8))), unit(rng.normal(size=(60, 8)))
    density = rng.uniform(0.0, 1.5, size=60)  # spread wide enough to pull rows from outside a small pool
    assert bench.pool_agreement(queries, gallery, density, pool=60) == 1.0
    assert bench.pool_agreement(queries, gallery, density, pool=10) < 1.0


def _store(path, vectors):
    from prodclip.evaluate import store as store_lib

    store_lib.write_vector_store(path, [vectors], fingerprint="f" * 16, num_items=len(vectors), shard_size=100)
    return store_lib.open_store(path)


def test_store_densities_are_refused_once_the_rows_change_and_removable(tmp_path):
    from prodclip.evaluate import store as store_lib

    rng = np.random.default_rng(4)
    store = _store(tmp_path / "s", unit(rng.normal(size=(150, 8))))
    store_lib.write_querybank(store.path, np.linspace(0, 1, 150), k=3, bank_sha256="0" * 64, bank_titles=9)
    np.testing.assert_allclose(store_lib.open_store(store.path).densities, np.linspace(0, 1, 150), atol=1e-7)
    # The same folder embedded again with other rows: the densities belong to the old rows.
    store_lib.write_shard(store.path, 1, unit(rng.normal(size=(50, 8))), "float32")
    with pytest.raises(store_lib.StoreError, match="querybank.npy"):
        store_lib.open_store(store.path)
    assert store_lib.remove_querybank(store.path) and store_lib.open_store(store.path).densities is None
    assert not store_lib.remove_querybank(store.path)


def test_search_pool_covers_k_beyond_the_pool_size(tmp_path):
    from prodclip import search

    rng = np.random.default_rng(5)
    gallery, query = unit(rng.normal(size=(300, 8))), unit(rng.normal(size=(1, 8)))
    store = _store(tmp_path / "s", gallery)
    density = rng.uniform(0.0, 0.2, size=300).astype(np.float32)
    hits = search.search(store, query, 150, chunk_size=64, index=None, densities=density)[0]
    normalised = (query @ gallery.T)[0] - 0.5 * density
    assert [h["index"] for h in hits] == list(np.argsort(-normalised, kind="stable")[:150])
    np.testing.assert_allclose([h["cosine"] for h in hits], (query @ gallery.T)[0][[h["index"] for h in hits]],
                               atol=1e-6)


def test_search_widens_the_pool_until_a_low_density_row_beyond_it_is_found(tmp_path):
    from prodclip import search

    rng = np.random.default_rng(6)
    gallery, query = unit(rng.normal(size=(400, 8))), unit(rng.normal(size=(1, 8)))
    store = _store(tmp_path / "s", gallery)
    by_cosine = np.argsort(-(query @ gallery.T)[0], kind="stable")
    far = int(by_cosine[search.QUERYBANK_POOL + 40])  # outside the first pool of k + QUERYBANK_POOL rows
    density = np.full(400, 1.6, np.float32)
    density[far] = 0.0
    normalised = (query @ gallery.T)[0] - 0.5 * density
    assert int(np.argmax(normalised)) == far
    from prodclip import index as index_lib

    index_lib.build_index(store.path, "flat")
    for index in (None, index_lib.open_index(store.path)):  # the exact scan, and a FAISS index
        hits = search.search(store, query, 10, chunk_size=64, index=index, densities=density)[0]
        assert [h["index"] for h in hits] == list(np.argsort(-normalised, kind="stable")[:10])
    # The first pool alone misses it: this is what the widening is for.
    cosines, rows = search.top_k(store.shards, query, 10 + search.QUERYBANK_POOL)
    assert far not in set(rows[0].tolist())


def test_the_pool_stops_widening_at_its_cap(monkeypatch):
    from prodclip import search

    rng = np.random.default_rng(7)
    gallery, query = unit(rng.normal(size=(1000, 8))), unit(rng.normal(size=(1, 8)))
    density = np.full(1000, 1.9, np.float32)
    density[0] = 0.0  # one outlier keeps the bound loose: without a cap the pool would grow to the store
    cos = (query @ gallery.T)[0]
    asked = []

    def find(_, n):
        asked.append(n)
        rows = np.argsort(-cos, kind="stable")[:n][None, :]
        return cos[rows], rows

    monkeypatch.setattr(search, "QUERYBANK_MAX_POOL", 300)
    cosines, rows = search.querybank_candidates(find, query, 5, density, len(gallery))
    assert asked == [105, 210, 300] and rows.shape == (1, 300)
    monkeypatch.setattr(search, "QUERYBANK_MAX_POOL", 5000)
    asked.clear()
    cosines, rows = search.querybank_candidates(find, query, 5, density, len(gallery))
    assert asked[-1] > 300  # uncapped, it widens past 300 rows, to the exact order
    normalised = cosines[0] - 0.5 * density[rows[0]]
    assert set(rows[0][np.argsort(-normalised)[:5]]) == set(np.argsort(-(cos - 0.5 * density))[:5])


def test_normalised_scores_lower_a_class_prompt_that_lies_close_to_many_bank_photos():
    rng = np.random.default_rng(3)
    prompts = np.stack([unit([1.0, 0.0, 0.0]), unit([0.6, 0.8, 0.0])])  # prompt 0 is the hub class
    photo = unit([0.9, 0.43, 0.0])[None, :]
    bank = unit(np.tile([1.0, 0.0, 0.0], (30, 1)) + 0.05 * rng.normal(size=(30, 3)))
    scores = querybank.normalised_scores(photo, prompts, bank, 5)
    expected = photo @ prompts.T - 0.5 * np.sort(prompts @ bank.T, axis=1)[:, -5:].mean(axis=1)[None, :]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert int(np.argmax(photo @ prompts.T)) == 0 and int(np.argmax(scores)) == 1
