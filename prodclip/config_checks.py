"""Checks of a whole config, run before any compute: `validate(config)` raises ConfigError.

Every field declared with `config.one_of` holds one of its allowed values; then the cross-field
constraints: the patch size divides the image size, heads divide the width, and the option
combinations of parallel.*, the fusion encoder, the baseline towers and match.* that cannot work.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import ml_collections

from prodclip.config import (NEGATIVE_KINDS, TEXT_PRESETS, VIT_PRESETS, allowed_values, image_cache_on,
                             text_cache_on, tower_dims)
from prodclip.errors import ConfigError


def _validate_text_unlock(config) -> None:
    """optim.unlock_text_blocks: the last blocks of a locked BERT text tower."""
    n = config.optim.unlock_text_blocks
    if n < 0:
        raise ConfigError(f"'optim.unlock_text_blocks' must be >= 0 (0 = the locked tower stays whole), got {n}")
    if n == 0:
        return
    if not config.optim.lock_text:
        raise ConfigError(f"optim.unlock_text_blocks={n} unlocks blocks of a locked text tower, but optim.lock_text "
                          "is False (the whole tower trains); set optim.lock_text=True or unlock_text_blocks=0")
    if config.model.text.kind != "bert":
        raise ConfigError(f"optim.unlock_text_blocks={n} needs model.text.kind='bert', got "
                          f"{config.model.text.kind!r}")
    depth = tower_dims(config.model.text, TEXT_PRESETS)["depth"]
    if n > depth:
        raise ConfigError(f"optim.unlock_text_blocks={n} exceeds the text tower's {depth} blocks")
    if config.model.fusion.enabled:
        raise ConfigError(f"optim.unlock_text_blocks={n} does not work with model.fusion.enabled (the fusion "
                          "encoder reads cached final token states); set one of them off")
    if config.model.text.bert.mean_layers:
        raise ConfigError(f"optim.unlock_text_blocks={n} does not work with model.text.bert.mean_layers (the cache "
                          "holds only the states entering the unlocked blocks); set one of them off")


def _check_choice(config, key: str, choices: Sequence[str]) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(f"'{key}' = {value!r} is not one of {', '.join(map(repr, choices))}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks, run before any compute. Raises ConfigError."""
    for key, choices in allowed_values().items():
        _check_choice(config, key, choices)
    size, patch = config.data.image_size, config.model.image.patch_size
    if config.model.image.kind == "vit" and (patch <= 0 or size % patch):
        raise ConfigError(
            f"model.image.patch_size={patch} does not divide data.image_size={size}; "
            f"valid patch sizes: {[p for p in range(1, size + 1) if size % p == 0]}"
        )
    depth = config.model.image.stem_depth
    if config.model.image.stem == "conv" and (depth < 1 or patch % 2 ** depth):
        raise ConfigError(f"model.image.stem='conv' with model.image.stem_depth={depth} needs a patch size divisible "
                          f"by {2 ** depth}, got model.image.patch_size={patch}; valid stem_depth: "
                          f"{[d for d in range(1, 8) if patch % 2 ** d == 0]}")
    for name, tower, presets in (("image", config.model.image, VIT_PRESETS), ("text", config.model.text, TEXT_PRESETS)):
        dims = tower_dims(tower, presets)
        if dims["width"] % dims["num_heads"]:
            raise ConfigError(
                f"model.{name}: width {dims['width']} is not divisible by num_heads {dims['num_heads']}"
            )
    if config.model.text.pooling == "cls" and config.model.text.mask == "causal":
        raise ConfigError("model.text.pooling='cls' with a causal mask sees only the first token; use eot or mean")
    for key in ("train.batch_size", "train.num_steps", "tokenizer.context_length", "model.embed_dim",
                "train.image_cache_views", "train.text_cache_views"):
        group, field = key.split(".")
        if config[group][field] <= 0:
            raise ConfigError(f"'{key}' must be positive, got {config[group][field]}")
    if config.train.text_cache_views > 1 and not (image_cache_on(config) and text_cache_on(config)):
        raise ConfigError(f"train.text_cache_views={config.train.text_cache_views} needs both feature caches "
                          "(optim.lock_image, optim.lock_text, data.augment=False, train.image_cache and "
                          "train.text_cache 'auto'); otherwise shorten titles per step with data.title_dropout_prob")
    if config.train.text_cache_views > 1 and not 0.0 < config.data.title_dropout_prob <= 1.0:
        raise ConfigError(f"train.text_cache_views={config.train.text_cache_views} reads a shortened title view "
                          f"with probability data.title_dropout_prob, which is {config.data.title_dropout_prob}; "
                          "set it in (0, 1]")
    if config.loss.hard_negatives < 0 or config.loss.hard_negative_weight < 0:
        raise ConfigError(f"loss.hard_negatives ({config.loss.hard_negatives}) and loss.hard_negative_weight "
                          f"({config.loss.hard_negative_weight}) must be >= 0")
    if config.loss.hard_negatives and not image_cache_on(config):
        raise ConfigError(f"loss.hard_negatives={config.loss.hard_negatives} needs cached image features "
                          "(optim.lock_image, data.augment=False, train.image_cache='auto'); set it to 0 otherwise")
    if config.loss.hard_negatives and config.train.grad_accum_steps > 1:
        raise ConfigError(f"loss.hard_negatives={config.loss.hard_negatives} works with train.grad_accum_steps=1; "
                          "set it to 0 otherwise")
    for key in ("eval.querybank_k", "embed.querybank_k"):
        group, name = key.split(".")
        if config[group][name] < 0:
            raise ConfigError(f"'{key}' must be >= 0 (0 = off), got {config[group][name]}")
    if not 0.0 <= config.eval.short_query_keep_prob <= 1.0:
        raise ConfigError(f"'eval.short_query_keep_prob' must be in [0, 1] (0 = off), got "
                          f"{config.eval.short_query_keep_prob}")
    if config.train.num_steps < config.optim.warmup_steps:
        raise ConfigError(
            f"optim.warmup_steps={config.optim.warmup_steps} exceeds train.num_steps={config.train.num_steps}"
        )
    _validate_parallel(config)
    _validate_fusion(config)
    _validate_baselines(config)
    if config.data.name == "tfds" and not (config.data.tfds_name and config.data.data_dir):
        raise ConfigError("data.name='tfds' needs data.tfds_name and data.data_dir (a prepared TFDS data_dir)")
    if config.data.num_workers < 0:
        raise ConfigError(f"'data.num_workers' must be >= 0, got {config.data.num_workers}")
    for entry in config.eval.class_names:
        label, _, rest = entry.partition(":")
        if not (label.strip() and "=" in rest):
            raise ConfigError(f"eval.class_names entry {entry!r} must look like 'label:raw value=readable name'")
    if not 0.0 <= config.embed.image_weight <= 1.0:
        raise ConfigError(f"'embed.image_weight' must be in [0, 1], got {config.embed.image_weight}")
    if config.embed.shard_size <= 0 or config.embed.chunk_size <= 0:
        raise ConfigError("'embed.shard_size' and 'embed.chunk_size' must be positive")
    for entry in config.eval.label_templates:
        label, sep, template = entry.partition(":")
        if not (sep and label.strip() and "{}" in template):
            raise ConfigError(f"eval.label_templates entry {entry!r} must look like 'label:template with {{}}'")
    if config.checkpoint.keep < 1 or config.checkpoint.every_steps < 0:
        raise ConfigError("checkpoint.keep must be >= 1 and checkpoint.every_steps >= 0 (0 = only at the end)")
    if config.checkpoint.best_metric and not (config.checkpoint.best_metric.startswith("val/")
                                              and config.train.eval_every > 0):
        raise ConfigError(f"checkpoint.best_metric={config.checkpoint.best_metric!r} must name a val metric "
                          "(e.g. 'val/t2i/R@1', 'val/i2t/mAP') and needs train.eval_every > 0")
    if config.model.text.eot_rule == "eos_id" and config.model.text.eos_id < 0:
        raise ConfigError("model.text.eot_rule='eos_id' needs model.text.eos_id (the end-of-text token id)")
    for key in ("image_lr_mult", "text_lr_mult"):
        if config.optim[key] < 0:
            raise ConfigError(f"'optim.{key}' must be >= 0, got {config.optim[key]}")
    for pattern in config.optim.frozen_patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optim.frozen_patterns: {pattern!r} is not a valid regex: {e}") from e
    _validate_match(config)
    _validate_text_unlock(config)
    if config.data.name == "catalog" and not config.data.path:
        raise ConfigError("data.name='catalog' needs data.path (a parquet/CSV/JSONL manifest or a folder)")


