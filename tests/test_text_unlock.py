"""optim.unlock_text_blocks: the last blocks of a locked BERT text tower train on cached token states.

Tolerances:
* the tower split at a block against the whole tower: float32, rtol 1e-5, atol 1e-6;
* float16 states (what the cache stores) against float32: atol 5e-3 on L2-normalised features
  (float16 has an 11-bit significand; the rounding passes through the remaining blocks);
* train steps (cached states vs the whole tower, 8 devices vs 1): as tests/test_parallel.py, losses
  rtol 1e-5, params and optimizer state rtol 1e-4, atol 1e-5.
"""

import jax
import numpy as np
import pytest
from multihost_worker import tiny_batch, tiny_config, tiny_model
from test_parallel import assert_trees_close, one_device_mesh, run_steps

from prodclip import optim, parallel, text_cache, train, trees
from prodclip.config import ConfigError
from prodclip.models import inference
from prodclip.models.factory import merge_model

DEPTH = 3
UNLOCK = {"model.text.kind": "bert", "model.text.mask": "bidirectional", "model.text.depth": DEPTH,
          "model.text.pooling": "mean", "optim.lock_text": True, "optim.unlock_text_blocks": 1}


def test_the_tower_split_at_any_block_equals_the_whole_tower():
    config = tiny_config(**UNLOCK)
    graphdef, params, _, _ = tiny_model(config)
    model = merge_model(graphdef, params)
    ids = jax.numpy.asarray(tiny_batch(config, 0)["token_ids"])
    assert (ids == 0).any()  # padding is masked in the remaining blocks too
    want_emb, want_states = model.text_tower(ids)
    for block in range(DEPTH + 1):
        states = model.text_tower.states_before(ids, block)
        emb, final = model.text_tower.from_states(states, ids, block)
        np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-6, err_msg=f"block {block}")
        np.testing.assert_allclose(final, want_states, rtol=1e-5, atol=1e-6, err_msg=f"block {block}")
        rounded = model.text_features_from_states(states.astype(np.float16), ids, block)
        np.testing.assert_allclose(rounded, model.text_features(ids), atol=5e-3, err_msg=f"float16, block {block}")
    assert not np.allclose(model.text_tower.states_before(ids, 1), model.text_tower.states_before(ids, 2), atol=1e-3)


def test_only_the_last_blocks_train():
    config = tiny_config(**{**UNLOCK, "optim.unlock_text_blocks": 2})
    _, params, _, _ = tiny_model(config)
    labels = optim.trainable_labels(params, config)
    text = {trees.path_str(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels["text_tower"])}
    unlocked = {n for n in text if n.startswith(("blocks/1/", "blocks/2/"))}
    assert unlocked and {n for n, label in text.items() if label == "text"} == unlocked
    assert {label for n, label in text.items() if n not in unlocked} == {"frozen"}
    whole = optim.trainable_labels(params, tiny_config(**{**UNLOCK, "optim.unlock_text_blocks": 0}))
    assert set(jax.tree.leaves(whole["text_tower"])) == {"frozen"}
    every = optim.trainable_labels(params, tiny_config(**{**UNLOCK, "optim.unlock_text_blocks": DEPTH}))
    every = {trees.path_str(p): label for p, label in jax.tree_util.tree_leaves_with_path(every["text_tower"])}
    assert {label for n, label in every.items() if n.startswith("blocks/")} == {"text"}
    assert {label for n, label in every.items() if not n.startswith("blocks/")} == {"frozen"}


@pytest.mark.parametrize("overrides,message", [
    ({"optim.unlock_text_blocks": -1}, ">= 0"),
    ({"optim.lock_text": False}, "optim.lock_text is False"),
    ({"model.text.kind": "transformer"}, "model.text.kind='bert'"),
    ({"optim.unlock_text_blocks": DEPTH + 1}, "exceeds the text tower's 3 blocks"),
    ({"model.fusion.enabled": True, "model.fusion.width": 16, "model.fusion.depth": 1, "model.fusion.num_heads": 2},
     "model.fusion.enabled"),
])
def test_config_rejects_what_cannot_unlock(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{**UNLOCK, **overrides})


