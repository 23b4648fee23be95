"""Image feature cache: keyed by weights, preprocessing and catalog; cached steps equal image steps; the
locked tower is bitwise unchanged; a whole run trains on cached features and evaluates on images.

Tolerance: losses rtol 1e-5 and params after 3 steps atol 1e-5 (the cached features come from another
jit with another batch size, so they differ from the in-step ones by float noise only).
"""

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from prodclip import config as config_lib, config_checks, config_loading
from prodclip import image_cache, optim, train
from prodclip.data import synthetic
from prodclip.models import factory, two_tower

VOCAB, CONTEXT, BATCH, SIZE = 40, 8, 8, 16


def tiny_config(**overrides):
    """A tiny ViT + text Transformer, the image tower locked, an MLP image head and a linear text head."""
    c = config_lib.base_config()
    c.data.image_size = SIZE
    c.data.augment = False
    c.tokenizer.context_length = CONTEXT
    c.model.embed_dim = 8
    for tower in (c.model.image, c.model.text):
        tower.update(dict(preset="mu", width=16, depth=1, num_heads=2, mlp_ratio=2.0))
    c.model.image.patch_size = 8
    c.model.head.update(dict(image="mlp", text="linear", hidden=16))
    c.optim.update(dict(lock_image=True, warmup_steps=0, learning_rate=1e-2, eps=1e-3))
    c.train.num_steps = 10
    c.eval.batch_size = 5
    for key, value in overrides.items():
        config_loading.set_field(c, key, value)
    config_checks.validate(c)
    return c


def init(config):
    model = two_tower.build_model(config, vocab_size=VOCAB, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, jax.tree.map(np.asarray, params.to_pure_dict())


def batches(num, images):
    rng = np.random.default_rng(1)
    for _ in range(num):
        rows = rng.integers(0, len(images), BATCH)
        ids = rng.integers(4, VOCAB, (BATCH, CONTEXT)).astype(np.int32)
        ids[:, -2:] = 0
        yield rows, {"images": images[rows], "token_ids": ids, "ids": rows.astype(np.int64)}


def train_steps(config, graphdef, params, features=None, num=3):
    images = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE, 3)).astype(np.uint8)
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    step = jax.jit(train.make_train_step(config, graphdef, tx))
    if features is True:  # the cache's rows for these images, from a separate jit with batch eval.batch_size
        encode = jax.jit(lambda p, x: factory.merge_model(graphdef, p).image_features(x))
        features = np.concatenate([np.asarray(encode(params, images[i:i + 6])) for i in (0, 6)])
    losses = []
    for rows, batch in batches(num, images):
        if features is not None:
            batch = {k: v for k, v in batch.items() if k != "images"} | {"image_features": features[rows]}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"])


def test_cached_steps_equal_image_steps_and_the_locked_tower_is_bitwise_unchanged():
    config = tiny_config()
    graphdef, params = init(config)
    cached_losses, cached = train_steps(config, graphdef, params, features=True)
    plain_losses, plain = train_steps(config, graphdef, params)
    np.testing.assert_allclose(cached_losses, plain_losses, rtol=1e-5)
    assert cached_losses[0] != pytest.approx(cached_losses[2], rel=1e-3)  # the heads train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), cached, plain)
    for after in (cached, plain):
        jax.tree.map(np.testing.assert_array_equal, after["image_tower"], params["image_tower"])
        assert not np.array_equal(after["image_head"]["fc1"]["kernel"], params["image_head"]["fc1"]["kernel"])
        assert not np.array_equal(after["text_head"]["linear"]["kernel"], params["text_head"]["linear"]["kernel"])