def _validate_baselines(config: ml_collections.ConfigDict) -> None:
    """The ResNet / BERT towers, the matcher and the LiT text cache (issue 14)."""
    from prodclip.models import bert, efficientnet, resnet

    m = config.model
    if m.image.kind == "resnet":
        r = m.image.resnet
        if r.depth not in resnet.DEPTHS:
            raise ConfigError(f"model.image.resnet.depth={r.depth} is not one of {sorted(resnet.DEPTHS)}")
        if m.image.pooling not in ("gap", "map"):
            raise ConfigError(f"model.image.pooling={m.image.pooling!r}: a ResNet pools with 'gap' or 'map'")
        stem, outs = resnet.stage_channels(r.depth, r.width_mult)
        if stem < 1 or r.norm_groups < 1 or any(c % r.norm_groups for c in (stem, *outs)):
            raise ConfigError(f"model.image.resnet.norm_groups={r.norm_groups} must divide every channel count "
                              f"{(stem, *outs)} (width_mult={r.width_mult})")
        if m.image.pooling == "map" and outs[-1] % r.pool_heads:
            raise ConfigError(f"model.image.resnet.pool_heads={r.pool_heads} does not divide the final width {outs[-1]}")
    if m.image.pooling in efficientnet.STAGED_POOLINGS and not m.image.kind.startswith("efficientnet"):
        raise ConfigError(f"model.image.pooling={m.image.pooling!r} pools an EfficientNet's stages; model.image.kind="
                          f"{m.image.kind!r} pools with cls, gap or map")
    if m.image.kind.startswith("efficientnet"):
        if m.image.pooling not in efficientnet.POOLINGS:
            raise ConfigError(f"model.image.pooling={m.image.pooling!r}: an EfficientNet pools with one of "
                              f"{', '.join(efficientnet.POOLINGS)}")
        if m.image.pooling == "map" and 1280 % m.image.resnet.pool_heads:
            raise ConfigError(f"model.image.resnet.pool_heads={m.image.resnet.pool_heads} does not divide the "
                              "EfficientNet feature width 1280")
    elif m.image.init_checkpoint:
        raise ConfigError("model.image.init_checkpoint (imported EfficientNet weights) needs model.image.kind="
                          "'efficientnet_lite0' | 'efficientnet_lite1' | 'efficientnet_lite2'")
    if m.text.kind == "bert":
        if m.text.mask != "bidirectional":
            raise ConfigError("model.text.kind='bert' is bidirectional: set model.text.mask='bidirectional'")
        if m.text.pooling not in ("cls", "mean"):
            raise ConfigError(f"model.text.pooling={m.text.pooling!r}: a BERT tower pools with 'cls' or 'mean'")
        if m.text.bert.max_positions < config.tokenizer.context_length:
            raise ConfigError(f"model.text.bert.max_positions={m.text.bert.max_positions} is below "
                              f"tokenizer.context_length={config.tokenizer.context_length}")
        dims = tower_dims(m.text, TEXT_PRESETS)
        layers = tuple(m.text.bert.mean_layers)
        if not bert.valid_mean_layers(layers, dims["depth"]):
            raise ConfigError(f"model.text.bert.mean_layers={layers}: give increasing layer indices from 0 (the "
                              f"embeddings) to {dims['depth'] - 1} (the block below the last), e.g. (0,)")
        width = bert.pooled_width(dims["width"], layers)
        if not m.text.bert.projection and m.head.text == "none" and m.embed_dim != width:
            raise ConfigError(f"model.text.bert.projection=False needs model.embed_dim == the text width {width} "
                              f"(or a model.head.text), got {m.embed_dim}")
    elif m.text.pretrained:
        raise ConfigError("model.text.pretrained (a HF BERT dir) needs model.text.kind='bert'")
    elif m.text.bert.mean_layers:
        raise ConfigError("model.text.bert.mean_layers pools a BERT tower's layers; it needs model.text.kind='bert'")
    if m.matcher.kind != "none" and (m.matcher.hidden < 1 or m.matcher.depth < 1):
        raise ConfigError("model.matcher.hidden and model.matcher.depth must be >= 1")
    if config.train.max_train_seconds < 0:
        raise ConfigError(f"train.max_train_seconds must be >= 0, got {config.train.max_train_seconds}")


