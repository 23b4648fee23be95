"""Embedding store, search and zero-shot pieces, and an end-to-end train -> embed -> search run through the CLI."""

import json
import logging
import pathlib

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from prodclip import cli, search
from prodclip import run as run_lib
from prodclip.models import factory
from prodclip.evaluate import store as store_lib
from prodclip.evaluate import suite, zeroshot

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny model that memorises a 256-item catalog in 64 steps (~20 s on 2 cores).
TINY = [
    "--config.data.num_train=256", "--config.data.num_val=32", "--config.data.num_test=32",
    "--config.data.num_compositional=32", "--config.data.image_size=32", "--config.data.augment=False",
    "--config.model.image.patch_size=8", "--config.model.image.depth=1", "--config.model.text.depth=1",
    "--config.model.image.width=64", "--config.model.text.width=64", "--config.model.embed_dim=32",
    "--config.model.image.num_heads=2", "--config.model.text.num_heads=2",
    "--config.train.batch_size=64", "--config.train.num_steps=64", "--config.optim.warmup_steps=8",
    "--config.optim.learning_rate=3e-3", "--config.train.log_every=32", "--config.train.eval_every=0",
    "--config.train.progress_bar=False", "--config.eval.batch_size=64", "--config.tokenizer.vocab_size=300",
]
# Fraction of exact-title queries whose top hit carries that title. The trained tiny model
# reaches 0.98 (mix store, 0.9 image + 0.1 title); an untrained one 0.05.
EXACT_TITLE_TOP1 = 0.8


