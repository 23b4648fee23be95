"""The three Myntra recipes side by side in one wall budget (docs/pretrained.md).

    prodclip train --config configs/pretrained/recipes.py --config-arg lit --workdir runs/pretrained/lit
    prodclip train --config configs/pretrained/recipes.py --config-arg finetune --workdir runs/pretrained/finetune \
        --config.train.max_train_seconds=420
    prodclip train --config configs/pretrained/recipes.py --config-arg scratch --workdir runs/pretrained/scratch \
        --config.train.max_train_seconds=420

* lit:      configs/myntra_pretrained.py (locked Lite0 + locked MiniLM, cached features, MLP heads).
* finetune: Lite0 fine-tuned end to end from ImageNet (image lr x0.3, crops + flips on), MiniLM locked
            (cached) with an MLP text head and a linear image projection; batch 128 (a step is a forward and
            backward pass of the CNN on a 2-core CPU).
* scratch:  configs/myntra.py (ViT 4x128 + text Transformer 3x128 from random init).

Every row logs val R@K every `train.eval_every` steps; benchmarks/pretrained_recipes.py turns the
metrics logs into the time-to-accuracy plot and the table.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import myntra  # noqa: E402
import myntra_pretrained  # noqa: E402

ROWS = ("lit", "finetune", "scratch")


def get_config(row: str = "lit"):
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
    if row == "lit":
        return myntra_pretrained.get_config()
    if row == "scratch":
        c = myntra.get_config()
        c.train.eval_every = 100
        return c
    c = myntra_pretrained.use_pretrained_towers(myntra.get_config())
    c.data.augment = True
    c.data.crop_scale_min = 0.7
    c.optim.lock_text = True
    c.model.embed_dim = 256
    c.model.head.text = "mlp"
    c.model.head.hidden = 1024
    c.optim.learning_rate = 1e-3
    c.optim.image_lr_mult = 0.3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.train.batch_size = 128
    c.train.num_steps = 3000
    c.train.log_every = 20
    c.train.eval_every = 100
    c.checkpoint.every_steps = 0
    return c
