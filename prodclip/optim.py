"""The optimizer and the train state: AdamW with warmup + cosine, per-tower learning rates, frozen parameters.

`init_train_state(config, params)` is the one place the `{step, params, opt_state}` dict
that training, checkpoint restore and conversion share is made.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from prodclip import config as config_lib, trees
from prodclip.trees import path_str


def decay_mask(params: Any) -> Any:
    """True for the weights that get weight decay: dense kernels only.

    Norm scales, biases, embeddings (token, position, class, probe) and the
    logit scale / bias are excluded.
    """
    def is_kernel(path, leaf):
        return getattr(path[-1], "key", None) == "kernel" and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def trainable_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """'image', 'text', 'other' or 'frozen' per parameter.

    Frozen: a locked tower (optim.lock_image / lock_text, LiT; the last optim.unlock_text_blocks blocks
    of a locked BERT text tower still train), a path fully matching one of
    optim.frozen_patterns, or the logit scale when the temperature is fixed. The other labels
    pick the learning-rate multiplier (optim.image_lr_mult / text_lr_mult).
    """
    o = config.optim
    patterns = [re.compile(p) for p in o.frozen_patterns]
    unlocked_from = config_lib.first_unlocked_text_block(config)

    def label(path, _):
        name = getattr(path[0], "key", None)
        if name == "log_logit_scale" and not config.model.learn_temperature:
            return "frozen"
        if name == "text_tower" and unlocked_from is not None:
            block = trees.block_index(path)
            if block is not None and block >= unlocked_from:
                return "text"
        if (name == "image_tower" and o.lock_image) or (name == "text_tower" and o.lock_text):
            return "frozen"
        if any(p.fullmatch(path_str(path)) for p in patterns):
            return "frozen"
        return {"image_tower": "image", "text_tower": "text"}.get(name, "other")
    return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
        decay_steps=config.train.num_steps, end_value=o.learning_rate * o.end_learning_rate_ratio,
    )


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """AdamW with warmup + cosine, decoupled weight decay on kernels only, global-norm clipping.

    Frozen parameters (see trainable_labels) get zero updates and do not count in the clipping
    norm; each tower's learning rate is scaled by its optim.*_lr_mult.
    """
    o = config.optim
    labels = trainable_labels(params, config)
    schedule = learning_rate_schedule(config)

    def adamw(mult: float) -> optax.GradientTransformation:
        return optax.adamw(lambda step: schedule(step) * mult, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask(params))

    frozen = optax.set_to_zero()
    update = optax.multi_transform(
        {"image": adamw(o.image_lr_mult), "text": adamw(o.text_lr_mult), "other": adamw(1.0), "frozen": frozen},
        labels)
    if o.clip_norm <= 0:
        return update
    zero_frozen = optax.multi_transform(
        {"image": optax.identity(), "text": optax.identity(), "other": optax.identity(), "frozen": frozen}, labels)
    return optax.chain(zero_frozen, optax.clip_by_global_norm(o.clip_norm), update)


def init_train_state(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
    """{"step": int32 0, "params": params, "opt_state": the optimizer state of `make_optimizer`}.

    The target a checkpoint restores into, and the state training starts from.
    """
    tx = make_optimizer(config, params)
    return {"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}
