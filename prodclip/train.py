"""Training: the train state, the optimizer, the jit-compiled step, and the loop.

`train_and_evaluate(config, workdir)` reads top to bottom in stages, like a
big_vision trainer: set-up, data, model and optimizer, step, loop, final eval.
"""

from __future__ import annotations

import logging
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from prodclip import checkpoint, losses
from prodclip import config as config_lib
from prodclip.data import pipeline, sources
from prodclip.data import tokenizer as tokenizer_lib
from prodclip.evaluate import suite
from prodclip.metrics_writer import MetricsWriter
from prodclip.models import two_tower

log = logging.getLogger("prodclip")


# ----------------------------------------------------------------------------- optimizer


def decay_mask(params: Any) -> Any:
    """True for the weights that get weight decay: dense kernels only.

    Norm scales, biases, embeddings (token, position, class, probe) and the
    logit scale / bias are excluded.
    """
    def is_kernel(path, leaf):
        return getattr(path[-1], "key", None) == "kernel" and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def param_path(path) -> str:
    """'text_tower/encoder/blocks/0/attn/query/kernel' for a tree_map_with_path key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """'image', 'text', 'other' or 'frozen' per parameter.

    Frozen: a locked tower (optim.lock_image / lock_text, LiT), a path fully matching one of
    optim.frozen_patterns, or the logit scale when the temperature is fixed. The other labels
    pick the learning-rate multiplier (optim.image_lr_mult / text_lr_mult).
    """
    o = config.optim
    patterns = [re.compile(p) for p in o.frozen_patterns]

    def label(path, _):
        name = getattr(path[0], "key", None)
        if name == "log_logit_scale" and not config.model.learn_temperature:
            return "frozen"
        if (name == "image_tower" and o.lock_image) or (name == "text_tower" and o.lock_text):
            return "frozen"
        if any(p.fullmatch(param_path(path)) for p in patterns):
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


# ----------------------------------------------------------------------------- model + state


def create_model(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.TitleTokenizer, seed: int):
    """Returns (graphdef, params) with params a nested dict of float32 arrays."""
    model = two_tower.build_model(config, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                  rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params.to_pure_dict()


def merge_model(graphdef, params: dict) -> two_tower.TwoTower:
    state = nnx.State(params) if not isinstance(params, nnx.State) else params
    return nnx.merge(graphdef, state)


def batch_positives(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, B] bool: pairs that are both correct matches (same product id or identical title)."""
    same_id = batch["ids"][:, None] == batch["ids"][None, :]
    ids = batch["token_ids"]
    same_title = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
    return same_id | same_title


def contrastive_loss(config: ml_collections.ConfigDict, out: dict, positives: jax.Array | None) -> jax.Array:
    if config.loss.name == "softmax":
        return losses.softmax_contrastive_loss(
            out["image_emb"], out["text_emb"], out["logit_scale"],
            label_smoothing=config.loss.label_smoothing, positives=positives)
    return losses.sigmoid_contrastive_loss(
        out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"], positives=positives)


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation):
    """Returns step(state, batch) -> (state, metrics); `state` = {step, params, opt_state}."""
    schedule = learning_rate_schedule(config)

    def loss_fn(params, batch):
        out = merge_model(graphdef, params)(batch["images"], batch["token_ids"])
        loss = contrastive_loss(config, out, batch_positives(batch))
        return loss, out

    def step(state, batch):
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "logit_scale": out["logit_scale"],
            "logit_bias": out["logit_bias"],
            "learning_rate": schedule(state["step"]),
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


# ----------------------------------------------------------------------------- the run


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_config(workdir, config)
    return workdir


