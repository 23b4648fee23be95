"""The fusion encoder on locked, cached towers: pooled image tokens, the token states the feature caches
keep, the ITM rows option, and the cached train step against the step that runs the towers.

Tolerances:
* pooling and cached states against the towers: float32, rtol 1e-6; the caches' float16 tokens
  against the float32 states: atol 2e-3 * max|state| (float16 has an 11-bit significand);
* train steps (cached vs towers, 8 devices vs 1): as tests/test_parallel.py, losses rtol 1e-5,
  params rtol 1e-4, atol 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multihost_worker import tiny_batch, tiny_config
from test_fusion import batch_with_short_titles, build, run_steps

from prodclip import image_cache, itm, parallel, text_cache, train
from prodclip.config import ConfigError
from prodclip.models import fusion, inference

LOCKED = {"model.fusion.enabled": True, "model.fusion.width": 16, "model.fusion.depth": 1,
          "model.fusion.num_heads": 2, "optim.lock_image": True, "optim.lock_text": True, "data.augment": False,
          "data.image_size": 32, "model.fusion.image_grid": 2}


def test_pool_image_tokens_is_the_mean_of_each_block():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 36, 5)).astype(np.float32)  # a 6 x 6 map, row-major
    grid = tokens.reshape(2, 6, 6, 5)
    want = grid.reshape(2, 3, 2, 3, 2, 5).mean(axis=(2, 4)).reshape(2, 9, 5)
    np.testing.assert_allclose(fusion.pool_image_tokens(jnp.asarray(tokens), 3), want, rtol=1e-6)
    assert np.asarray(fusion.pool_image_tokens(jnp.asarray(tokens), 3))[0, 1] == pytest.approx(
        grid[0, :2, 2:4].mean(axis=(0, 1)), rel=1e-6)  # block (0, 1): rows 0-1, columns 2-3
    np.testing.assert_array_equal(fusion.pool_image_tokens(jnp.asarray(tokens), 0), tokens)
    with pytest.raises(ValueError, match="image_grid=4"):
        fusion.pool_image_tokens(jnp.asarray(tokens), 4)


@pytest.mark.parametrize("overrides,message", [
    ({"model.fusion.image_grid": 3}, "valid: \\[1, 2, 4\\]"),  # a ViT at 32 px, patch 8: a 4 x 4 map
    ({"model.fusion.itm_rows": 33}, "itm_rows"),
    ({"model.fusion.image_grid": -1}, "image_grid"),
])
def test_config_rejects_bad_grids_and_rows(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{**LOCKED, **overrides})


def test_itm_rows_pairs_the_first_rows_with_negatives_from_the_whole_batch():
    """Row i's only allowed negative text is column b - 1 - i: with num_rows=n every draw is known,
    most of them beyond the first n columns."""
    b, n = 8, 3
    positives = np.ones((b, b), bool)
    for i in range(b):
        positives[i, b - 1 - i] = False
    seen = {}

    def score_pairs(img, txt, valid, pair_itc):  # tokens carry their row number
        seen["image"], seen["text"] = np.asarray(img[:, 0, 0]), np.asarray(txt[:, 0, 0])
        return jnp.zeros((img.shape[0], 2))

    rows = jnp.arange(b, dtype=jnp.float32)[:, None, None]
    loss, metrics = itm.itm_loss(jax.random.key(0), jnp.zeros((b, b)), jnp.asarray(positives),
                                 jnp.broadcast_to(rows, (b, 2, 1)), jnp.broadcast_to(rows, (b, 3, 1)),
                                 jnp.ones((b, 3), bool), score_pairs, num_rows=n)
    first = list(range(n))
    np.testing.assert_array_equal(seen["image"], first + first + [b - 1 - t for t in first])
    np.testing.assert_array_equal(seen["text"], first + [b - 1 - i for i in first] + first)
    assert float(metrics["itm_positives"]) == n and float(metrics["itm_negatives"]) == 2 * n
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)

    # Swapped titles (tokens 100 + row): image r with its own, label 0, only where the mask is set.
    mask = np.array([True, False, True] + [True] * (b - n))
    swapped = itm.SwappedTitles(jnp.broadcast_to(rows + 100.0, (b, 3, 1)), jnp.ones((b, 3), bool),
                                jnp.asarray(mask), jnp.zeros(b))

    def match_own_titles(img, txt, valid, pair_itc):  # "match" exactly when the title is the image's own
        seen["image"], seen["text"] = np.asarray(img[:, 0, 0]), np.asarray(txt[:, 0, 0])
        own = img[:, 0, 0] == txt[:, 0, 0]
        return jnp.stack([jnp.where(own, 0.0, 5.0), jnp.where(own, 5.0, 0.0)], axis=-1)

    loss, metrics = itm.itm_loss(jax.random.key(0), jnp.zeros((b, b)), jnp.asarray(positives),
                                 jnp.broadcast_to(rows, (b, 2, 1)), jnp.broadcast_to(rows, (b, 3, 1)),
                                 jnp.ones((b, 3), bool), match_own_titles, num_rows=n, swapped=swapped)
    np.testing.assert_array_equal(seen["image"][3 * n:], first)
    np.testing.assert_array_equal(seen["text"][3 * n:], [100.0 + r for r in first])
    assert float(metrics["itm_swapped"]) == 2 and float(metrics["itm_negatives"]) == 2 * n + 2
    assert float(metrics["itm_swapped_accuracy"]) == 1.0 and float(metrics["itm_accuracy"]) == 1.0
    assert float(loss) == pytest.approx(np.logaddexp(0.0, -5.0), rel=1e-5)  # every pair right by 5 nats


def cached_batch(config, graphdef, params, seed, token_dtype=np.float32):
    """tiny_batch with the locked towers' outputs in place of images (image_cache / text_cache batches)."""
    batch = batch_with_short_titles(config, graphdef, params, seed)
    image, text = inference.token_state_encoders(graphdef)
    features, tokens = image(params, batch["images"])
    text_emb, text_tokens = text(params, batch["token_ids"])
    return {"token_ids": batch["token_ids"], "ids": batch["ids"], "title_complete": batch["title_complete"],
            "image_features": np.asarray(features), "image_tokens": np.asarray(tokens, token_dtype),
            "text_emb": np.asarray(text_emb), "text_tokens": np.asarray(text_tokens, token_dtype)}


