"""Zero-shot classification and baselines against direct numpy computations."""

import types

import numpy as np
import pytest

from prodclip import config as config_lib
from prodclip.data.pipeline import drop_title_words
from prodclip.evaluate import baselines, suite, zeroshot


def fake_encoder(table):
    def encode(texts):
        out = np.stack([table[t] for t in texts]).astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)
    return encode


def test_class_embeddings_average_synonyms_and_templates():
    rng = np.random.default_rng(0)
    prompts = ["a tee", "tee!", "a t-shirt", "t-shirt!", "a mug", "mug!"]
    table = {p: rng.normal(size=4) for p in prompts}
    emb = zeroshot.class_embeddings(fake_encoder(table), ["tee|t-shirt", "mug"], ["a {}", "{}!"])
    unit = lambda v: v / np.linalg.norm(v)
    expect0 = unit(np.mean([unit(table[p]) for p in prompts[:4]], axis=0))
    expect1 = unit(np.mean([unit(table[p]) for p in prompts[4:]], axis=0))
    np.testing.assert_allclose(emb, np.stack([expect0, expect1]), rtol=1e-6)


def test_classify_matches_numpy():
    rng = np.random.default_rng(1)
    image_emb, class_emb = rng.normal(size=(50, 8)), rng.normal(size=(6, 8))
    labels = rng.integers(-1, 6, size=50)
    out = zeroshot.classify(image_emb, class_emb, labels, ks=(1, 5))
    keep = labels >= 0
    scores = image_emb[keep] @ class_emb.T
    pred = scores.argmax(1)
    assert out["top1"] == pytest.approx(np.mean(pred == labels[keep]))
    top5 = np.argsort(-scores, 1)[:, :5]
    assert out["top5"] == pytest.approx(np.mean([l in t for l, t in zip(labels[keep], top5)]))
    per_class = [np.mean(pred[labels[keep] == c] == c) for c in np.unique(labels[keep])]
    assert out["mean_per_class"] == pytest.approx(np.mean(per_class))
    cm = zeroshot.confusion_matrix(image_emb, class_emb, labels)
    assert cm.sum() == keep.sum() and np.trace(cm) == np.sum(pred == labels[keep])


def test_zeroshot_classes_filters_rare_classes_and_renames():
    config = config_lib.base_config()
    config.eval.min_class_count = 3
    config.eval.class_names = ("kind:Tshirts=t-shirt|tee",)
    source = types.SimpleNamespace(label_names={"kind": ("Mugs", "Tshirts", "Rare")},
                                   labels={"kind": np.array([0, 1, 2, -1, 1])})
    stats = {"kind": {"names": ["Mugs", "Tshirts", "Rare"], "train_counts": [5, 9, 2]}}
    raw, names, labels = suite.zeroshot_classes("kind", source, config, stats)
    assert raw == ["Mugs", "Tshirts"] and names == ["Mugs", "t-shirt|tee"]
    np.testing.assert_array_equal(labels, [0, 1, -1, -1, 1])


def test_chance_majority_and_probe():
    train = np.array([0, 0, 0, 1, 2, -1])
    evals = np.array([0, 1, 1, 2, -1])
    rates = baselines.chance_and_majority(train, evals, 3)
    assert rates["chance/top1"] == pytest.approx(1 / 3)
    assert rates["majority/top1"] == pytest.approx(1 / 4)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    y_train, y_eval = rng.integers(0, 3, 300), rng.integers(0, 3, 100)
    x_train = centres[y_train] + rng.normal(size=(300, 16))
    x_eval = centres[y_eval] + rng.normal(size=(100, 16))
    assert baselines.linear_probe(x_train, y_train, x_eval, y_eval)["linear_probe/top1"] > 0.95
    shuffled = baselines.linear_probe(x_train, rng.permutation(y_train), x_eval, y_eval)
    assert shuffled["linear_probe/top1"] < 0.7  # the probe can fail: labels unrelated to features


def test_drop_title_words_keeps_order_and_at_least_one_word():
    rng = np.random.default_rng(0)
    title = "Puma Men Navy Blue Round Neck T-shirt"
    for _ in range(200):
        short = drop_title_words(title, rng, keep_prob=0.3)
        words = short.split()
        assert 1 <= len(words) <= 7
        positions = [title.split().index(w) for w in words]
        assert positions == sorted(positions)
    assert drop_title_words(title, rng, keep_prob=1.0) == title