def load_tokenizer_and_sources(config: ml_collections.ConfigDict, workdir: pathlib.Path, splits):
    """The run's sources by split name, and its tokenizer (trained on train titles if needed)."""
    split_sources = {split: sources.make_source(config, split) for split in splits}
    train_titles = pipeline.source_titles(split_sources["train"]) if "train" in split_sources else None
    tokenizer = tokenizer_lib.tokenizer_from_config(config, train_titles, workdir / "tokenizer")
    return tokenizer, split_sources


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains `config` in `workdir`, evaluates on config.data.eval_splits, returns the results."""
    # --- Set-up: reject a bad config before any compute.
    config_lib.validate(config)
    workdir = prepare_workdir(config, workdir)
    writer = MetricsWriter(workdir)
    t_start = time.time()

    # --- Data.
    splits = ("train", "val", *config.data.eval_splits)
    tokenizer, split_sources = load_tokenizer_and_sources(config, workdir, dict.fromkeys(splits))
    train_iter = iter(pipeline.train_dataset(split_sources["train"], tokenizer, config))
    log.info("data: %s", {k: len(v) for k, v in split_sources.items()})

    # --- Model and optimizer.
    graphdef, params = create_model(config, tokenizer, config.seed)
    if config.model.init_checkpoint:
        params = checkpoint.restore_params(config.model.init_checkpoint, params)
        log.info("model: params initialised from %s", config.model.init_checkpoint)
    tx = make_optimizer(config, params)
    state = {"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %.2fM parameters", num_params / 1e6)

    # --- Train step, compiled once, donating the old state's buffers.
    train_step = jax.jit(make_train_step(config, graphdef, tx), donate_argnums=(0,))

    # --- Loop.
    num_steps = config.train.num_steps
    progress = _progress_bar(num_steps, config.train.progress_bar)
    pending: list[dict] = []
    t_log = time.time()
    for step in range(1, num_steps + 1):
        batch = next(train_iter)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        if step % config.train.log_every == 0 or step == num_steps:
            host = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
            if not np.isfinite(host["loss"]) or not np.isfinite(host["grad_norm"]):
                bad = "loss" if not np.isfinite(host["loss"]) else "grad_norm"
                raise FloatingPointError(f"non-finite {bad} at step {step}; stopping (no checkpoint written)")
            dt = time.time() - t_log
            host["pairs_per_sec"] = len(pending) * config.train.batch_size / dt
            writer.write(step, host, prefix="train/")
            progress.set_postfix(loss=f"{host['loss']:.3f}", pairs_s=f"{host['pairs_per_sec']:.0f}")
            pending, t_log = [], time.time()
        if config.train.eval_every and step % config.train.eval_every == 0 and step != num_steps:
            val = suite.evaluate_split(graphdef, state["params"], split_sources["val"], tokenizer, config,
                                       with_zeroshot=False)
            writer.write(step, val, prefix="val/")
            t_log = time.time()
        progress.update(1)
    progress.close()
    train_seconds = time.time() - t_start

    # --- Checkpoint.
    mgr = checkpoint.manager(workdir)
    checkpoint.save(mgr, num_steps, state, {"step": num_steps, "num_params": int(num_params)})
    mgr.wait_until_finished()

    # --- Final evaluation.
    results = suite.evaluate_all(graphdef, state["params"], split_sources, tokenizer, config)
    results["train_seconds"] = train_seconds
    results["num_params"] = int(num_params)
    suite.write_results(workdir, results, step=num_steps)
    writer.close()
    return results


def load_trained(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, splits):
    """Rebuilds a finished run from its workdir: (graphdef, params, tokenizer, sources)."""
    workdir = pathlib.Path(workdir)
    tokenizer, split_sources = load_tokenizer_and_sources(config, workdir, splits)
    graphdef, params = create_model(config, tokenizer, config.seed)
    tx = make_optimizer(config, params)
    target = {"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}
    state, meta = checkpoint.restore(checkpoint.manager(workdir), target)
    return graphdef, state["params"], tokenizer, split_sources, meta


def _progress_bar(total: int, enabled: bool):
    import tqdm
    return tqdm.tqdm(total=total, disable=not enabled, desc="train", dynamic_ncols=True, mininterval=2.0)
