"""LiT text cache: cached steps equal uncached ones, skip the text tower, and the cache is keyed and reused.

Tolerance: losses rtol 1e-5 and params after 3 steps atol 1e-5 (the cached embeddings come from
another jit with another batch size, so they differ from the in-step ones by float noise only).
"""

import jax
import numpy as np
import pytest

from test_finetune import BATCH, CONTEXT, VOCAB
from test_finetune import init as finetune_model
from test_finetune import tiny_config as finetune_config

from prodclip import optim
from prodclip.models import factory
from prodclip import config as config_lib, config_checks, config_loading
from prodclip import text_cache, train

NUM_TITLES = 12


def tiny_config(**overrides):
    """test_finetune's tiny model with a locked text tower; eval.batch_size 5 sets the cache's chunk size."""
    # Attention key biases have an exactly-zero true gradient; a large Adam eps keeps their float
    # noise from becoming full-size updates (as in tests/multihost_worker.py).
    c = finetune_config(lock_text=True, eps=1e-3, clip_norm=1.0)
    c.eval.batch_size = 5
    for key, value in overrides.items():
        config_loading.set_field(c, key, value)
    config_checks.validate(c)
    return c


def titles_as_ids():
    """NUM_TITLES distinct tokenized titles, [NUM_TITLES, CONTEXT] int32 padded with 0."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, VOCAB, (NUM_TITLES, CONTEXT)).astype(np.int32)
    ids[np.arange(CONTEXT)[None] >= rng.integers(2, CONTEXT, NUM_TITLES)[:, None]] = 0
    return ids


def batches(num):
    rng = np.random.default_rng(1)
    ids = titles_as_ids()
    for _ in range(num):
        rows = rng.integers(0, NUM_TITLES, BATCH)
        yield {"images": rng.integers(0, 256, (BATCH, 16, 16, 3)).astype(np.uint8), "token_ids": ids[rows],
               "ids": rows.astype(np.int64)}


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    graphdef, params = finetune_model()
    encode = jax.jit(lambda p, t: factory.merge_model(graphdef, p).encode_text(t))
    return config, graphdef, params, encode


def train_steps(config, graphdef, params, cache, num=3):
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    step = jax.jit(train.make_train_step(config, graphdef, tx))
    losses, flops = [], None
    for batch in batches(num):
        batch = cache.attach(batch) if cache else batch
        if flops is None:
            flops = step.lower(state, batch).compile().cost_analysis()["flops"]
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"]), flops


def test_cached_steps_equal_uncached_and_skip_the_text_tower(model, tmp_path):
    config, graphdef, params, encode = model
    cache = text_cache.build_or_load(tmp_path, titles_as_ids(), lambda t: encode(params, t), config.eval.batch_size)
    assert len(cache) == NUM_TITLES
    cached_losses, cached_params, cached_flops = train_steps(config, graphdef, params, cache)
    plain_losses, plain_params, plain_flops = train_steps(config, graphdef, params, None)
    np.testing.assert_allclose(cached_losses, plain_losses, rtol=1e-5)
    assert cached_losses[0] != pytest.approx(cached_losses[2], rel=1e-3)  # the image tower trains
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cached_params), jax.tree.leaves(plain_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The text tower is about half of this model: the cached step does markedly less work.
    assert cached_flops < 0.75 * plain_flops, (cached_flops, plain_flops)


def test_cache_is_reused_extended_and_refuses_unknown_titles(model, tmp_path):
    config, graphdef, params, encode = model
    ids = titles_as_ids()
    text_cache.build_or_load(tmp_path, ids[:6], lambda t: encode(params, t), 5)

    def must_not_run(_):
        raise AssertionError("a complete cache was re-embedded")
    again = text_cache.build_or_load(tmp_path, ids[:6], must_not_run, 5)
    assert isinstance(again.text_emb, np.memmap) and len(again) == 6
    with pytest.raises(text_cache.TextCacheMiss, match="batch row 0"):
        again.lookup(ids[6:7])
    grown = text_cache.build_or_load(tmp_path, ids[4:], lambda t: encode(params, t), 5)
    assert len(grown) == NUM_TITLES
    expected = np.asarray(encode(params, ids[:5]))  # the same batch size as the cache's chunks
    np.testing.assert_allclose(grown.lookup(ids[:5]), expected, atol=1e-6)


def test_titles_cut_to_their_length_embed_as_at_full_padding(model, tmp_path):
    config, _, params, encode = model
    ids = titles_as_ids()
    full = np.concatenate([np.asarray(encode(params, ids[i:i + 4])) for i in range(0, NUM_TITLES, 4)])
    widths = []

    def recording(t):
        widths.append(t.shape[1])
        return encode(params, t)
    (cut,) = text_cache.embed_by_length(recording, ids, 4, pad_id=0, multiple=2)
    np.testing.assert_allclose(cut, full, atol=1e-5)
    assert min(widths) < CONTEXT  # shorter titles really ran shorter
    cache = text_cache.build_or_load(tmp_path, ids, lambda t: encode(params, t), 4, pad_id=0)
    np.testing.assert_allclose(cache.lookup(ids), full, atol=1e-5)


def test_cache_key_follows_weights_and_tokenizer(model):
    config, _, params, _ = model

    class Tok:
        def __init__(self, vocab):
            self.hf = type("HF", (), {"get_vocab": lambda _self: vocab})()
            self.context_length, self.lowercase, self.pad_id = CONTEXT, True, 0
    text = jax.tree.map(np.asarray, params["text_tower"])
    key = text_cache.cache_key(text, Tok({"a": 0, "b": 1}), config)
    assert key == text_cache.cache_key(jax.tree.map(np.copy, text), Tok({"a": 0, "b": 1}), config)
    assert key != text_cache.cache_key(text, Tok({"a": 0, "c": 1}), config)
    changed = jax.tree.map(np.copy, text)
    changed["projection"]["kernel"][0, 0] += 1e-3
    assert key != text_cache.cache_key(changed, Tok({"a": 0, "b": 1}), config)


@pytest.mark.parametrize("overrides,expected", [
    ({}, True),
    ({"optim.lock_text": False}, False),
    ({"train.text_cache": "off"}, False),
    ({"data.title_dropout_prob": 0.5}, False),
    ({"data.title_dropout_prob": 0.5, "data.augment": False}, True),
])
def test_cache_applies_only_to_a_locked_unaugmented_text_tower(overrides, expected):
    assert config_lib.text_cache_on(tiny_config(**overrides)) is expected