def assert_same(got, want, what, keys=("loss", "contrastive_loss", "itm_loss", "grad_norm")):
    (params, history), (ref_params, ref_history) = got, want
    for step, (a, b) in enumerate(zip(history, ref_history)):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (what, step, key)
        assert a["itm_positives"] == b["itm_positives"] and a["itm_negatives"] == b["itm_negatives"]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def with_swapped(batch_fn):
    """batch_fn's batches plus an attribute-swapped title per row (another row's title), a third without."""
    def make(config, graphdef, params, seed):
        plain = batch_with_short_titles(config, graphdef, params, seed)
        rng = np.random.default_rng(seed + 100)
        negative_ids = plain["token_ids"][rng.permutation(len(plain["ids"]))]
        batch = batch_fn(config, graphdef, params, seed)
        batch.update(negative_token_ids=negative_ids, negative_mask=rng.random(len(negative_ids)) > 0.33)
        if "text_emb" in batch:  # the text cache's rows of the swapped titles
            emb, states = inference.token_state_encoders(graphdef)[1](params, negative_ids)
            batch.update(negative_text_emb=np.asarray(emb), negative_text_tokens=np.asarray(states))
        return batch
    return make


@pytest.mark.parametrize("swapped", [False, True], ids=["plain", "swapped_titles"])
def test_cached_fusion_step_equals_the_tower_step_and_shards(swapped):
    """Locked towers: the step on cached features and token states equals the step that runs the towers
    on the same images and titles, on 1 device and on a (4, 2) mesh, with ITM on 12 of 32 rows; with
    loss.hard_negatives, the swapped titles' ITM pairs and contrastive term too."""
    extra = {"model.fusion.itm_rows": 12, **({"loss.hard_negatives": 1} if swapped else {})}
    config = tiny_config(**LOCKED, **extra)
    one = parallel.make_mesh(config, devices=jax.devices()[:1])
    towers = run_steps(config, one, batch_fn=with_swapped(batch_with_short_titles) if swapped else
                       batch_with_short_titles)
    cached = run_steps(config, one, batch_fn=with_swapped(cached_batch) if swapped else cached_batch)
    first = cached[1][0]
    assert 0 < first["itm_swapped"] <= 12 if swapped else "itm_swapped" not in first
    assert first["itm_positives"] <= 12 and first["itm_negatives"] <= 24 + first.get("itm_swapped", 0)
    # grad_norm differs: the tower step also differentiates the locked towers (the optimizer drops it).
    assert_same(cached, towers, "cached vs towers", keys=("loss", "contrastive_loss", "itm_loss"))
    sharded = tiny_config(**LOCKED, **extra, **{"parallel.mesh_shape": (4, 2)})
    assert_same(run_steps(sharded, parallel.make_mesh(sharded),
                          batch_fn=with_swapped(cached_batch) if swapped else cached_batch), cached, "8 devices")
    if swapped:
        return
    # The cached tokens are read: other tokens give another ITM loss, the same contrastive loss.
    def reversed_tokens(*args):
        batch = cached_batch(*args)
        return {**batch, "image_tokens": batch["image_tokens"][::-1]}
    shuffled = run_steps(config, one, num_steps=1, batch_fn=reversed_tokens)
    assert shuffled[1][0]["itm_loss"] != pytest.approx(cached[1][0]["itm_loss"], rel=1e-4)
    assert shuffled[1][0]["contrastive_loss"] == pytest.approx(cached[1][0]["contrastive_loss"], rel=1e-6)


