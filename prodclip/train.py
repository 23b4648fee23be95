"""Training: the train state, the optimizer, the jit-compiled step, and the loop.

`train_and_evaluate(config, workdir)` reads top to bottom in stages, like a
big_vision trainer: set-up, data, model and optimizer, step, loop, final eval.
"""

from __future__ import annotations

import logging
import pathlib
import time
from functools import partial
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from prodclip import (checkpoint, compile_cache, config as config_lib, config_checks, errors, faults, gradcache, losses,
                      optim, parallel)
from prodclip.data import pipeline, sources, view_augment
from prodclip.evaluate import matching, pairs, suite
from prodclip.metrics_writer import MetricsWriter
from prodclip.models import matcher as matcher_lib
from prodclip.models.factory import create_model, merge_model
from prodclip.run import load_tokenizer_and_sources

log = logging.getLogger("prodclip")


# ----------------------------------------------------------------------------- loss and step


def contrastive_loss(config: ml_collections.ConfigDict, out: dict, positives: jax.Array | None) -> jax.Array:
    if config.loss.name == "softmax":
        return losses.softmax_contrastive_loss(
            out["image_emb"], out["text_emb"], out["logit_scale"],
            label_smoothing=config.loss.label_smoothing, positives=positives)
    return losses.sigmoid_contrastive_loss(
        out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"], positives=positives)


def make_pair_loss(config: ml_collections.ConfigDict) -> parallel.PairLoss:
    """The plain global-batch loss on [B, D] embeddings; under jit on sharded arrays, the all-gather variant."""
    def pair_loss(image_emb, text_emb, logit_scale, logit_bias, batch):
        positives = losses.batch_positives(batch) if config.loss.extra_positives else None
        out = {"image_emb": image_emb, "text_emb": text_emb, "logit_scale": logit_scale, "logit_bias": logit_bias}
        return contrastive_loss(config, out, positives)
    return pair_loss


def make_loss_and_grads(config: ml_collections.ConfigDict, graphdef, pair_loss: parallel.PairLoss | None = None):
    """Returns loss_and_grads(params, batch) -> (scalar loss, grads like params).

    pair_loss: the global-batch loss on the embeddings (default `make_pair_loss`;
    the ring or a gathered pmap loss come from prodclip.parallel). With
    train.grad_accum_steps = k > 1 the gradient is computed by GradCache.
    """
    pair_loss = pair_loss or make_pair_loss(config)
    accum = config.train.grad_accum_steps

    first_unlocked = config_lib.first_unlocked_text_block(config)

    def embed_titles(model, batch, prefix=""):
        # A locked text tower's features, or the states entering its unlocked blocks, may come with the
        # batch (text_cache.py): then only those blocks and the head run.
        if f"{prefix}text_states" in batch:
            return model.embed_text_features(model.text_features_from_states(
                batch[f"{prefix}text_states"], batch[f"{prefix}token_ids"], first_unlocked))
        if f"{prefix}text_emb" in batch:
            return model.embed_text_features(batch[f"{prefix}text_emb"])
        return model.encode_text(batch[f"{prefix}token_ids"])

    def embed(params, batch):
        model = merge_model(graphdef, params)
        # A locked image tower's features may come with the batch (image_cache.py): only its head runs.
        image_emb = (model.embed_image_features(batch["image_features"]) if "image_features" in batch
                     else model.encode_image(batch["images"]))
        return image_emb, embed_titles(model, batch)

    def embed_negatives(params, batch):
        return embed_titles(merge_model(graphdef, params), batch, "negative_")

    def loss_on_embeddings(params, image_emb, text_emb, batch):
        model = merge_model(graphdef, params)
        loss = pair_loss(image_emb, text_emb, model.logit_scale(), model.logit_bias[...], batch)
        if "negative_mask" in batch:  # loss.hard_negatives: attribute-swapped titles (image_cache.FeatureRows)
            loss = loss + config.loss.hard_negative_weight * losses.hard_negative_loss(
                image_emb, text_emb, embed_negatives(params, batch), batch["negative_mask"], model.logit_scale())
        if model.matcher is not None:
            positives = losses.batch_positives(batch) if config.loss.extra_positives else None
            loss = loss + config.loss.matcher_weight * matcher_lib.matcher_loss(
                model.matcher, image_emb, text_emb, positives)
        return loss

    def loss_and_grads(params, batch):
        if accum > 1:
            return gradcache.value_and_grad(embed, loss_on_embeddings, params, batch, accum)
        return jax.value_and_grad(lambda p: loss_on_embeddings(p, *embed(p, batch), batch))(params)

    return loss_and_grads


def make_train_step(config: ml_collections.ConfigDict, graphdef, tx: optax.GradientTransformation,
                    pair_loss: parallel.PairLoss | None = None, reduce_grads=None):
    """Returns step(state, batch) -> (state, metrics); `state` = {step, params, opt_state}.

    pair_loss: see `make_loss_and_grads`. reduce_grads: applied to the gradients
    before the update (the pmap strategy's pmean).
    """
    schedule = optim.learning_rate_schedule(config)
    loss_and_grads = make_loss_and_grads(config, graphdef, pair_loss)
    fusion_loss_and_grads = None
    if config.model.fusion.enabled:  # contrastive + ITM on hard negatives (prodclip/itm.py)
        from prodclip import itm
        fusion_loss_and_grads = itm.make_loss_and_grads(config, graphdef, pair_loss or make_pair_loss(config))

    def step(state, batch):
        params = state["params"]
        extra_metrics = {}
        if fusion_loss_and_grads is not None:
            loss, grads, extra_metrics = fusion_loss_and_grads(params, batch, state["step"])
        else:
            loss, grads = loss_and_grads(params, batch)
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        model = merge_model(graphdef, params)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "logit_scale": model.logit_scale(),
            "logit_bias": model.logit_bias[...],
            "learning_rate": schedule(state["step"]),
            **extra_metrics,
        }
        return {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                "opt_state": opt_state}, metrics

    return step


