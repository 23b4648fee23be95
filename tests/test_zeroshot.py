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


def softmax_rows(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def imbalanced_images(rng, shares, n=3000, noise=0.35):
    """Unit class vectors (the first C axes of 8) and n images drawn with the class `shares`, each its
    class vector plus Gaussian noise, L2-normalised: ([n, 8], [C, 8], [n] labels)."""
    class_emb = np.eye(len(shares), 8)
    labels = rng.choice(len(shares), size=n, p=shares)
    images = class_emb[labels] + noise * rng.normal(size=(n, 8))
    return images / np.linalg.norm(images, axis=1, keepdims=True), class_emb, labels


def test_estimate_class_prior_recovers_the_shares_of_unlabelled_images():
    rng = np.random.default_rng(0)
    shares = np.array([0.7, 0.2, 0.1])
    images, class_emb, _ = imbalanced_images(rng, shares)
    prior = zeroshot.estimate_class_prior(images @ class_emb.T, logit_scale=20.0)
    np.testing.assert_allclose(prior, shares, atol=0.03)
    # Balanced images keep a balanced prior.
    images, class_emb, _ = imbalanced_images(rng, np.full(3, 1 / 3))
    np.testing.assert_allclose(zeroshot.estimate_class_prior(images @ class_emb.T, 20.0), 1 / 3, atol=0.03)


def test_estimate_class_prior_is_the_em_fixed_point():
    rng = np.random.default_rng(1)
    scores, scale = rng.uniform(-1, 1, size=(400, 6)), 10.0
    prior = zeroshot.estimate_class_prior(scores, scale, tol=1e-12, max_iter=20000)
    assert prior.sum() == pytest.approx(1.0, abs=1e-12) and (prior >= 0).all()
    posterior = softmax_rows(zeroshot.adapted_scores(scores, scale, prior))
    np.testing.assert_allclose(posterior.mean(axis=0), prior, atol=1e-9)


def test_adapted_scores_correct_a_classifier_that_assumes_balanced_classes():
    rng = np.random.default_rng(2)
    images, class_emb, labels = imbalanced_images(rng, np.array([0.85, 0.1, 0.05]), noise=0.9)
    scores = images @ class_emb.T
    plain = zeroshot.classify_scores(scores, labels)
    prior = zeroshot.estimate_class_prior(scores, 20.0)
    adapted = zeroshot.classify_scores(zeroshot.adapted_scores(scores, 20.0, prior), labels)
    np.testing.assert_allclose(zeroshot.adapted_scores(scores, 20.0, prior), 20.0 * scores + np.log(prior))
    assert plain == zeroshot.classify(images, class_emb, labels)
    assert adapted["top1"] > plain["top1"] + 0.02


def test_zeroshot_split_adds_prior_adapted_metrics_only_when_asked():
    rng = np.random.default_rng(3)
    images, class_emb, labels = imbalanced_images(rng, np.array([0.85, 0.1, 0.05]), n=600, noise=0.9)
    labels[:7] = -1  # unlabelled photos still count towards the estimated shares
    table = {name: vector for name, vector in zip(("mug", "tee", "cap"), class_emb)}
    source = types.SimpleNamespace(label_names={"kind": ("mug", "tee", "cap")}, labels={"kind": labels})
    config = config_lib.base_config()
    config.eval.zeroshot_labels = ("kind",)
    config.eval.prompt_templates = ("{}",)
    plain = suite.zeroshot_split(images, source, fake_encoder(table), config, logit_scale=20.0)
    assert not [k for k in plain if "/adapted/" in k]
    config.eval.zeroshot_adapt_prior = True
    both = suite.zeroshot_split(images, source, fake_encoder(table), config, logit_scale=20.0)
    scores = images @ class_emb.T
    expect = zeroshot.classify_scores(
        zeroshot.adapted_scores(scores, 20.0, zeroshot.estimate_class_prior(scores, 20.0)), labels)
    for name in ("top1", "mean_per_class", "weighted_f1"):
        assert both[f"zeroshot/kind/adapted/{name}"] == pytest.approx(expect[name])
        assert both[f"zeroshot/kind/{name}"] == pytest.approx(plain[f"zeroshot/kind/{name}"])
    assert both["zeroshot/kind/adapted/top1"] > both["zeroshot/kind/top1"]
    assert not [k for k in both if "/train_prior/" in k]


def test_zeroshot_split_classifies_with_the_train_photos_shares_when_given_them():
    rng = np.random.default_rng(4)
    shares = np.array([0.85, 0.1, 0.05])
    images, class_emb, labels = imbalanced_images(rng, shares, n=600, noise=0.9)
    train_images, _, _ = imbalanced_images(rng, shares, n=2000, noise=0.9)
    table = {name: vector for name, vector in zip(("mug", "tee", "cap"), class_emb)}
    source = types.SimpleNamespace(label_names={"kind": ("mug", "tee", "cap")}, labels={"kind": labels})
    config = config_lib.base_config()
    config.eval.zeroshot_labels = ("kind",)
    config.eval.prompt_templates = ("{}",)
    config.eval.zeroshot_train_prior = True
    without_train = suite.zeroshot_split(images, source, fake_encoder(table), config, logit_scale=20.0)
    assert not [k for k in without_train if "/train_prior/" in k]
    metrics = suite.zeroshot_split(images, source, fake_encoder(table), config, logit_scale=20.0,
                                   train_image_emb=train_images)
    prior = zeroshot.estimate_class_prior(train_images @ class_emb.T, 20.0)
    # The shares come from the train photos alone: the eval photos, classified one by one, do not move them.
    expect = zeroshot.classify_scores(zeroshot.adapted_scores(images @ class_emb.T, 20.0, prior), labels)
    for name in ("top1", "mean_per_class", "weighted_f1"):
        assert metrics[f"zeroshot/kind/train_prior/{name}"] == pytest.approx(expect[name])
    assert metrics["zeroshot/kind/train_prior/top1"] > metrics["zeroshot/kind/top1"] + 0.02
    # Shares from a train split of another mix (mostly caps) pull the same photos elsewhere.
    caps, _, _ = imbalanced_images(rng, np.array([0.05, 0.1, 0.85]), n=2000, noise=0.9)
    other = suite.zeroshot_split(images, source, fake_encoder(table), config, logit_scale=20.0, train_image_emb=caps)
    assert other["zeroshot/kind/train_prior/top1"] < metrics["zeroshot/kind/train_prior/top1"] - 0.05
