"""Ablation (c): fusion re-ranking off / on, and how many two-tower candidates it re-ranks (k).

    prodclip sweep configs/ablations/fusion.py --workdir runs/sweeps/fusion
    prodclip sweep --report runs/sweeps/fusion

Needs the fusion encoder (model.fusion.*, loss.itm_weight, eval.rerank_k; issue 6). Three
trained variants: the two-tower model alone (off); the same towers plus a 1 x 64 fusion
encoder trained with CLIP + 1.0 x ITM on hard negatives, ITM pairs made from complete
titles only (itm, the default); and the same with every title in ITM, including those that
word dropout shortened (itm_any_title, the sampler before that fix). k is an eval-only axis: each
finished run is re-evaluated with eval.rerank_k = 0, 8 and 32 (no retraining), so the
table shows the two-tower R@1 (test/t2i/R@1) next to the re-ranked one
(test/t2i/rerank/R@1; empty where nothing is re-ranked).

Budget: small_base.py, batch 128 x 512 steps = 65,536 pairs per run; 3 variants x 3 seeds
= 9 training runs, each evaluated 3 times.
"""

import pathlib

from prodclip import sweep_grid
from prodclip.config_loading import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("small_base.py"))
    c.model.fusion.depth = 1
    c.model.fusion.width = 64
    c.model.fusion.num_heads = 2
    c.eval.rerank_mode = "itm+itc"
    return c


def get_sweep():
    return sweep_grid.Sweep(
        axes=(sweep_grid.axis("fusion", {"off": {"model.fusion.enabled": False},
                                         "itm": {"model.fusion.enabled": True, "loss.itm_weight": 1.0},
                                         "itm_any_title": {"model.fusion.enabled": True, "loss.itm_weight": 1.0,
                                                           "loss.itm_complete_titles_only": False}}),
              sweep_grid.axis("rerank_k", [0, 8, 32], key="eval.rerank_k", stage="eval")),
        seeds=(0, 1, 2),
        metrics=("test/t2i/R@1", "test/t2i/rerank/R@1", "test/i2t/R@1", "test/i2t/rerank/R@1",
                 "test/t2i/rerank/ms_per_query"),
        plots=(sweep_grid.Plot(x="rerank_k", metric="test/t2i/rerank/R@1"),
               sweep_grid.Plot(x="rerank_k", metric="test/t2i/R@1")),
    )
