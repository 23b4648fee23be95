"""Concat-fusion matcher: forward pass, hard in-batch pairs and BCE against numpy; its term in the train loss.

Tolerance: 1e-5 (float32 against float64 numpy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_finetune import tiny_config as finetune_config

from prodclip.models import inference
from prodclip import config_checks, losses, train
from prodclip.models import matcher as matcher_lib
from prodclip.models import two_tower

B, D = 6, 4


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_matcher(params, u, v):
    x = np.concatenate([u, v, np.abs(u - v), u * v], axis=1).astype(np.float64)
    for layer in params["hidden"].values():
        x = np.maximum(x @ layer["kernel"] + layer["bias"], 0)
    return (x @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]


def numpy_bce(logits, labels):
    return np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))


def hardest(scores, is_positive):
    """Index of the highest score among non-positives (0 when all are positives), by brute force."""
    candidates = [j for j in range(len(scores)) if not is_positive[j]]
    return max(candidates, key=lambda j: scores[j]) if candidates else 0


def numpy_pairs(u, v, positives):
    sims = u @ v.T
    image_rows = (list(range(B)) + list(range(B)) + [hardest(sims[:, j], positives[:, j]) for j in range(B)]
                  + list(range(B)))
    text_rows = (list(range(B)) + [hardest(sims[i], positives[i]) for i in range(B)] + list(range(B))
                 + [(i + 1) % B for i in range(B)])
    image_rows, text_rows = np.array(image_rows), np.array(text_rows)
    return image_rows, text_rows, positives[image_rows, text_rows].astype(np.float64)


@pytest.fixture(scope="module")
def matcher():
    m = matcher_lib.ConcatMatcher(D, hidden=5, depth=2, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.split(m, nnx.Param)[1].to_pure_dict())
    params = jax.tree.map(lambda x: x + np.random.default_rng(1).normal(0, 0.3, x.shape).astype(np.float32), params)
    nnx.update(m, nnx.State(params))
    return m, params


def test_matcher_forward_and_loss_match_numpy(matcher):
    m, params = matcher
    rng = np.random.default_rng(0)
    u, v = unit_rows(rng, B, D), unit_rows(rng, B, D)
    np.testing.assert_allclose(np.asarray(m(u, v)), numpy_matcher(params, u, v), atol=1e-5)
    positives = np.eye(B, dtype=bool)
    positives[0, 3] = positives[3, 0] = True  # a duplicate title: never picked as a negative
    positives[4, 5] = positives[5, 4] = True  # a duplicate next row: its "random negative" is a positive
    image_rows, text_rows, labels = numpy_pairs(u, v, positives)
    got = matcher_lib.hard_negative_pairs(jnp.asarray(u), jnp.asarray(v), jnp.asarray(positives))
    np.testing.assert_array_equal(got[0], image_rows)
    np.testing.assert_array_equal(got[1], text_rows)
    np.testing.assert_array_equal(got[2], labels)
    assert labels[:B].all() and not labels[B:3 * B].any()
    assert labels[3 * B:].tolist() == [0, 0, 0, 0, 1, 0]  # next-row partners; only 4 -> 5 is a duplicate
    expected = numpy_bce(numpy_matcher(params, u[image_rows], v[text_rows]), labels)
    assert float(matcher_lib.matcher_loss(m, u, v, positives)) == pytest.approx(expected, rel=1e-5)


def test_all_positive_row_gets_a_positive_label(matcher):
    m, _ = matcher
    rng = np.random.default_rng(2)
    positives = np.ones((B, B), bool)
    _, _, labels = matcher_lib.hard_negative_pairs(unit_rows(rng, B, D), unit_rows(rng, B, D), positives)
    assert np.asarray(labels).all()


def test_train_loss_adds_the_weighted_matcher_term_and_itm_fn_scores_pairs():
    config = finetune_config()
    config.model.embed_dim = D
    config.model.matcher.update(dict(kind="concat", hidden=5))
    config.loss.matcher_weight = 0.5
    config_checks.validate(config)
    model = two_tower.build_model(config, vocab_size=30, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()
    assert "matcher" in params
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, (B, 8)).astype(np.int32)
    ids[1] = ids[4]  # identical titles: positives for both losses
    batch = {"images": rng.integers(0, 256, (B, 16, 16, 3)).astype(np.uint8), "token_ids": ids,
             "ids": np.arange(B)}
    loss, grads = jax.jit(train.make_loss_and_grads(config, graphdef))(params, batch)
    out = model(jnp.asarray(batch["images"]), jnp.asarray(batch["token_ids"]))
    positives = np.asarray(losses.batch_positives(batch))
    assert positives[1, 4] and positives.sum() == B + 2
    contrastive = losses.softmax_contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                                  positives=positives)
    matched = matcher_lib.matcher_loss(model.matcher, out["image_emb"], out["text_emb"], positives)
    assert float(loss) == pytest.approx(float(contrastive) + 0.5 * float(matched), rel=1e-5)
    assert float(matched) > 0.1
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["matcher"]))

    itm_fn = inference.matcher_itm_fn(graphdef, params)
    prob = np.asarray(itm_fn(batch["images"], batch["token_ids"]))
    expected = jax.nn.sigmoid(model.matcher(out["image_emb"], out["text_emb"]))
    assert prob.shape == (B,) and ((prob > 0) & (prob < 1)).all()
    np.testing.assert_allclose(prob, np.asarray(expected), atol=1e-6)
