"""Ablation (a): sigmoid (SigLIP) vs softmax (CLIP) loss across batch sizes, at equal examples seen.

    prodclip sweep configs/ablations/loss_batch.py --workdir runs/sweeps/loss_batch
    prodclip sweep --report runs/sweeps/loss_batch

SigLIP (Zhai et al., 2023) reports the sigmoid loss ahead of the softmax loss at small
batch sizes, with the gap closing as the batch grows. Here: the small_base.py model,
batch sizes 16..512, 3 seeds (model initialisation and data order; same catalog).

Budget: every run sees the same number of training pairs, EXAMPLES_SEEN = 32,768
(3.3 epochs of the 10k-product train split), so num_steps = EXAMPLES_SEEN / batch size
(2,048 steps at 16, 64 at 512) with 10% warm-up and a cosine decay to 0. 2 losses x 6 batch
sizes x 3 seeds = 36 runs, about 25 minutes on a 2-core CPU. Equal examples
seen is the comparison SigLIP makes; it also gives every run about the same compute (the
towers dominate; the B x B loss is negligible at these sizes). The learning rate (1e-3,
AdamW) is the same at every batch size. Each loss has its paper's temperature set-up:
softmax t = 1/0.07 learned; sigmoid t = 10, bias -10, both learned.
"""

import math
import pathlib

from prodclip import sweep_grid
from prodclip.config_loading import load_config_file

EXAMPLES_SEEN = 32768
BATCH_SIZES = (16, 32, 64, 128, 256, 512)


def get_config():
    return load_config_file(pathlib.Path(__file__).with_name("small_base.py"))


def _budget(batch_size: int) -> dict:
    steps = EXAMPLES_SEEN // batch_size
    return {"train.batch_size": batch_size, "train.num_steps": steps, "optim.warmup_steps": steps // 10,
            "checkpoint.every_steps": max(steps // 4, 1), "train.log_every": max(steps // 32, 1)}


def get_sweep():
    return sweep_grid.Sweep(
        axes=(
            sweep_grid.axis("loss", {
                "softmax": {"loss.name": "softmax", "model.logit_scale_init": math.log(1 / 0.07)},
                "sigmoid": {"loss.name": "sigmoid", "model.logit_scale_init": math.log(10.0),
                            "model.logit_bias_init": -10.0},
            }),
            sweep_grid.axis("batch_size", {str(b): _budget(b) for b in BATCH_SIZES}),
        ),
        seeds=(0, 1, 2),
        metrics=("test/t2i/R@1", "test/i2t/R@1", "test/t2i/R@10", "test/zeroshot/category/top1",
                 "test/zeroshot/colour/top1"),
        plots=(sweep_grid.Plot(x="batch_size", metric="test/t2i/R@1", logx=True),
               sweep_grid.Plot(x="batch_size", metric="test/i2t/R@1", logx=True),
               sweep_grid.Plot(x="batch_size", metric="test/zeroshot/category/top1", logx=True)),
    )
