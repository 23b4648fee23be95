"""The shared base of the ablation sweeps: a CLIP small enough for a grid of runs on a 2-core CPU.

    prodclip train --config configs/ablations/small_base.py --workdir runs/small

The quickstart's data and prompts (synthetic catalog, title-word dropout, class names with
synonyms) at 32 px: ViT 2x64 with 8 px patches (16 tokens), text Transformer 2x64,
embedding dim 64 (about 0.3M parameters), 10k training products, evaluated on the
1,000-product test split (retrieval and zero-shot category / colour). Each ablation
config starts here and fixes its own budget (examples seen or steps).
"""

import pathlib

from prodclip.config_loading import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).parents[1] / "quickstart.py")
    c.data.image_size = 32
    c.data.num_train = 10000
    c.data.num_val = 64
    c.data.num_test = 1000
    c.data.eval_splits = ("test",)
    c.tokenizer.vocab_size = 512
    c.tokenizer.context_length = 16
    c.model.embed_dim = 64
    for tower in (c.model.image, c.model.text):
        tower.width, tower.depth, tower.num_heads = 64, 2, 2
    c.model.image.patch_size = 8
    c.train.batch_size = 128
    c.train.num_steps = 512
    c.optim.warmup_steps = 50
    c.train.log_every = 32
    c.train.eval_every = 0
    c.train.progress_bar = False
    c.checkpoint.every_steps = 128
    c.eval.zeroshot_labels = ("category", "colour")
    c.eval.confusion_png = False
    return c