def _validate_parallel(config: ml_collections.ConfigDict) -> None:
    """Option combinations of parallel.* and train.grad_accum_steps that cannot work."""
    p = config.parallel
    shape = tuple(p.mesh_shape)
    if len(shape) != 2 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ConfigError(
            f"parallel.mesh_shape={shape} must be two sizes (data, fsdp), each positive or -1 (at most one -1)")
    if p.loss == "ring":
        if config.loss.extra_positives:
            raise ConfigError("parallel.loss='ring' knows only the diagonal positives; "
                              "set loss.extra_positives=False or use parallel.loss='all_gather'")
        if config.loss.label_smoothing:
            raise ConfigError("parallel.loss='ring' has no label smoothing; set loss.label_smoothing=0.0")
    if p.strategy == "pmap" and p.loss != "all_gather":
        raise ConfigError("parallel.strategy='pmap' gathers embeddings with all_gather; "
                          "set parallel.loss='all_gather' (the ring loss needs strategy='sharded')")
    accum = config.train.grad_accum_steps
    if accum <= 0 or config.train.batch_size % accum:
        raise ConfigError(f"train.grad_accum_steps={accum} must be positive and divide "
                          f"train.batch_size={config.train.batch_size}")


def _validate_fusion(config: ml_collections.ConfigDict) -> None:
    """model.fusion.*, loss.itm_weight, eval.rerank_*: shapes, ranges, and the steps the ITM loss runs in."""
    f = config.model.fusion
    if config.eval.rerank_k < 0:
        raise ConfigError(f"'eval.rerank_k' must be >= 0 (0 = no re-ranking), got {config.eval.rerank_k}")
    if not (math.isfinite(config.eval.rerank_itc_weight) and config.eval.rerank_itc_weight >= 0):
        raise ConfigError(f"'eval.rerank_itc_weight' must be a finite number >= 0, got {config.eval.rerank_itc_weight}")
    if not f.enabled:
        return
    if config.model.image.test_time_flip:
        raise ConfigError("model.image.test_time_flip=True does not work with model.fusion.enabled (the fusion "
                          "encoder reads one view's tokens); pass --config.model.image.test_time_flip=False")
    if not config.model.image.kind.startswith(("vit", "efficientnet")) or config.model.text.kind not in (
            "transformer", "bert"):
        raise ConfigError("model.fusion.enabled=True reads the ViT's patch tokens (or the EfficientNet's feature map) "
                          f"and the text tower's token states; got model.image.kind={config.model.image.kind!r}, "
                          f"model.text.kind={config.model.text.kind!r} (valid: 'vit' or 'efficientnet_lite*', and "
                          "'transformer' or 'bert')")
    if f.image_grid < 0 or f.itm_rows < 0 or f.itm_rows > config.train.batch_size:
        raise ConfigError(f"model.fusion.image_grid ({f.image_grid}) must be >= 0 and model.fusion.itm_rows "
                          f"({f.itm_rows}) in [0, train.batch_size={config.train.batch_size}] (0 = off)")
    if f.image_grid:
        image = config.model.image
        side = (-(-config.data.image_size // 32) if image.kind.startswith("efficientnet")
                else config.data.image_size // image.patch_size)
        if side % f.image_grid:
            valid = [g for g in range(1, side + 1) if side % g == 0]
            raise ConfigError(f"model.fusion.image_grid={f.image_grid} must divide the side of the image tower's "
                              f"{side} x {side} token map at data.image_size={config.data.image_size}; valid: {valid}")
    if config.model.matcher.kind != "none":
        raise ConfigError("model.fusion.enabled=True and model.matcher.kind="
                          f"{config.model.matcher.kind!r} are two match heads; use one (matcher.kind='none')")
    if f.depth < 1 or f.width < 1 or f.num_heads < 1 or f.width % f.num_heads:
        raise ConfigError(f"model.fusion: depth {f.depth}, width {f.width} and num_heads {f.num_heads} must be "
                          "positive, and width divisible by num_heads")
    if config.loss.itm_weight < 0:
        raise ConfigError(f"'loss.itm_weight' must be >= 0, got {config.loss.itm_weight}")
    # The ITM loss needs the global-batch similarities and the towers' token states in one step.
    if config.parallel.strategy != "sharded" or config.parallel.loss != "all_gather":
        raise ConfigError("model.fusion.enabled=True trains with parallel.strategy='sharded' and "
                          "parallel.loss='all_gather' (hard negatives are drawn from the gathered [B, B] "
                          f"similarities); got strategy={config.parallel.strategy!r}, loss={config.parallel.loss!r}")
    if config.train.grad_accum_steps != 1:
        raise ConfigError("model.fusion.enabled=True needs train.grad_accum_steps=1: GradCache caches embedding "
                          "gradients only, and the ITM loss also reads the towers' token states")
def _validate_match(config: ml_collections.ConfigDict) -> None:
    """Values of match.* that cannot work."""
    m = config.match
    bad = [k for k in m.negative_kinds if k not in NEGATIVE_KINDS]
    if bad or not m.negative_kinds:
        raise ConfigError(f"match.negative_kinds={tuple(m.negative_kinds)} must be a non-empty subset of {NEGATIVE_KINDS}")
    if not 0.0 < m.target_precision <= 1.0:
        raise ConfigError(f"'match.target_precision' must be in (0, 1], got {m.target_precision}")
    if not (0 < m.audit_error_rate < 1 and 0 < m.audit_target_precision <= 1):
        raise ConfigError(f"match.audit_error_rate must be in (0, 1) (got {m.audit_error_rate}) and "
                          f"match.audit_target_precision in (0, 1] (got {m.audit_target_precision})")
    if m.hubness_k < 0:
        raise ConfigError(f"match.hubness_k must be >= 0 (0 = raw cosines), got {m.hubness_k}")
    if m.calibration == "native" and (m.hubness_k or m.attribute_labels):
        raise ConfigError("match.calibration='native' applies the model's logit scale to raw cosines; with "
                          f"match.hubness_k={m.hubness_k} or match.attribute_labels={tuple(m.attribute_labels)} "
                          "use 'platt' or 'auto'")
    unknown = [label for label in m.attribute_labels if label not in config.data.label_columns]
    if unknown:
        raise ConfigError(f"match.attribute_labels {unknown} are not data.label_columns "
                          f"{tuple(config.data.label_columns)}; name label columns (e.g. colour, gender) or ()")
    if m.ece_bins < 2 or m.looks_like_k < 1 or m.report_rows < 0:
        raise ConfigError("match.ece_bins must be >= 2, match.looks_like_k >= 1 and match.report_rows >= 0")