def test_key_changes_with_weights_preprocessing_and_catalog():
    config = tiny_config()
    _, params = init(config)
    catalog = synthetic.make_catalog("train", 6, seed=0, image_size=32)
    digest = image_cache.catalog_digest(catalog)
    key = image_cache.cache_key(params["image_tower"], config, digest)
    assert key == image_cache.cache_key(jax.tree.map(np.copy, params["image_tower"]), tiny_config(), digest)
    nudged = jax.tree.map(np.copy, params["image_tower"])
    nudged["patch_embed"]["kernel"][0, 0] += 1e-3
    other_catalog = synthetic.make_catalog("train", 6, seed=1, image_size=32)
    changed = {
        "weights": image_cache.cache_key(nudged, config, digest),
        "resize": image_cache.cache_key(params["image_tower"], tiny_config(**{"data.resize": "crop"}), digest),
        "pixel_norm": image_cache.cache_key(params["image_tower"], tiny_config(**{"model.image.pixel_norm": "clip"}),
                                            digest),
        "catalog": image_cache.cache_key(params["image_tower"], config, image_cache.catalog_digest(other_catalog)),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed)
    assert image_cache.cache_key(params["image_tower"], tiny_config(**{"data.image_size": 32}), digest) != key


def test_key_changes_with_the_feature_code_version(monkeypatch):
    config = tiny_config()
    _, params = init(config)
    digest = image_cache.catalog_digest(synthetic.make_catalog("train", 6, seed=0, image_size=32))
    key = image_cache.cache_key(params["image_tower"], config, digest)
    monkeypatch.setattr(image_cache, "FEATURES_VERSION", image_cache.FEATURES_VERSION + 1)
    assert image_cache.cache_key(params["image_tower"], config, digest) != key


def test_build_or_load_recomputes_a_cache_of_another_width(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"features": np.ones((4, 3 + len(calls)), np.float32)}

    assert image_cache.build_or_load(tmp_path, compute, 4)["features"].shape == (4, 4)
    assert image_cache.build_or_load(tmp_path, compute, 4, width=4)["features"].shape == (4, 4)
    assert len(calls) == 1
    assert image_cache.build_or_load(tmp_path, compute, 4, width=5)["features"].shape == (4, 5)
    assert len(calls) == 2


def test_applies_only_with_a_locked_unaugmented_image_tower():
    assert config_lib.image_cache_on(tiny_config())
    assert not config_lib.image_cache_on(tiny_config(**{"optim.lock_image": False}))
    assert not config_lib.image_cache_on(tiny_config(**{"data.augment": True}))
    assert not config_lib.image_cache_on(tiny_config(**{"train.image_cache": "off"}))


def test_build_or_load_reuses_a_complete_cache_and_recomputes_a_short_one(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"features": np.arange(12, dtype=np.float32).reshape(4, 3)}

    first = image_cache.build_or_load(tmp_path, compute, 4)["features"]
    again = image_cache.build_or_load(tmp_path, compute, 4)["features"]
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="expected 5"):
        image_cache.build_or_load(tmp_path, compute, 5)  # the stored 4 rows do not cover 5: recomputed, still 4
    assert len(calls) == 2


def test_run_trains_on_cached_views_and_evaluates_on_images(tmp_path):
    c = tiny_config(**{"data.num_train": 48, "data.num_val": 16, "data.num_test": 16, "data.eval_splits": ("test",),
                       "data.image_size": 32, "model.image.patch_size": 16, "train.batch_size": 16,
                       "train.num_steps": 6, "train.log_every": 3, "train.eval_every": 0,
                       "train.progress_bar": False, "eval.batch_size": 16, "eval.zeroshot_labels": (),
                       "eval.confusion_png": False, "tokenizer.vocab_size": 200, "checkpoint.async_save": False,
                       "train.image_cache_views": 2, "optim.lock_text": True, "train.text_cache_views": 2,
                       "data.title_dropout_prob": 0.5})
    c.lock()
    results = train.train_and_evaluate(c, tmp_path / "run")
    (text_dir,) = list((tmp_path / "run" / "text_cache").iterdir())
    assert len(np.load(text_dir / "token_ids.npy")) > 48  # the titles and their shortened views
    assert results["train_steps"] == 6
    assert 0.0 <= results["test"]["t2i/R@1"] <= results["test"]["t2i/R@10"] <= 1.0
    (cache_dir,) = list((tmp_path / "run" / "image_cache").iterdir())
    assert np.load(cache_dir / "features.npy").shape == (2 * 48, 8)  # the photos, then their augmented views

    # Evaluation reads the train photos' embeddings from that cache: equal to running the tower on them.
    from prodclip import run as run_lib
    from prodclip.models import inference
    run = run_lib.load_run(tmp_path / "run", c, splits=("train",))
    train_source = run.sources["train"]
    cached = image_cache.cached_train_embeddings(c, tmp_path / "run", run.graphdef, run.params, train_source)
    through_tower = inference.embed_images(run.graphdef, run.params, train_source, run.tokenizer, c)
    assert cached.shape == (48, 8)
    np.testing.assert_allclose(cached, through_tower, atol=1e-5)
    # Another preprocessing (here the number of views) has no cache: the caller runs the tower.
    other = copy.deepcopy(c)
    other.train.image_cache_views = 3
    assert image_cache.cached_train_embeddings(other, tmp_path / "run", run.graphdef, run.params, train_source) is None


