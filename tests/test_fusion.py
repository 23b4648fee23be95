"""Fusion encoder, hard-negative sampler and ITM loss; the fusion train step on 8 fake devices vs 1.

Statistical bound of the sampler test: with the sampler's own fixed keys the test is
deterministic; a correct sampler exceeds the chi-square threshold chi2.ppf(1 - 1e-6, df)
with probability 1e-6 per row (4 rows), and the same counts must exceed it against a 10%
wrong temperature and against uniform sampling (the test can fail).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multihost_worker import VOCAB, tiny_batch, tiny_config
from scipy import stats

from prodclip.models import inference
from prodclip import optim
from prodclip.models import factory
from prodclip import itm, parallel, train
from prodclip.config import ConfigError
from prodclip.models import fusion

FUSION = {"model.fusion.enabled": True, "model.fusion.width": 16, "model.fusion.depth": 1,
          "model.fusion.num_heads": 2}


# ----------------------------------------------------------------------------- sampler


def test_sampler_never_returns_a_positive():
    rng = np.random.default_rng(0)
    b = 48
    positives = rng.random((b, b)) < 0.3
    positives |= np.eye(b, dtype=bool)
    positives[5] = True  # a row with no negative at all
    # Positives get by far the largest logits: any leak through the mask would be drawn.
    logits = np.where(positives, 50.0, rng.normal(size=(b, b))).astype(np.float32)
    sample = jax.jit(itm.sample_hard_negatives)
    for seed in range(20):
        index, has_negative = map(np.asarray, sample(jax.random.key(seed), jnp.asarray(logits), jnp.asarray(positives)))
        assert index[5] == -1 and not has_negative[5]
        rows = np.flatnonzero(has_negative)
        assert len(rows) == b - 1
        assert not positives[rows, index[rows]].any()
        assert np.all((index[rows] >= 0) & (index[rows] < b))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(np.sum((counts - expected) ** 2 / expected))


def test_sampler_frequencies_follow_the_masked_softmax():
    rng = np.random.default_rng(1)
    rows, cols, draws = 4, 10, 50_000
    logits = rng.uniform(-2.0, 2.0, (rows, cols)).astype(np.float32)
    positives = np.zeros((rows, cols), bool)
    for r in range(rows):
        positives[r, rng.choice(cols, size=r + 1, replace=False)] = True
    # Each row repeated `draws` times: every repeat is an independent draw of one key.
    index, _ = itm.sample_hard_negatives(jax.random.key(7), jnp.asarray(np.repeat(logits, draws, axis=0)),
                                         jnp.asarray(np.repeat(positives, draws, axis=0)))
    index = np.asarray(index).reshape(rows, draws)
    for r in range(rows):
        allowed = ~positives[r]
        counts = np.bincount(index[r], minlength=cols)
        assert counts[positives[r]].sum() == 0
        counts = counts[allowed]
        threshold = stats.chi2.ppf(1 - 1e-6, df=allowed.sum() - 1)

        def softmax(x):
            e = np.exp(x - x.max())
            return e / e.sum()
        assert chi_square(counts, softmax(logits[r, allowed].astype(np.float64))) < threshold, r
        # The test has power: a 10% temperature error or uniform sampling is rejected.
        assert chi_square(counts, softmax(1.1 * logits[r, allowed].astype(np.float64))) > threshold, r
        assert chi_square(counts, np.full(allowed.sum(), 1 / allowed.sum())) > threshold, r


# ----------------------------------------------------------------------------- ITM loss


def test_itm_loss_matches_numpy_when_each_draw_is_forced():
    """Each image (and text) has exactly one allowed negative, so the draw is known; the loss is
    checked against a numpy cross-entropy with a hand-made pair scorer."""
    rng = np.random.default_rng(2)
    b, s, length, width = 6, 3, 4, 5
    allowed = np.zeros((b, b), bool)
    for i in range(1, b):
        allowed[i, (i + 1) % b] = True  # image 0 has no negative text; text 1 has no negative image
    positives = ~allowed
    image_tokens = rng.normal(size=(b, s, width)).astype(np.float32)
    text_tokens = rng.normal(size=(b, length, width)).astype(np.float32)
    text_valid = rng.random((b, length)) < 0.7
    text_valid[:, 0] = True

    def score_pairs(img, txt, valid, pair_itc):
        pooled = jnp.sum(txt * valid[..., None], axis=1) / jnp.sum(valid, axis=1, keepdims=True)
        return jnp.stack([jnp.zeros(img.shape[0]), jnp.sum(img.mean(axis=1) * pooled, axis=-1)], axis=-1)

    loss, metrics = itm.itm_loss(jax.random.key(0), jnp.asarray(rng.normal(size=(b, b)).astype(np.float32)),
                                 jnp.asarray(positives), jnp.asarray(image_tokens), jnp.asarray(text_tokens),
                                 jnp.asarray(text_valid), score_pairs)

    def match_logit(i, t):
        pooled = (text_tokens[t] * text_valid[t][:, None]).sum(0) / text_valid[t].sum()
        return float(image_tokens[i].mean(0) @ pooled)
    pairs = [(i, i, 1) for i in range(b)]
    pairs += [(i, (i + 1) % b, 0) for i in range(1, b)]  # each image's only negative text
    pairs += [(t - 1 if t else b - 1, t, 0) for t in range(b) if t != 1]  # each text's only negative image
    ce, correct = [], []
    for i, t, label in pairs:
        two = np.array([0.0, match_logit(i, t)])
        ce.append(np.logaddexp(*two) - two[label])
        correct.append(int(np.argmax(two)) == label)
    assert float(loss) == pytest.approx(np.mean(ce), rel=1e-5)
    assert float(metrics["itm_accuracy"]) == pytest.approx(np.mean(correct))
    assert float(metrics["itm_negatives"]) == 2 * b - 2


def test_shortened_titles_take_no_part_in_itm():
    """Texts flagged not-ok (titles cut by word dropout) form no ITM pair: not their positive, not any
    image's negative, no negative image of their own. The loss is checked against numpy over exactly
    the pairs that remain, with a scorer that sees which (image, text) each pair is."""
    rng = np.random.default_rng(3)
    b = 16
    seen = {}
    weights_out = rng.normal(size=b).astype(np.float32)

    def score_pairs(img, txt, valid, pair_itc):
        seen["image"], seen["text"] = np.asarray(img[:, 0, 0]).astype(int), np.asarray(txt[:, 0, 0]).astype(int)
        seen["itc"] = np.asarray(pair_itc)
        logit = weights_out[seen["image"]] - weights_out[seen["text"]] + 0.1 * seen["text"]
        return jnp.stack([jnp.zeros_like(logit), logit], axis=-1)

    index_tokens = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None], (b, 2, 3))
    for trial in range(20):
        ok = rng.random(b) < 0.5
        positives = rng.random((b, b)) < 0.3
        logits = jnp.asarray(rng.normal(scale=3.0, size=(b, b)).astype(np.float32))
        loss, metrics = itm.itm_loss(jax.random.key(trial), logits, jnp.asarray(positives), index_tokens,
                                     index_tokens, jnp.ones((b, 2), bool), score_pairs, jnp.asarray(ok))
        allowed = ~(positives | np.eye(b, dtype=bool)) & ok[None, :]  # [image, text]
        has_text, has_image = allowed.any(axis=1), allowed.any(axis=0)
        negative_texts = seen["text"][b:2 * b][has_text]
        negative_images = seen["image"][2 * b:][has_image]
        assert ok[negative_texts].all(), "a shortened title was drawn as a negative"
        np.testing.assert_array_equal(seen["itc"], np.asarray(logits)[seen["image"], seen["text"]])
        assert allowed[np.arange(b)[has_text], negative_texts].all()
        assert allowed[negative_images, np.arange(b)[has_image]].all()
        assert not has_image[~ok].any()
        pairs = [(i, i, 1) for i in range(b) if ok[i]]
        pairs += [(i, t, 0) for i, t in zip(np.arange(b)[has_text], negative_texts)]
        pairs += [(i, t, 0) for i, t in zip(negative_images, np.arange(b)[has_image])]
        logit = np.array([weights_out[i] - weights_out[t] + 0.1 * t for i, t, _ in pairs], np.float64)
        labels = np.array([lab for _, _, lab in pairs])
        cross_entropy = np.logaddexp(0.0, logit) - np.where(labels == 1, logit, 0.0)
        assert float(loss) == pytest.approx(cross_entropy.mean(), rel=1e-5)
        assert float(metrics["itm_positives"]) == ok.sum()
        assert float(metrics["itm_negatives"]) == has_text.sum() + has_image.sum()


# ----------------------------------------------------------------------------- model


def build(config):
    return factory.create_model(config, types.SimpleNamespace(vocab_size=VOCAB, pad_id=0), seed=0)


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_itm_head_pooling_matches_numpy(pooling):
    """With no fusion blocks the encoder is dense -> LayerNorm -> pool -> head, checked against numpy
    (1e-5): "first" reads token 0, "mean" averages the valid tokens only."""
    from flax import nnx

    rng = np.random.default_rng(4)
    n, length, wt, wi, w = 3, 5, 6, 4, 8
    encoder = fusion.FusionEncoder(text_width=wt, image_width=wi, width=w, depth=0, num_heads=2,
                                   rngs=nnx.Rngs(0), pooling=pooling)
    for leaf in (encoder.norm.scale, encoder.norm.bias, encoder.itm_head.bias, encoder.text_in.bias):
        leaf.value = jnp.asarray(rng.normal(size=leaf.value.shape).astype(np.float32))
    text = rng.normal(size=(n, length, wt)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    got = np.asarray(encoder(jnp.asarray(text), jnp.asarray(valid), jnp.zeros((n, 2, wi))))

    x = text @ np.asarray(encoder.text_in.kernel.value) + np.asarray(encoder.text_in.bias.value)
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * np.asarray(encoder.norm.scale.value) + np.asarray(encoder.norm.bias.value)
    pooled = x[:, 0] if pooling == "first" else (x * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    want = pooled @ np.asarray(encoder.itm_head.kernel.value) + np.asarray(encoder.itm_head.bias.value)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_itc_residual_adds_gain_times_the_two_tower_logit_without_its_gradient():
    from flax import nnx

    rng = np.random.default_rng(5)
    encoder = fusion.FusionEncoder(text_width=6, image_width=4, width=8, depth=1, num_heads=2, rngs=nnx.Rngs(0),
                                   itc_residual=True)
    encoder.itc_gain.value, encoder.itc_bias.value = jnp.float32(0.7), jnp.float32(-2.0)
    text, image = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32), jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    valid = jnp.ones((3, 5), bool)
    itc = jnp.asarray([3.0, -1.0, 10.0])
    base = fusion.FusionEncoder(text_width=6, image_width=4, width=8, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    plain = np.asarray(fusion.match_log_odds(base(text, valid, image)))
    got = np.asarray(fusion.match_log_odds(encoder(text, valid, image, itc)))
    np.testing.assert_allclose(got, plain + 0.7 * np.asarray(itc) - 2.0, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda t: jnp.sum(fusion.match_log_odds(encoder(text, valid, image, t))))(itc)
    assert not np.any(np.asarray(grad))  # the two-tower logit is a constant to the ITM loss
    with pytest.raises(ValueError, match="itc_residual"):
        encoder(text, valid, image)


def test_rerank_scorer_and_itm_fn_give_the_same_log_odds_with_the_residual_head():
    """Two paths to a pair's score: rerank.pair_scorer (cached token states + embeddings of the split) and
    inference.fusion_itm_fn (both towers on raw images and token ids). They must agree (1e-4)."""
    from prodclip.evaluate import rerank
    from prodclip.models.factory import merge_model

    config = tiny_config(**FUSION, **{"model.fusion.itc_residual": True})
    graphdef, params = build(config)
    batch = tiny_batch(config, seed=3)
    model = merge_model(graphdef, params)
    out = model(jnp.asarray(batch["images"]), jnp.asarray(batch["token_ids"]))
    split = {"image_emb": np.asarray(out["image_emb"]), "text_emb": np.asarray(out["text_emb"]),
             "image_tokens": np.asarray(out["image_tokens"]), "text_tokens": np.asarray(out["text_tokens"]),
             "text_valid": np.asarray(model.text_tower.valid_tokens(jnp.asarray(batch["token_ids"])))}
    scale = float(out["logit_scale"])
    b = len(batch["ids"])
    texts, images = np.arange(b), np.roll(np.arange(b), 1)
    via_split = rerank.pair_scorer(graphdef, params, split, "t2i", 2 * b, scale)(texts, images)
    itm_fn = inference.fusion_itm_fn(graphdef, params, batch_size=b, log_odds=True)
    direct = itm_fn(batch["images"][images], batch["token_ids"][texts])
    np.testing.assert_allclose(via_split, direct, rtol=1e-4, atol=1e-4)


def test_disabled_fusion_has_no_params_and_enabled_towers_are_unchanged():
    _, plain = build(tiny_config())
    _, fused = build(tiny_config(**FUSION))
    assert "fusion" not in plain and "fusion" in fused
    for name in ("image_tower", "text_tower"):  # the fusion encoder is built after the towers
        for a, b in zip(jax.tree.leaves(plain[name]), jax.tree.leaves(fused[name])):
            np.testing.assert_array_equal(a, b)
    # The ITM head reads the first token: padding after it must not change the logits.
    config = tiny_config(**FUSION)
    graphdef, params = build(config)
    model = factory.merge_model(graphdef, params)
    rng = np.random.default_rng(3)
    text = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    image = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)
    valid = jnp.asarray(np.arange(8)[None] < np.array([[3], [5]]))
    logits = fusion.itm_logits(model, image, text, valid)
    noisy = text.at[:, 6:].set(100.0)  # only padding positions change
    np.testing.assert_allclose(fusion.itm_logits(model, image, noisy, valid), logits, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fusion.itm_logits(model, image[::-1], text, valid), logits)  # images matter


@pytest.mark.parametrize("overrides,message", [
    ({"parallel.strategy": "pmap"}, "parallel.strategy='sharded'"),
    ({"parallel.loss": "ring", "loss.extra_positives": False}, "all_gather"),
    ({"train.grad_accum_steps": 2}, "grad_accum_steps=1"),
    ({"model.fusion.num_heads": 3}, "divisible by num_heads"),
    ({"eval.rerank_mode": "itc"}, "eval.rerank_mode"),
    ({"eval.rerank_itc_weight": -0.5}, "eval.rerank_itc_weight"),
    ({"eval.rerank_itc_weight": float("nan")}, "eval.rerank_itc_weight"),
])
def test_config_rejects_fusion_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{**FUSION, **overrides})


# ----------------------------------------------------------------------------- sharded step


def batch_with_short_titles(config, graphdef, params, seed):
    batch = tiny_batch(config, seed=seed)
    batch["title_complete"] = np.arange(len(batch["ids"])) % 3 != 0  # some "shortened" titles
    return batch


def run_steps(config, mesh, num_steps=2, batch_fn=batch_with_short_titles):
    """Host params after `num_steps` and each step's metrics, through parallel.compile_train_step, on
    batches batch_fn(config, graphdef, initial params, step)."""
    graphdef, params = build(config)
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    compiled = parallel.compile_train_step(
        config, mesh, lambda loss, reduce: train.make_train_step(config, graphdef, tx, loss, reduce),
        train.make_pair_loss(config), state)
    state = compiled.place_state(state)
    history = []
    for step in range(num_steps):
        state, metrics = compiled.step(state, compiled.place_batch(batch_fn(config, graphdef, params, step)))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.device_get(compiled.global_state(state)["params"]), history


def test_fusion_step_on_8_devices_equals_1_device():
    """(data=4, fsdp=2) mesh, fusion kernels FSDP-sharded: same losses, ITM accuracy and params as 1 device.

    Tolerances as tests/test_parallel.py: losses rtol 1e-5; params rtol 1e-4, atol 1e-5.
    """
    config = tiny_config(**FUSION)
    ref_params, ref_history = run_steps(config, parallel.make_mesh(config, devices=jax.devices()[:1]))
    sharded = tiny_config(**FUSION, **{"parallel.mesh_shape": (4, 2)})
    mesh = parallel.make_mesh(sharded)
    assert mesh.devices.size == 8
    specs = parallel.tree_shardings(build(sharded)[1], mesh, sharded.parallel.fsdp_min_size)["fusion"]
    assert any("fsdp" in s.spec for s in jax.tree.leaves(specs)), "no fusion param is sharded: vacuous test"
    params, history = run_steps(sharded, mesh)
    for step, (got, want) in enumerate(zip(history, ref_history)):
        for key in ("loss", "contrastive_loss", "itm_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
        assert got["itm_accuracy"] == want["itm_accuracy"]
        assert got["itm_negatives"] == want["itm_negatives"] < 2 * config.train.batch_size  # flags applied
        assert got["itm_positives"] == want["itm_positives"] < config.train.batch_size
        assert got["loss"] == pytest.approx(got["contrastive_loss"] + config.loss.itm_weight * got["itm_loss"],
                                            rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The draw matters: another sampler seed (same init, same batches) gives another ITM loss.
    _, other = run_steps(tiny_config(**FUSION, seed=1), parallel.make_mesh(config, devices=jax.devices()[:1]),
                         num_steps=1)
    assert other[0]["itm_loss"] != pytest.approx(ref_history[0]["itm_loss"], rel=1e-4)
    assert other[0]["contrastive_loss"] == pytest.approx(ref_history[0]["contrastive_loss"], rel=1e-6)


def test_runs_saved_before_the_fusion_keys_still_resume(tmp_path):
    """A config.json without model.fusion / loss.itm_weight (written before they existed) matches the defaults."""
    import json

    from prodclip import checkpoint

    (tmp_path / "checkpoints" / "200").mkdir(parents=True)
    saved = checkpoint.config_to_dict(tiny_config())
    del saved["model"]["fusion"], saved["loss"]["itm_weight"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint.check_workdir(tmp_path, tiny_config())
    with pytest.raises(checkpoint.IncompatibleWorkdir, match="model.fusion.enabled"):
        checkpoint.check_workdir(tmp_path, tiny_config(**FUSION))