def _exact_title_top1(store, graphdef, params, tokenizer) -> float:
    queries = search.encode_text_queries(graphdef, params, tokenizer, store.titles)
    hits = search.search(store, queries, k=1, chunk_size=64)
    return float(np.mean([h[0]["title"] == title for h, title in zip(hits, store.titles)]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("search") / "run"
    assert cli.main(["train", "--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(workdir),
                     *TINY]) == 0
    return workdir


def test_train_embed_search_through_cli(trained_run, tmp_path, capsys, caplog):
    workdir, out = trained_run, tmp_path / "store"
    assert (workdir / "confusion" / "test_category.png").stat().st_size > 1000

    # 256 items in shards of 100: three shards, the last one short.
    embed = ["embed", "--workdir", str(workdir), "--out", str(out), "--split", "train",
             "--config.embed.shard_size=100"]
    assert cli.main(embed) == 0
    shards = sorted((out / "shards").glob("emb_*.npy"))
    assert [len(np.load(s)) for s in shards] == [100, 100, 56]
    header = json.loads((out / "store.json").read_text())
    assert header["num_items"] == 256 and header["mode"] == "mix" and header["image_weight"] == 0.9

    # Resume: only the missing shard is recomputed, and it comes back identical.
    middle = np.load(shards[1])
    first_mtime = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    assert cli.main(embed) == 0
    np.testing.assert_allclose(np.load(shards[1]), middle, atol=1e-6)
    assert shards[0].stat().st_mtime_ns == first_mtime
    # Different settings into the same store are refused, not mixed.
    capsys.readouterr()
    assert cli.main([*embed[:-1], "--config.embed.shard_size=64"]) == 2
    assert "shard_size" in capsys.readouterr().err

    store = store_lib.open_store(out)
    title = store.titles[7]
    capsys.readouterr()
    assert cli.main(["search", title, "--store", str(out), "--workdir", str(workdir), "-k", "5", "--json",
                     "--html", str(tmp_path / "r.html"), "--png", str(tmp_path / "r.png")]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert title in [h["title"] for h in hits]  # top-1 is checked over all 256 titles below
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "no image" not in page
    assert (tmp_path / "r.png").stat().st_size > 1000

    # Exact titles find their own item, for the trained model ...
    run = run_lib.load_run(workdir, splits=["train"])
    config, graphdef, params, tokenizer, sources = run.config, run.graphdef, run.params, run.tokenizer, run.sources
    trained_rate = _exact_title_top1(store, graphdef, params, tokenizer)
    assert trained_rate >= EXACT_TITLE_TOP1

    # ... and not for an untrained one: the check can fail.
    _, fresh = factory.create_model(config, tokenizer, seed=123)
    store_lib.embed_catalog(graphdef, fresh, sources["train"], tokenizer, config, tmp_path / "fresh",
                            split="train", workdir=workdir, progress=False)
    fresh_store = store_lib.open_store(tmp_path / "fresh")
    assert _exact_title_top1(fresh_store, graphdef, fresh, tokenizer) < EXACT_TITLE_TOP1

    # A store from another model: a clear error, no traceback.
    capsys.readouterr()
    assert cli.main(["search", title, "--store", str(tmp_path / "fresh"), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "embedded by model" in err and "Traceback" not in err

    # A query longer than the context length is truncated with a warning, and still answered.
    long_query = " ".join([title] * 4)
    with caplog.at_level(logging.WARNING, logger="prodclip"):
        assert cli.main(["search", long_query, "--store", str(out), "--workdir", str(workdir), "-k", "1"]) == 0
    assert "truncated to the context length" in caplog.text

    # An image query: a catalog image finds its own item; a broken file is a clear error.
    from PIL import Image

    Image.fromarray(sources["train"][7]["image"]).save(tmp_path / "q.png")
    capsys.readouterr()
    assert cli.main(["search", "--image", str(tmp_path / "q.png"), "--store", str(out), "--workdir", str(workdir),
                     "--json", "-k", "5"]) == 0
    assert 7 in [h["index"] for h in json.loads(capsys.readouterr().out)]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert cli.main(["search", "--image", str(tmp_path / "bad.jpg"), "--store", str(out),
                     "--workdir", str(workdir)]) == 2
    assert "cannot be used" in capsys.readouterr().err

    # An empty split to embed is a clear error.
    assert cli.main(["embed", "--workdir", str(workdir), "--out", str(tmp_path / "empty"), "--split", "test",
                     "--config.data.num_test=0"]) == 2
    assert "no items" in capsys.readouterr().err

    # eval runs on another dataset the pipeline reads, by overrides, with readable class names.
    assert cli.main(["eval", "--workdir", str(workdir), "--config.data.eval_splits=test",
                     "--config.data.num_test=16", "--config.data.seed=5",
                     "--config.eval.class_names=colour:grey=grey|gray,pattern:dotted=polka dot"]) == 0
    again = json.loads((workdir / "reeval.json").read_text())
    assert again["test"]["num_items"] == 16 and "compositional" not in again
    assert 0.0 <= again["test"]["zeroshot/colour/top1"] <= 1.0


def test_embed_with_querybank_stores_densities_that_text_search_subtracts(trained_run, tmp_path, capsys):
    from prodclip.data import pipeline
    from prodclip.evaluate import querybank

    workdir, out = trained_run, tmp_path / "qb_store"
    embed = ["embed", "--workdir", str(workdir), "--out", str(out), "--split", "val", "--config.embed.querybank_k=5"]
    assert cli.main(embed) == 0
    assert "querybank: 32 densities against" in capsys.readouterr().out
    store = store_lib.open_store(out)
    # The densities are the store rows' mean top-5 cosine to the run's own distinct train titles.
    run = run_lib.load_run(workdir, splits=["train"])
    bank = search.encode_text_queries(run.graphdef, run.params, run.tokenizer,
                                      querybank.bank_titles(pipeline.source_titles(run.sources["train"])))
    rows = np.concatenate([r for _, r in store.iter_rows()])
    want = np.sort(rows @ bank.T, axis=1)[:, -5:].mean(axis=1)
    np.testing.assert_allclose(store.densities, want, rtol=0, atol=1e-5)

    # A text query ranks by cosine - 0.5 * density; an image query by the cosine alone.
    title = store.titles[3]
    capsys.readouterr()
    assert cli.main(["search", title, "--store", str(out), "--workdir", str(workdir), "-k", "32", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    query = search.encode_text_queries(run.graphdef, run.params, run.tokenizer, [title])[0]
    normalised = rows @ query - 0.5 * want
    assert [h["index"] for h in hits] == list(np.argsort(-normalised, kind="stable"))
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(normalised)[::-1], atol=1e-5)
    plain = search.search(store, query[None], 32, chunk_size=64)[0]
    assert [h["index"] for h in plain] == list(np.argsort(-(rows @ query), kind="stable"))
    assert [h["index"] for h in plain] != [h["index"] for h in hits]  # the densities change the order

    # Unchanged: the densities are not recomputed; damaged: a one-line error naming the file.
    mtime = (out / store_lib.QUERYBANK).stat().st_mtime_ns
    assert cli.main(embed) == 0
    assert (out / store_lib.QUERYBANK).stat().st_mtime_ns == mtime
    np.save(out / store_lib.QUERYBANK, np.zeros(32, np.float32))
    capsys.readouterr()
    assert cli.main(["search", title, "--store", str(out), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert store_lib.QUERYBANK in err and "Traceback" not in err


# ----------------------------------------------------------------------------- units


def _brute_top_k(queries, gallery, k):
    scores = queries @ gallery.T
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("split_at", [(300,), (7, 150, 151), ()])
def test_top_k_over_shards_matches_brute_force(split_at):
    rng = np.random.default_rng(0)
    # Values on a coarse grid make many exact ties, across shard boundaries too.
    gallery = rng.integers(-2, 3, size=(400, 8)).astype(np.float32)
    gallery[200:210] = gallery[0]
    queries = rng.integers(-2, 3, size=(13, 8)).astype(np.float32)
    shards = np.split(gallery, split_at)
    scores, index = search.top_k(shards, queries, k=25, chunk_size=32)
    want_scores, want_index = _brute_top_k(queries, gallery, 25)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_top_k_empty_gallery_is_a_clear_error():
    with pytest.raises(store_lib.StoreError, match="empty gallery"):
        search.top_k([np.zeros((0, 4), np.float32)], np.ones((1, 4), np.float32), k=3)


def test_product_vectors_mix():
    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(2, 5, 6)).astype(np.float32)
    got = store_lib.product_vectors(image, text, "mix", 0.9)
    want = 0.9 * image + 0.1 * text
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(store_lib.product_vectors(image, text, "image", 0.3),
                               image / np.linalg.norm(image, axis=1, keepdims=True), atol=1e-6)


def test_class_embeddings_ensemble_synonyms_and_templates():
    rng = np.random.default_rng(2)
    vocab = {}

    def encode(prompts):
        out = np.stack([vocab.setdefault(p, rng.normal(size=4)) for p in prompts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    templates = ("a {}", "{} item")
    got = zeroshot.class_embeddings(encode, ["grey|gray", "red"], templates)
    grey = encode(["a grey", "grey item", "a gray", "gray item"]).mean(axis=0)
    red = encode(["a red", "red item"]).mean(axis=0)
    want = np.stack([grey / np.linalg.norm(grey), red / np.linalg.norm(red)])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_parse_class_names_and_renames():
    parsed = zeroshot.parse_class_names(["colour:grey=grey|gray", "category:tee = t-shirt"])
    assert parsed == {"colour": {"grey": "grey|gray"}, "category": {"tee": "t-shirt"}}
    assert zeroshot.prompt_names(["red", "grey"], parsed["colour"], "colour") == ["red", "grey|gray"]
    with pytest.raises(ValueError, match="label:raw value=readable"):  # ConfigError is a ValueError
        zeroshot.parse_class_names(["colour-grey"])
    with pytest.raises(ValueError, match="valid: red, blue"):
        zeroshot.prompt_names(["red", "blue"], {"gery": "grey"}, "colour")


def test_classify_and_confusion_against_sklearn(tmp_path):
    rng = np.random.default_rng(3)
    image_emb = rng.normal(size=(60, 5)).astype(np.float32)
    class_emb = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(-1, 6, size=60)
    out = zeroshot.classify(image_emb, class_emb, labels, ks=(1, 5))
    keep = labels >= 0
    predicted = np.argmax(image_emb[keep] @ class_emb.T, axis=1)
    truth = labels[keep]
    counts = sk_confusion_matrix(truth, predicted, labels=range(6))
    np.testing.assert_array_equal(zeroshot.confusion_matrix(image_emb, class_emb, labels), counts)
    assert out["top1"] == pytest.approx(np.mean(predicted == truth))
    top5 = np.argsort(-(image_emb[keep] @ class_emb.T), axis=1)[:, :5]
    assert out["top5"] == pytest.approx(np.mean([t in row for t, row in zip(truth, top5)]))
    for c in np.unique(truth):
        assert out[f"class/{c}"] == pytest.approx(counts[c, c] / counts[c].sum())
    assert out["mean_per_class"] == pytest.approx(np.mean([counts[c, c] / counts[c].sum() for c in np.unique(truth)]))
    png = zeroshot.plot_confusion(counts, [f"c{i}" for i in range(6)], tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Rows:
    def __init__(self, ids, titles):
        self.ids, self.titles = np.asarray(ids), titles

    def __len__(self):
        return len(self.titles)


def test_retrieval_keys_product_id_or_title():
    keys, rule = suite.retrieval_keys(_Rows([5, 9, 5, 7], ["a", "b", "c", "b"]))
    assert rule == "product_id" and keys[0] == keys[2] and len(set(keys[[0, 1, 3]])) == 3
    keys, rule = suite.retrieval_keys(_Rows([1, 2, 3], ["a", "b", "a"]))
    assert rule == "title" and keys[0] == keys[2] != keys[1]


def test_chunked_top_k_sharded_over_devices_matches_brute_force():
    import jax

    from prodclip.evaluate import ranking

    assert jax.local_device_count() == 8  # tests/conftest.py
    sharding = ranking.query_sharding(16)
    assert sharding is not None and len(sharding.device_set) == 8
    assert ranking.query_sharding(13) is None  # rows not divisible: one device
    rng = np.random.default_rng(4)
    gallery = rng.integers(-2, 3, size=(500, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(40, 8)).astype(np.float32)
    for block in (16, 13):
        scores, index = ranking.chunked_top_k(queries, gallery, 12, chunk_size=64, query_block=block)
        want_scores, want_index = _brute_top_k(queries, gallery, 12)
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