def test_views_change_the_key_and_steps_read_every_view(tmp_path):
    config = tiny_config()
    graphdef, params = init(config)
    digest = image_cache.catalog_digest(synthetic.make_catalog("train", 6, seed=0, image_size=32))
    one = image_cache.cache_key(params["image_tower"], config, digest)
    assert image_cache.cache_key(params["image_tower"], tiny_config(**{"train.image_cache_views": 3}), digest) != one
    with pytest.raises(config_lib.ConfigError, match="image_cache_views"):
        tiny_config(**{"train.image_cache_views": 0})

    n, views = 6, 3
    features = np.stack([np.full((n, 4), v, np.float32) + np.arange(n)[:, None] * 10 for v in range(views)])
    rows = image_cache.FeatureRows(features, [f"t{i}" for i in range(n)], np.arange(n))
    assert rows.views == 3 and np.array_equal(rows[2]["features"], features[0, 2])
    c = tiny_config(**{"train.batch_size": 3})
    it = image_cache.train_iterator(rows, lambda titles: np.zeros((len(titles), CONTEXT), np.int32), c)
    seen = set()
    for _ in range(12):  # 6 epochs
        batch = next(it)
        for f, i in zip(batch["image_features"], batch["ids"]):
            assert f[1] - 10 * i in (0, 1, 2)  # a view of its own row
            seen.add(int(f[0] - 10 * i))
    assert seen == {0, 1, 2}


def test_title_views_are_drawn_per_row_and_marked_incomplete(tmp_path):
    n = 6
    features = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    title_views = [[f"t{i} full" for i in range(n)], [f"t{i}" for i in range(n)]]
    rows = image_cache.FeatureRows(features, title_views, np.arange(n))
    assert rows[3]["title"] == "t3 full"
    with pytest.raises(ValueError, match="differ in length"):
        image_cache.FeatureRows(features, [title_views[0], title_views[1][:5]], np.arange(n))
    c = tiny_config(**{"train.batch_size": 3})
    seen = []
    it = image_cache.train_iterator(rows, lambda titles: (seen.extend(titles), np.zeros((len(titles), CONTEXT),
                                                                                          np.int32))[1], c)
    completes = []
    for _ in range(12):  # 6 epochs
        batch = next(it)
        completes.extend(batch["title_complete"].tolist())
    assert len(seen) == 36 and {t.split()[0] for t in seen} <= {f"t{i}" for i in range(n)}
    full = [t.endswith("full") for t in seen]
    assert 6 <= sum(full) <= 30 and completes == full  # both views drawn; shortened titles are marked
    with pytest.raises(config_lib.ConfigError, match="text_cache_views"):
        tiny_config(**{"train.text_cache_views": 2, "optim.lock_text": False})
    with pytest.raises(config_lib.ConfigError, match="title_dropout_prob"):
        tiny_config(**{"train.text_cache_views": 2, "optim.lock_text": True})  # would never read a short view
    tiny_config(**{"train.text_cache_views": 2, "optim.lock_text": True, "data.title_dropout_prob": 0.3})