def test_text_cache_keeps_token_states_and_drops_stale_ones(tmp_path):
    config = tiny_config(**LOCKED)
    graphdef, params = build(config)
    encode = inference.token_state_encoders(graphdef)[1]
    ids = tiny_batch(config, 0)["token_ids"][:10]
    cache = text_cache.build_or_load(tmp_path, ids, lambda t: encode(params, t), 4, pad_id=0, names=("text_emb", "text_tokens"))
    want_emb, want_states = map(np.asarray, encode(params, ids))
    batch = cache.attach({"token_ids": ids})
    np.testing.assert_allclose(batch["text_emb"], want_emb, rtol=1e-5, atol=1e-6)
    valid = ids != 0  # padding positions are cut before the tower runs; the fusion encoder never reads them
    scale = np.abs(want_states).max()
    np.testing.assert_allclose(batch["text_tokens"][valid], want_states[valid], atol=2e-3 * scale)
    assert batch["text_tokens"].dtype == np.float16 and batch["text_tokens"].shape == want_states.shape
    # Extending the cache without token states removes them, so they are never read against other rows.
    more = tiny_batch(config, 1)["token_ids"][:4]
    text_cache.build_or_load(tmp_path, more, lambda t: encode(params, t)[0], 4, pad_id=0)
    assert not (tmp_path / "text_tokens.npy").exists()
    again = text_cache.build_or_load(tmp_path, np.concatenate([ids, more]), lambda t: encode(params, t), 4,
                                     pad_id=0, names=("text_emb", "text_tokens"))
    assert len(again.arrays["text_tokens"]) == len(again.token_ids) == len(np.unique(np.concatenate([ids, more]), axis=0))


