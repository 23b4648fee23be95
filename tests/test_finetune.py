"""LiT and partial fine-tuning: locked towers and frozen patterns never move; per-tower learning rates."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from prodclip import trees
from prodclip import optim
from prodclip import config as config_lib, config_checks
from prodclip import train
from prodclip.models import two_tower

VOCAB, CONTEXT, BATCH = 40, 8, 8


def tiny_config(**optim):
    c = config_lib.base_config()
    c.data.image_size = 16
    c.tokenizer.context_length = CONTEXT
    c.model.embed_dim = 8
    for tower in (c.model.image, c.model.text):
        tower.update(dict(preset="mu", width=16, depth=2, num_heads=2, mlp_ratio=2.0))
    c.model.image.patch_size = 8
    c.optim.warmup_steps = 0
    c.optim.learning_rate = 1e-2
    c.optim.clip_norm = 0.0  # the first step is then linear in the learning rate (see the lr test)
    c.train.num_steps = 10
    c.optim.update(optim)
    config_checks.validate(c)
    return c


@functools.lru_cache(maxsize=1)
def init():
    """(graphdef, params) of the tiny model; the same for every optimizer config here."""
    config = tiny_config()
    build = lambda: two_tower.build_model(config, vocab_size=VOCAB, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(nnx.eval_shape(build), nnx.Param)
    params = jax.jit(lambda: nnx.split(build(), nnx.Param)[1].to_pure_dict())()
    return graphdef, params


def batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, (BATCH, CONTEXT)).astype(np.int32)
    ids[:, -2:] = 0
    return {"images": rng.integers(0, 256, (BATCH, 16, 16, 3)).astype(np.uint8), "token_ids": ids,
            "ids": np.arange(BATCH)}


def run(config, steps):
    """[params before, after step 1, ..., after step `steps`], as numpy."""
    graphdef, params = init()
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    step = jax.jit(train.make_train_step(config, graphdef, tx))
    history = [jax.tree.map(np.asarray, params)]
    for i in range(steps):
        state, _ = step(state, batch(i))
        history.append(jax.tree.map(np.asarray, state["params"]))
    return history


def leaves(tree, prefix=""):
    return {k: v for k, v in ((trees.path_str(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree))
            if k.startswith(prefix)}


def changed(before, after, prefix):
    a, b = leaves(before, prefix), leaves(after, prefix)
    return {k for k in a if not np.array_equal(a[k], b[k])}


def test_lit_locked_image_tower_frozen_pattern_and_text_lr():
    base = run(tiny_config(), steps=1)
    config = tiny_config(lock_image=True, frozen_patterns=("text_tower/encoder/blocks/0/.*",), text_lr_mult=0.25)
    history = run(config, steps=3)
    before, after = history[0], history[-1]
    # LiT: the locked tower and the frozen block are bitwise unchanged after 3 steps.
    assert changed(before, after, "image_tower") == set()
    assert changed(before, after, "text_tower/encoder/blocks/0/") == set()
    assert len(leaves(before, "text_tower/encoder/blocks/0/")) == 16  # 6 dense + 2 norms, 2 leaves each
    # Everything else moves.
    rest = {k for k in leaves(before, "text_tower") if not k.startswith("text_tower/encoder/blocks/0/")}
    assert changed(before, after, "text_tower") == rest and rest
    assert changed(before, after, "log_logit_scale") == {"log_logit_scale"}
    # Unclipped, Adam's first update is lr * (g / (|g| + eps) + decay * w), linear in the learning rate:
    # the text tower moves exactly a quarter as far as with the base rate.
    for path in sorted(rest):
        delta = leaves(history[1])[path] - leaves(before)[path]
        base_delta = leaves(base[1])[path] - leaves(base[0])[path]
        np.testing.assert_allclose(delta, 0.25 * base_delta, rtol=1e-3, atol=1e-7, err_msg=path)


def test_locked_text_tower_is_bitwise_unchanged_with_clipping():
    history = run(tiny_config(lock_text=True, clip_norm=1.0), steps=2)
    before, after = history[0], history[-1]
    assert changed(before, after, "text_tower") == set()
    assert changed(before, after, "image_tower") == set(leaves(before, "image_tower"))


def test_bad_frozen_pattern_is_rejected():
    with pytest.raises(config_lib.ConfigError, match=r"frozen_patterns.*'\[unclosed'"):
        tiny_config(frozen_patterns=("[unclosed",))