def test_cache_key_covers_only_the_blocks_below():
    config = tiny_config(**UNLOCK)
    _, params, _, _ = tiny_model(config)
    tokenizer = type("Tok", (), {"hf": type("HF", (), {"get_vocab": lambda self: {"a": 0}})(), "context_length": 8,
                                 "lowercase": True, "pad_id": 0})()
    text = params["text_tower"]
    key = text_cache.cache_key(text, tokenizer, config, DEPTH - 1)

    def edited(block):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x + 1 if trees.block_index(path) == block else x, text)
    assert text_cache.cache_key(edited(DEPTH - 1), tokenizer, config, DEPTH - 1) == key  # the block that trains
    assert text_cache.cache_key(edited(0), tokenizer, config, DEPTH - 1) != key
    assert text_cache.cache_key(text, tokenizer, config, DEPTH - 2) != key
    assert text_cache.cache_key(text, tokenizer, config) != key


def cached_states(config, float16=False):
    """A TextCache holding the states entering the first unlocked block of every title tiny_batch draws."""
    graphdef, params, _, _ = tiny_model(config)
    ids = np.unique(np.concatenate([tiny_batch(config, s)["token_ids"] for s in range(2)]), axis=0)
    states = np.asarray(inference.text_state_encoder(graphdef, DEPTH - 1)(params, ids))
    return text_cache.TextCache(ids, {"text_states": states.astype(np.float16) if float16 else states})


def test_cached_step_equals_the_whole_tower_on_1_and_8_devices():
    config = tiny_config(**UNLOCK)
    cache = cached_states(config)
    cached = lambda c, seed: cache.attach(tiny_batch(c, seed))
    assert cached(config, 0)["text_states"].shape == (config.train.batch_size, config.tokenizer.context_length, 16)
    ref_states, ref_history = run_steps(config, one_device_mesh(config))  # no cache: the whole tower runs
    states, history = run_steps(config, one_device_mesh(config), batch_fn=cached)
    sharded = tiny_config(**UNLOCK, **{"parallel.mesh_shape": (4, 2)})
    sharded_states, sharded_history = run_steps(sharded, parallel.make_mesh(sharded), batch_fn=cached)
    for what, (got_states, got_history) in (("cached", (states, history)),
                                            ("cached, 8 devices", (sharded_states, sharded_history))):
        for got, want in zip(got_history, ref_history):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), what
        assert_trees_close(got_states[-1]["params"], ref_states[-1]["params"], 1e-4, 1e-5, f"{what} params")
        assert_trees_close(got_states[-1]["opt_state"], ref_states[-1]["opt_state"], 1e-4, 1e-5, f"{what} opt_state")

    _, initial, _, _ = tiny_model(config)
    trained = jax.tree.leaves(states[-1]["params"]["text_tower"])
    for (path, before), now in zip(jax.tree_util.tree_leaves_with_path(initial["text_tower"]), trained):
        name = trees.path_str(path)
        if trees.block_index(path) == DEPTH - 1 and name.endswith("kernel"):
            assert not np.array_equal(now, before), name  # the unlocked block trains
        elif trees.block_index(path) != DEPTH - 1:
            np.testing.assert_array_equal(now, before, err_msg=name)  # the rest stays bitwise

    rounded = run_steps(config, one_device_mesh(config), batch_fn=lambda c, seed: cached_states(
        c, float16=True).attach(tiny_batch(c, seed)))[1]
    assert rounded[0]["loss"] == pytest.approx(history[0]["loss"], rel=1e-3)  # the stored float16 states


def test_run_caches_the_states_and_trains_the_last_block(tmp_path):
    """A whole run: the text cache holds the states entering the unlocked block, the step trains it, and
    evaluation runs the whole tower with it."""
    from test_image_cache import tiny_config as cache_config

    c = cache_config(**{"data.num_train": 48, "data.num_val": 16, "data.num_test": 16, "data.eval_splits": ("test",),
                        "data.image_size": 32, "train.batch_size": 16, "train.num_steps": 3, "train.log_every": 1,
                        "train.eval_every": 0, "train.progress_bar": False, "eval.batch_size": 16,
                        "eval.zeroshot_labels": (), "eval.confusion_png": False, "tokenizer.vocab_size": 200,
                        "checkpoint.async_save": False, **UNLOCK})
    c.lock()
    results = train.train_and_evaluate(c, tmp_path / "run")
    assert 0.0 <= results["test"]["t2i/R@1"] <= 1.0
    (directory,) = (tmp_path / "run" / "text_cache").iterdir()
    assert sorted(p.name for p in directory.glob("*.npy")) == ["text_states.npy", "token_ids.npy"]
    states = np.load(directory / "text_states.npy")
    assert states.dtype == np.float16 and states.shape[1:] == (c.tokenizer.context_length, c.model.text.width)