def test_image_cache_keeps_pooled_tokens_under_its_own_key(tmp_path):
    """With a fusion encoder the cache holds each view's pooled tokens (float16) next to its features, in
    another directory than the same run without fusion (whose cache has no tokens)."""
    from prodclip.data import synthetic

    config = tiny_config(**LOCKED, **{"train.image_cache_views": 2, "eval.batch_size": 4})
    graphdef, params = build(config)
    source = synthetic.make_catalog("train", 6, seed=0, image_size=32)
    tokenizer = lambda titles: np.zeros((len(titles), config.tokenizer.context_length), np.int32)  # noqa: E731
    cached = image_cache.for_run(config, tmp_path, graphdef, params, tokenizer, source)
    assert cached["features"].shape[:2] == cached["tokens"].shape[:2] == (2, 6)
    assert cached["tokens"].shape[2] == 4 and cached["tokens"].dtype == np.float16  # 4 x 4 map pooled to 2 x 2
    images = np.stack([source[i]["image"] for i in range(6)])
    features, tokens = map(np.asarray, inference.token_state_encoders(graphdef)[0](params, images))
    np.testing.assert_allclose(cached["features"][0], features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached["tokens"][0], tokens, atol=2e-3 * np.abs(tokens).max())
    assert not np.allclose(cached["tokens"][1], cached["tokens"][0], atol=1e-2)  # view 1 is augmented
    rows = image_cache.FeatureRows(cached["features"], [f"t{i}" for i in range(6)], np.arange(6),
                                   tokens=cached["tokens"])
    item = rows.with_random_view(rows[2], np.random.default_rng(1))
    view = [v for v in range(2) if np.array_equal(item["features"], cached["features"][v, 2])]
    np.testing.assert_array_equal(item["image_tokens"], cached["tokens"][view[0], 2])  # the same view's tokens
    batch = next(image_cache.train_iterator(rows, tokenizer, tiny_config(**LOCKED, **{"train.batch_size": 3})))
    assert batch["image_tokens"].shape == (3, 4, cached["tokens"].shape[-1])

    plain = tiny_config(**{**LOCKED, "model.fusion.enabled": False, "train.image_cache_views": 2})
    plain_graphdef, plain_params = build(plain)
    key = image_cache.cache_key(params["image_tower"], config, image_cache.catalog_digest(source))
    assert key != image_cache.cache_key(plain_params["image_tower"], plain, image_cache.catalog_digest(source))
    assert "tokens" not in image_cache.for_run(plain, tmp_path, plain_graphdef, plain_params, tokenizer, source)


def test_run_with_fusion_on_cached_towers_reranks(tmp_path):
    """A whole run on the cached path: both caches keep token states, ITM pairs only itm_rows rows,
    and evaluation re-ranks with the fusion encoder on the towers' live states."""
    import json

    from test_image_cache import tiny_config as cache_config

    c = cache_config(**{"data.num_train": 48, "data.num_val": 16, "data.num_test": 16, "data.eval_splits": ("test",),
                        "data.image_size": 32, "train.batch_size": 16, "train.num_steps": 4, "train.log_every": 1,
                        "train.eval_every": 0, "train.progress_bar": False, "eval.batch_size": 16,
                        "eval.zeroshot_labels": (), "eval.confusion_png": False, "tokenizer.vocab_size": 200,
                        "checkpoint.async_save": False, "optim.lock_text": True, "model.fusion.enabled": True,
                        "model.fusion.width": 16, "model.fusion.depth": 1, "model.fusion.num_heads": 2,
                        "model.fusion.image_grid": 2, "model.fusion.itm_rows": 8, "eval.rerank_k": 4})
    c.lock()
    results = train.train_and_evaluate(c, tmp_path / "run")
    assert results["test"]["t2i/rerank/k"] == 4 and 0.0 <= results["test"]["t2i/rerank/R@1"] <= 1.0
    assert len(list((tmp_path / "run" / "image_cache").glob("*/tokens.npy"))) == 1
    assert len(list((tmp_path / "run" / "text_cache").glob("*/text_tokens.npy"))) == 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    positives = [m["train/itm_positives"] for m in logged if "train/itm_positives" in m]
    assert len(positives) == 4 and all(0 < p <= 8 for p in positives)