# ----------------------------------------------------------------------------- the run


def hard_negative_titles(config: ml_collections.ConfigDict, train_source) -> list[list[str]]:
    """loss.hard_negatives attribute-swapped titles per train row (labels from config.match); a ConfigError
    when the catalog has no usable labels."""
    try:
        type_label, swap_labels = matching.benchmark_labels(config, train_source)
        sampler = pairs.sampler_for_source(train_source, type_label, swap_labels)
    except ValueError as e:
        raise errors.ConfigError(f"loss.hard_negatives={config.loss.hard_negatives}: {e}") from None
    return pairs.swapped_titles(sampler, config.loss.hard_negatives, seed=config.data.seed)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_config(workdir, config)
    return workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       allow_config_change: bool = False, allow_fresh_start: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir`, evaluates on config.data.eval_splits, returns the results.

    Resumes from the workdir's newest valid checkpoint. Raises faults.Preempted after saving
    on SIGTERM/SIGINT, faults.NonFiniteError on NaN/Inf, checkpoint.IncompatibleWorkdir when
    the workdir's checkpoints have another model/data config (unless `allow_config_change`),
    checkpoint.NoValidCheckpoint when every checkpoint is damaged (unless `allow_fresh_start`, which
    moves them to workdir/damaged_checkpoints/ and starts from step 0).
    """
    # --- Set-up: reject a bad config, or a workdir of another run, before any compute.
    config_checks.validate(config)
    checkpoint.check_workdir(workdir, config, allow_config_change=allow_config_change,
                             allow_fresh_start=allow_fresh_start)
    t_start = time.time()

    # --- Data: every split is read before anything is written into the workdir.
    workdir = pathlib.Path(workdir)
    splits = ("train", "val", *config.data.eval_splits)
    found: dict = {}  # attribute-swapped titles of other train products (evaluate/pairs.py), or a ConfigError

    def draw_negatives(split_sources):
        found["titles"] = hard_negative_titles(config, split_sources["train"])

    tokenizer, split_sources, label_stats = load_tokenizer_and_sources(
        config, workdir, dict.fromkeys(splits), draw_negatives if config.loss.hard_negatives else None)
    negative_titles = found.get("titles")
    workdir = prepare_workdir(config, workdir)
    sources.report_skipped(split_sources, workdir)
    if config.train.compilation_cache:
        compile_cache.enable(config.train.compilation_cache_dir)
    writer = MetricsWriter(workdir)
    train_iter = pipeline.train_iterator(split_sources["train"], tokenizer, config,
                                         process_index=jax.process_index(), process_count=jax.process_count())
    log.info("data: %s", {k: len(v) for k, v in split_sources.items()})
    if negative_titles is not None:
        log.info("hard negatives: %d of %d train rows have an attribute-swapped title",
                 sum(map(bool, negative_titles)), len(negative_titles))

    # --- Model and optimizer.
    graphdef, params = create_model(config, tokenizer, config.seed)
    if config.model.init_checkpoint:
        params = checkpoint.restore_params(config.model.init_checkpoint, params)
        log.info("model: params initialised from %s", config.model.init_checkpoint)
    elif config.model.text.pretrained:
        from prodclip import convert_bert
        params = convert_bert.load_text_tower(config.model.text.pretrained, config, params)
        log.info("model: text tower initialised from %s", config.model.text.pretrained)
    if config.model.image.init_checkpoint and not config.model.init_checkpoint:
        from prodclip import convert_efficientnet
        params = convert_efficientnet.load_image_tower(config.model.image.init_checkpoint, config, params,
                                                       cache_dir=workdir / "pretrained")
        log.info("model: image tower initialised from %s", config.model.image.init_checkpoint)
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    # Image feature cache: a locked image tower sees each train image once; batches carry its features.
    from prodclip import image_cache as image_cache_lib
    cached_images = image_cache_lib.for_run(config, workdir, graphdef, params, tokenizer, split_sources["train"])
    train_features = cached_images["features"] if cached_images is not None else None
    # Title views (view_augment.title_views): the full titles and train.text_cache_views - 1 shortened copies.
    title_views = view_augment.title_views(pipeline.source_titles(split_sources["train"]),
                                           config.train.text_cache_views, config.data.seed, config.data.title_keep_prob)
    if train_features is not None:
        train_iter.close()
        rows = image_cache_lib.FeatureRows(train_features, title_views, np.asarray(split_sources["train"].ids),
                                           short_title_prob=config.data.title_dropout_prob,
                                           negative_titles=negative_titles, tokens=cached_images.get("tokens"))
        train_iter = image_cache_lib.train_iterator(rows, tokenizer, config, process_index=jax.process_index(),
                                                    process_count=jax.process_count())
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %.2fM parameters", num_params / 1e6)

    # --- Mesh and train step: jit with explicit shardings (or pmap), donating the old state's buffers.
    mesh = parallel.make_mesh(config)
    parallel.check_batch_size(config, mesh)
    compiled = parallel.compile_train_step(config, mesh, partial(make_train_step, config, graphdef, tx),
                                           make_pair_loss(config), state)
    state = compiled.place_state(state)
    log.info("mesh: %s, strategy %s, loss %s", dict(mesh.shape), config.parallel.strategy, config.parallel.loss)

    # --- Resume: the newest valid checkpoint (state and data position), or step 0.
    ckpt = checkpoint.Checkpointer(workdir, config)
    restored = ckpt.restore(compiled.global_state(state), train_iter, allow_fresh_start=allow_fresh_start)
    if restored:
        state = compiled.place_state(restored[0])
    start_step = int(jax.device_get(compiled.global_state(state)["step"]))
    checkpoint.trim_metrics_log(workdir, start_step)
    if start_step:
        log.info("resumed from the checkpoint of step %d", start_step)

    # --- LiT text cache: a locked text tower embeds each distinct title once (text_cache.py).
    from prodclip import text_cache as text_cache_lib
    text_cache = text_cache_lib.for_run(config, workdir, graphdef, compiled.global_state(state)["params"],
                                        tokenizer, split_sources["train"],
                                        [t for view in title_views for t in view] + sorted(
                                            {t for row in negative_titles or () for t in row}))

    # --- Loop. Checkpoints every checkpoint.every_steps and at the end; SIGTERM/SIGINT saves the
    # current step and raises faults.Preempted; NaN/Inf raises faults.NonFiniteError, saving nothing.
    num_steps = config.train.num_steps
    progress = _progress_bar(num_steps, config.train.progress_bar, initial=start_step)
    pending: list[dict] = []
    t_log = t_loop = time.time()
    with faults.StopRequests() as stop, ckpt:
        for step in range(start_step + 1, num_steps + 1):
            batch = next(train_iter)
            batch = compiled.place_batch(text_cache.attach(batch) if text_cache else batch)
            t_step = time.time()
            with jax.transfer_guard_device_to_host("disallow"):
                state, metrics = compiled.step(state, batch)
            if step == start_step + 1:  # the call returns once compiled; the step itself runs asynchronously
                log.info("first train step: traced and compiled in %.1f s", time.time() - t_step)
            pending.append(metrics)
            if step == start_step + 1 and config.train.max_train_seconds:
                jax.block_until_ready(state)  # the time budget counts training steps, not the first compilation
                t_loop = time.time()
            out_of_time = 0 < config.train.max_train_seconds < time.time() - t_loop
            if step % config.train.log_every == 0 or step == num_steps or out_of_time:
                faults.check_finite(pending, first_step=step - len(pending) + 1)
                host = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
                dt = time.time() - t_log
                host["pairs_per_sec"] = len(pending) * config.train.batch_size / dt
                writer.write(step, host, prefix="train/")
                progress.set_postfix(loss=f"{host['loss']:.3f}", pairs_s=f"{host['pairs_per_sec']:.0f}")
                pending, t_log = [], time.time()
            val = None
            if config.train.eval_every and step % config.train.eval_every == 0 and step != num_steps:
                val = suite.evaluate_split(graphdef, compiled.global_state(state)["params"], split_sources["val"],
                                           tokenizer, config, with_zeroshot=False)
                writer.write(step, val, prefix="val/")
                t_log = time.time()
            stopping = stop.requested(step)
            if ckpt.should_save(step, num_steps, stopping=stopping or out_of_time, val_metrics=val):
                faults.check_finite(pending, first_step=step - len(pending) + 1)
                ckpt.save(step, compiled.global_state(state), train_iter, val_metrics=val)
            if stopping:
                raise faults.Preempted(step, stop.received)
            progress.update(1)
            if out_of_time:
                log.info("train.max_train_seconds=%s reached at step %d", config.train.max_train_seconds, step)
                break
    progress.close()
    train_iter.close()
    train_seconds = time.time() - t_start

    state = compiled.global_state(state)

    # --- Final evaluation.
    train_image_emb = (image_cache_lib.embed_features(graphdef, state["params"], train_features[0], config.eval.batch_size)
                       if train_features is not None and suite.reads_train_split(config) else None)
    train_title_emb = text_cache_lib.cached_train_titles(config, workdir, graphdef, state["params"], tokenizer,
                                                         split_sources.get("train"))
    results = suite.evaluate_all(graphdef, state["params"], split_sources, tokenizer, config, label_stats,
                                 plot_dir=workdir / "confusion", train_image_emb=train_image_emb,
                                 train_title_emb=train_title_emb)
    results["train_seconds"] = train_seconds
    results["num_params"] = int(num_params)
    results["train_steps"] = int(jax.device_get(state["step"]))
    suite.write_results(workdir, results, step=num_steps)
    writer.close()
    return results


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    import tqdm
    return tqdm.tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True,
                     mininterval=2.0)
