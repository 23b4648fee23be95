"""Ablation (d): image-tower pooling (class token, global average, attention probe) and patch size.

    prodclip sweep configs/ablations/pooling_patch.py --workdir runs/sweeps/pooling_patch
    prodclip sweep --report runs/sweeps/pooling_patch

SigLIP and big_vision use global average pooling or a MAP head (multihead attention
pooling) instead of CLIP's class token. At 32 px, patches of 4, 8 and 16 px give 64, 16
and 4 image tokens.

Budget: small_base.py, batch 128 x 512 steps = 65,536 pairs per run; 9 variants x 3 seeds
= 27 runs. Patch 4 costs about 4x the time of patch 8 per step (4x the tokens).
"""

import pathlib

from prodclip import sweep_grid
from prodclip.config_loading import load_config_file


def get_config():
    return load_config_file(pathlib.Path(__file__).with_name("small_base.py"))


def get_sweep():
    return sweep_grid.Sweep(
        axes=(sweep_grid.axis("pooling", ["cls", "gap", "map"], key="model.image.pooling"),
              sweep_grid.axis("patch_size", [4, 8, 16], key="model.image.patch_size")),
        seeds=(0, 1, 2),
        metrics=("test/t2i/R@1", "test/i2t/R@1", "test/zeroshot/category/top1", "test/zeroshot/colour/top1",
                 "train_seconds"),
        plots=(sweep_grid.Plot(x="patch_size", metric="test/t2i/R@1", logx=True),
               sweep_grid.Plot(x="patch_size", metric="test/zeroshot/category/top1", logx=True)),
    )
