"""Quickstart + fusion re-ranking: the quickstart CLIP plus a 2 x 128 fusion encoder trained with ITM on hard negatives.

    prodclip train --config configs/quickstart_fusion.py --workdir runs/quickstart_fusion

Same data, towers (conv stem), batch, steps and seed as configs/quickstart.py; the total loss
is the CLIP loss + 1.0 x ITM on hard negatives, its pairs made from complete titles only
(loss.itm_complete_titles_only, the default). The final evaluation reports the two-tower
and the fusion-re-ranked R@1/5/10 side by side (each query's two-tower top 32 re-scored by
ITM + ITC).
"""

import pathlib

from prodclip.config_loading import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("quickstart.py"))
    c.model.fusion.enabled = True
    c.model.fusion.depth = 2
    c.model.fusion.width = 128
    c.model.fusion.num_heads = 4
    c.loss.itm_weight = 1.0
    c.eval.rerank_k = 32
    c.eval.rerank_mode = "itm+itc"
    return c
