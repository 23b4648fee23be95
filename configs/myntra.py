"""Real catalog: 35k Myntra fashion products (60x80 photos + catalog titles), from scratch on a 2-core CPU.

    prodclip train --config configs/myntra.py --workdir runs/myntra
    prodclip eval --workdir runs/myntra --config.data.path=/path/to/other_catalog.parquet

This is the config to copy for your own catalog: point `data.path` at a folder holding
train.parquet / val.parquet (one row per product, image bytes in a column), name the
columns, and give readable prompt names for the label values you classify zero-shot.
Where the data is: --config.data.path=DIR (a folder with train.parquet and val.parquet), else
the environment variable PRODCLIP_MYNTRA_DIR, else ../shared/data/myntra beside the repository.
A path that does not exist fails with one line saying so. Tune on `val` only.
"""

import os
import pathlib

from prodclip.config import base_config

DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "myntra"

# Raw articleType values read badly in prompts ("Tshirts", "Casual Shoes"); each readable
# name may list synonyms separated by '|', and all of them are averaged into the class.
ARTICLE_TYPE_NAMES = {
    "Accessory Gift Set": "accessory gift set", "Backpacks": "backpack", "Bangle": "bangle",
    "Belts": "belt", "Bracelet": "bracelet", "Capris": "capris", "Caps": "cap",
    "Casual Shoes": "casual shoes|sneakers", "Churidar": "churidar", "Clutches": "clutch",
    "Cufflinks": "cufflinks", "Dresses": "dress", "Duffel Bag": "duffel bag", "Dupatta": "dupatta",
    "Earrings": "earrings", "Flats": "flats", "Flip Flops": "flip flops", "Formal Shoes": "formal shoes",
    "Handbags": "handbag", "Heels": "heels", "Jackets": "jacket", "Jeans": "jeans", "Jeggings": "jeggings",
    "Jewellery Set": "jewellery set", "Kurta Sets": "kurta set", "Kurtas": "kurta", "Kurtis": "kurti",
    "Laptop Bag": "laptop bag", "Leggings": "leggings", "Messenger Bag": "messenger bag",
    "Mobile Pouch": "mobile pouch", "Mufflers": "muffler", "Necklace and Chains": "necklace|chain",
    "Patiala": "patiala", "Pendant": "pendant", "Ring": "ring", "Salwar": "salwar", "Sandals": "sandals",
    "Sarees": "saree", "Scarves": "scarf", "Shirts": "shirt", "Shorts": "shorts", "Skirts": "skirt",
    "Socks": "socks", "Sports Sandals": "sports sandals", "Sports Shoes": "sports shoes|running shoes",
    "Stockings": "stockings", "Stoles": "stole", "Sunglasses": "sunglasses", "Suspenders": "suspenders",
    "Sweaters": "sweater", "Sweatshirts": "sweatshirt", "Ties": "tie", "Tops": "top",
    "Track Pants": "track pants", "Tracksuits": "tracksuit", "Trousers": "trousers", "Tshirts": "t-shirt|tshirt",
    "Tunics": "tunic", "Wallets": "wallet", "Watches": "watch",
}
GENDER_NAMES = {"Men": "men", "Women": "women", "Boys": "boys", "Girls": "girls", "Unisex": "unisex"}


def get_config():
    c = base_config()
    c.data.name = "catalog"
    c.data.path = os.environ.get("PRODCLIP_MYNTRA_DIR", str(DEFAULT_DIR))
    c.data.image_column = "image"
    c.data.id_column = "id"
    c.data.title_template = "{title}"
    c.data.label_columns = ("articleType", "baseColour", "gender")
    c.data.eval_splits = ("val",)
    c.data.num_train = 0  # 0 = every row
    c.data.num_val = 0
    c.data.image_size = 48
    c.data.resize = "pad"  # 60x80 portrait photos, letterboxed on white (their studio background)
    c.data.augment = True  # crop + flip only; colour is a product attribute and is never augmented
    c.data.crop_scale_min = 0.7
    c.data.title_dropout_prob = 0.5  # partial titles, like shoppers' queries and zero-shot prompts

    c.tokenizer.vocab_size = 6000
    c.tokenizer.context_length = 24

    c.model.embed_dim = 128
    c.model.image.preset = "mu"
    c.model.image.width = 128
    c.model.image.depth = 4
    c.model.image.num_heads = 4
    c.model.image.patch_size = 8
    c.model.text.preset = "mu"
    c.model.text.width = 128
    c.model.text.depth = 3
    c.model.text.num_heads = 4

    c.loss.name = "softmax"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05

    c.train.batch_size = 256
    c.train.num_steps = 800
    c.train.log_every = 50
    c.train.eval_every = 400

    c.eval.zeroshot_labels = ("articleType", "baseColour", "gender")
    c.eval.min_class_count = 20
    c.eval.zeroshot_adapt_prior = True  # also zero-shot with the photos' own class shares (EM, no labels)
    c.eval.zeroshot_train_prior = True  # and with the train photos' class shares (EM, no labels), photo by photo
    c.eval.linear_probe_labels = ("articleType",)
    c.eval.prompt_templates = ("{}", "men {}", "women {}")  # chosen on val among 4 sets (see README)
    c.eval.label_templates = (
        tuple(f"baseColour:{t}" for t in ("{}", "{} t-shirt", "{} shoes", "{} watch", "{} bag"))
        + tuple(f"gender:{t}" for t in ("{}", "{} t-shirt", "{} shoes", "{} watch")))
    c.eval.class_names = (tuple(f"articleType:{raw}={name}" for raw, name in ARTICLE_TYPE_NAMES.items())
                          + tuple(f"gender:{raw}={name}" for raw, name in GENDER_NAMES.items()))
    return c
