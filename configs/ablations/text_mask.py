"""Ablation (e): a causal (CLIP) vs a bidirectional text tower, with its pooling.

    prodclip sweep configs/ablations/text_mask.py --workdir runs/sweeps/text_mask
    prodclip sweep --report runs/sweeps/text_mask

CLIP's text Transformer is causal and pools at the end-of-text token; a bidirectional
encoder can pool there too, at the first ([CLS]) token, or by the mean over tokens.

Budget: small_base.py, batch 128 x 512 steps = 65,536 pairs per run; 4 variants x 3 seeds
= 12 runs.
"""

import pathlib

from prodclip import sweep_grid
from prodclip.config_loading import load_config_file


def get_config():
    return load_config_file(pathlib.Path(__file__).with_name("small_base.py"))


def get_sweep():
    return sweep_grid.Sweep(
        axes=(sweep_grid.axis("text", {
            "causal_eot": {"model.text.mask": "causal", "model.text.pooling": "eot"},
            "bidir_eot": {"model.text.mask": "bidirectional", "model.text.pooling": "eot"},
            "bidir_cls": {"model.text.mask": "bidirectional", "model.text.pooling": "cls"},
            "bidir_mean": {"model.text.mask": "bidirectional", "model.text.pooling": "mean"},
        }),),
        seeds=(0, 1, 2),
        metrics=("test/t2i/R@1", "test/i2t/R@1", "test/zeroshot/category/top1", "test/zeroshot/colour/top1"),
        plots=(sweep_grid.Plot(x="text", metric="test/t2i/R@1"),
               sweep_grid.Plot(x="text", metric="test/zeroshot/category/top1")),
    )
