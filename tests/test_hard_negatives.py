"""Attribute-swapped titles as hard negatives (loss.hard_negatives): the loss against a numpy reference,
the swapped titles, the cached-feature batches that carry them, and a whole run.

Tolerance: the loss rtol 1e-6 against float64 numpy (float32 dot products of unit vectors).
The sharded and pmap steps with the term are compared with one device in tests/test_parallel.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prodclip import config as config_lib, image_cache, losses, text_cache, train
from prodclip.evaluate import pairs
from test_image_cache import CONTEXT, tiny_config


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_matches_numpy_and_ignores_masked_rows():
    rng = np.random.default_rng(0)
    img, txt, neg = (unit(rng.normal(size=(6, 5))).astype(np.float32) for _ in range(3))
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    scale = 7.0
    pos_cos, neg_cos = np.sum(img * txt, -1, dtype=np.float64), np.sum(img * neg, -1, dtype=np.float64)
    want = np.sum(mask * np.log1p(np.exp(scale * (neg_cos - pos_cos)))) / 6
    got = float(losses.hard_negative_loss(img, txt, neg, mask, jnp.float32(scale)))
    assert got == pytest.approx(want, rel=1e-6)
    changed = neg.copy()
    changed[~mask] = txt[~mask]  # a masked row's negative does not count, whatever it is
    assert float(losses.hard_negative_loss(img, txt, changed, mask, scale)) == pytest.approx(got, rel=1e-6)
    # The gradient raises the own title's cosine and lowers the negative's.
    d_txt, d_neg = jax.grad(lambda t, n: losses.hard_negative_loss(img, t, n, mask, scale), argnums=(0, 1))(txt, neg)
    assert np.all(np.sum(np.asarray(d_txt) * img, -1)[mask] < 0) and np.all(np.sum(np.asarray(d_neg) * img, -1)[mask] > 0)
    assert np.all(np.asarray(d_neg)[~mask] == 0)


def swap_sampler():
    titles = ["Men Red Shirt", "Men Blue Shirt", "Women Red Shirt", "Men Red Shirt slim", "Women Black Heels",
              "Women Black Heels", "Men Green Cap"]
    labels = {"type": np.array([0, 0, 0, 0, 1, 1, 2]), "colour": np.array([0, 1, 0, 0, 2, 2, 3]),
              "gender": np.array([0, 0, 1, 0, 1, 1, 0])}
    names = {"colour": ("Red", "Blue", "Black", "Green"), "gender": ("Men", "Women")}
    return pairs.NegativeSampler(titles, labels, names, type_label="type", swap_labels=("colour", "gender")), labels


def test_swapped_titles_are_same_type_one_attribute_off_and_seeded():
    sampler, labels = swap_sampler()
    negatives = pairs.swapped_titles(sampler, 3, seed=0)
    assert negatives == pairs.swapped_titles(sampler, 3, seed=0)
    assert len(negatives) == len(sampler.titles)
    assert sorted(negatives[0]) == ["Men Blue Shirt", "Women Red Shirt"]  # not "Men Red Shirt slim": same colour, gender
    for i, row in enumerate(negatives):
        assert len(row) == len(set(row)) <= 3
        for title in row:
            assert pairs.title_key(title) != pairs.title_key(sampler.titles[i])
            if title in sampler.titles:
                j = sampler.titles.index(title)
                assert labels["type"][j] == labels["type"][i]
                assert labels["colour"][j] != labels["colour"][i] or labels["gender"][j] != labels["gender"][i]
    # Heels: the only other same-type title is identical, so the title is edited ("Black" or "Women" replaced).
    assert negatives[4] and all(t != "Women Black Heels" for t in negatives[4])
    assert pairs.swapped_titles(sampler, 1, seed=0)[1] in (["Men Red Shirt"], ["Men Red Shirt slim"])


def test_feature_rows_carry_negatives_and_mask_shortened_titles():
    n = 6
    features = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    title_views = [[f"t{i} full" for i in range(n)], [f"t{i}" for i in range(n)]]
    negatives = [[f"n{i}a", f"n{i}b"] for i in range(n - 1)] + [[]]
    rows = image_cache.FeatureRows(features, title_views, np.arange(n), short_title_prob=0.5,
                                   negative_titles=negatives)
    assert rows[5]["negative_title"] == "t5 full" and not rows[5]["has_negative"]
    with pytest.raises(ValueError, match="differ in length"):
        image_cache.FeatureRows(features, title_views, np.arange(n), negative_titles=negatives[:5])
    vocab = {}

    def tokenize(titles):
        return np.asarray([[vocab.setdefault(t, len(vocab) + 1)] + [0] * (CONTEXT - 1) for t in titles], np.int32)

    it = image_cache.train_iterator(rows, tokenize, tiny_config(**{"train.batch_size": 3}))
    names = {v: k for k, v in vocab.items()}
    drawn = set()
    for _ in range(20):  # 10 epochs
        batch = next(it)
        names = {v: k for k, v in vocab.items()}
        for row, neg, mask, complete in zip(batch["ids"], batch["negative_token_ids"][:, 0], batch["negative_mask"],
                                            batch["title_complete"]):
            name = names[int(neg)]
            assert mask == (complete and row != 5)
            assert name in negatives[row] or (row == 5 and name == "t5 full")
            drawn.add(name)
    assert {f"n{i}{s}" for i in range(5) for s in "ab"} <= drawn  # each epoch draws one of a row's negatives


def test_text_cache_replaces_negative_ids_with_embeddings():
    ids = np.arange(12, dtype=np.int32).reshape(4, 3)
    emb = np.arange(8, dtype=np.float32).reshape(4, 2)
    cache = text_cache.TextCache(ids, {"text_emb": emb})
    out = cache.attach({"token_ids": ids[[0, 1]], "negative_token_ids": ids[[3, 2]], "negative_mask": np.ones(2, bool)})
    assert "negative_token_ids" not in out
    np.testing.assert_array_equal(out["negative_text_emb"], emb[[3, 2]])
    np.testing.assert_array_equal(out["text_emb"], emb[[0, 1]])


def test_config_needs_cached_image_features():
    with pytest.raises(config_lib.ConfigError, match="hard_negatives"):
        tiny_config(**{"loss.hard_negatives": 2, "optim.lock_image": False})
    with pytest.raises(config_lib.ConfigError, match="hard_negatives"):
        tiny_config(**{"loss.hard_negatives": 2, "train.grad_accum_steps": 2})
    with pytest.raises(config_lib.ConfigError, match="hard_negative"):
        tiny_config(**{"loss.hard_negatives": -1})
    tiny_config(**{"loss.hard_negatives": 2})


def test_run_trains_with_hard_negatives_from_the_catalog_labels(tmp_path, caplog):
    c = tiny_config(**{"data.num_train": 48, "data.num_val": 16, "data.num_test": 16, "data.eval_splits": ("test",),
                       "data.image_size": 32, "model.image.patch_size": 16, "train.batch_size": 16,
                       "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 0,
                       "train.progress_bar": False, "eval.batch_size": 16, "eval.zeroshot_labels": (),
                       "eval.confusion_png": False, "tokenizer.vocab_size": 200, "checkpoint.async_save": False,
                       "optim.lock_text": True, "loss.hard_negatives": 2})
    c.lock()
    with caplog.at_level("INFO", logger="prodclip"):
        results = train.train_and_evaluate(c, tmp_path / "run")
    assert results["train_steps"] == 4
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hard negatives")]
    have = int(line.split()[2])
    assert 0 < have <= 48

    bad = c.copy_and_resolve_references()
    bad.match.type_label = "no_such_label"
    with pytest.raises(config_lib.ConfigError, match="no_such_label"):
        train.train_and_evaluate(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written before the check
