"""Ablation (b): the softmax temperature, learned vs fixed, and its initial value.

    prodclip sweep configs/ablations/temperature.py --workdir runs/sweeps/temperature
    prodclip sweep --report runs/sweeps/temperature

CLIP learns its logit scale t from 1/0.07 (about 14.3, clamped at 100). Here: t initialised
at 10, 1/0.07 or 50, then learned or kept fixed; CLIP softmax loss.

Budget: small_base.py as is, batch 128 x 512 steps = 65,536 pairs per run (the same
examples seen as ablation (a)); 6 variants x 3 seeds = 18 runs.
"""

import math
import pathlib

from prodclip import sweep_grid
from prodclip.config_loading import load_config_file

INITIAL_SCALES = {"10": 10.0, "14.3": 1 / 0.07, "50": 50.0}


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("small_base.py"))
    c.loss.name = "softmax"
    return c


def get_sweep():
    return sweep_grid.Sweep(
        axes=(sweep_grid.axis("temperature", {"learned": {"model.learn_temperature": True},
                                              "fixed": {"model.learn_temperature": False}}),
              sweep_grid.axis("scale_init", {label: {"model.logit_scale_init": math.log(t)}
                                             for label, t in INITIAL_SCALES.items()})),
        seeds=(0, 1, 2),
        metrics=("test/t2i/R@1", "test/i2t/R@1", "test/zeroshot/category/top1", "test/zeroshot/colour/top1"),
        plots=(sweep_grid.Plot(x="scale_init", metric="test/t2i/R@1", logx=True),
               sweep_grid.Plot(x="scale_init", metric="test/zeroshot/category/top1", logx=True)),
    )
