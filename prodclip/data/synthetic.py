"""A procedural product catalog: deterministic per seed, no download needed.

Each item is a product of one of 16 categories with a main colour (12), a pattern (6), an
optional trim colour on a category-specific part (collar and cuffs, sole, handle, waistband,
...) and a brand (8), drawn by `synthetic_images.render_product`. Titles are built from these
attributes through several templates with synonyms, filler words and sometimes-omitted
attributes, the way real catalog titles look; the category and main colour are always named,
and every attribute a title names is visible in the image.

Splits are independent draws: item `i` of a split gets its own random stream
from (seed, split name, i), so a smaller catalog is a prefix of a larger one.
The `compositional` split holds the (category, colour) pairs that
`heldout_pairs(seed)` reserves; train/val/test never contain them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Any, Callable

import numpy as np

from prodclip.data.synthetic_images import COLOUR_RGB, PRODUCTS, render_product

SPLITS = ("train", "val", "test", "compositional")
MIN_IMAGE_SIZE = 32
HELDOUT_FRACTION = 0.1
_ID_STRIDE = 1_000_000_000  # ids are split_index * _ID_STRIDE + item index
_TRIM_ABSENT_PROB = 0.2
_BRAND_OMITTED_PROB = 0.25
_SOLID_OMITTED_PROB = 0.6

COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
NO_TRIM = "none"

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet", "crimson"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "lemon"),
    "green": ("green", "emerald"),
    "blue": ("blue", "royal blue", "cobalt"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
    "brown": ("brown", "chocolate"),
    "beige": ("beige", "cream", "sand"),
    "black": ("black", "jet black"),
    "white": ("white", "snow white"),
    "grey": ("grey", "gray", "ash"),
}

PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checked", "zigzag", "diagonal")
PATTERN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain"),
    "striped": ("striped", "stripe", "pinstripe"),
    "dotted": ("dotted", "polka dot", "spotted"),
    "checked": ("checked", "plaid", "gingham"),
    "zigzag": ("zigzag", "chevron"),
    "diagonal": ("diagonal", "slanted line", "twill print"),
}

BRANDS: tuple[str, ...] = ("Aurel", "Brisko", "Kestrel", "Lumen", "Marlow", "Orbit", "Quill", "Tundra")

CATEGORIES: tuple[str, ...] = tuple(PRODUCTS)
CATEGORY_SYNONYMS: dict[str, tuple[str, ...]] = {name: p.synonyms for name, p in PRODUCTS.items()}
TRIM_PART_WORDS: dict[str, tuple[str, ...]] = {name: p.trim_parts for name, p in PRODUCTS.items()}

_FILLERS: dict[str, tuple[str, ...]] = {
    "apparel": ("men's", "women's", "unisex", "kids'", "casual", "slim fit", "cotton", "summer", "organic"),
    "shoes": ("men's", "women's", "unisex", "casual", "leather", "lightweight", "everyday"),
    "bags": ("leather", "canvas", "travel", "everyday", "vegan leather", "compact"),
    "accessories": ("unisex", "classic", "sport", "retro", "everyday"),
    "home": ("ceramic", "modern", "home", "minimalist", "nordic-style", "handmade"),
}
_GENERIC_FILLERS = ("new", "premium", "classic", "essential", "bestseller", "limited edition", "2024")

LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "category": CATEGORIES,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "trim": COLOURS + (NO_TRIM,),
    "brand": BRANDS,
}


@dataclasses.dataclass(frozen=True)
class Catalog:
    """One split of the synthetic catalog, random access.

    images: [N, H, W, 3] uint8 RGB. titles: N strings. ids: [N] int64, unique across splits.
    labels: name -> [N] int32 index into label_names[name]; names are "category", "colour",
    "pattern", "trim" (index len(COLOURS), "none", when the product has no trim) and "brand".
    """
    images: np.ndarray
    titles: list[str]
    ids: np.ndarray
    labels: dict[str, np.ndarray]
    label_names: dict[str, tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.titles)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """{"image": [H, W, 3] uint8, "title": str, "id": int, <label name>: int}."""
        item: dict[str, Any] = {"image": self.images[i], "title": self.titles[i], "id": int(self.ids[i])}
        item.update({name: int(values[i]) for name, values in self.labels.items()})
        return item


def _stable_hash(text: str) -> int:
    """A hash of `text` that, unlike hash(), is the same in every process."""
    return zlib.crc32(text.encode("utf-8"))


@functools.lru_cache(maxsize=None)
def heldout_pairs(seed: int = 0) -> frozenset[tuple[int, int]]:
    """The (category index, colour index) pairs reserved for the `compositional` split.

    About HELDOUT_FRACTION of all pairs, at most two per category and per colour so that
    every category and every colour is still seen in training with most partners.
    """
    rng = np.random.default_rng([seed, _stable_hash("heldout_pairs")])
    target = round(HELDOUT_FRACTION * len(CATEGORIES) * len(COLOURS))
    per_category = np.zeros(len(CATEGORIES), int)
    per_colour = np.zeros(len(COLOURS), int)
    chosen = set()
    for flat in rng.permutation(len(CATEGORIES) * len(COLOURS)):
        category, colour = divmod(int(flat), len(COLOURS))
        if per_category[category] < 2 and per_colour[colour] < 2:
            chosen.add((category, colour))
            per_category[category] += 1
            per_colour[colour] += 1
            if len(chosen) == target:
                break
    return frozenset(chosen)


def _allowed_pairs(split: str, seed: int) -> np.ndarray:
    """[P, 2] int (category, colour) pairs that `split` draws from, in a fixed order."""
    held = heldout_pairs(seed)
    all_pairs = [(c, k) for c in range(len(CATEGORIES)) for k in range(len(COLOURS))]
    wanted = [p for p in all_pairs if (p in held) == (split == "compositional")]
    return np.asarray(wanted, np.int64)


def _pick(rng: np.random.Generator, options: tuple[str, ...], canonical_prob: float = 0.5) -> str:
    """options[0] with probability canonical_prob, else one of the others."""
    if len(options) == 1 or rng.random() < canonical_prob:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


_TEMPLATES: tuple[Callable[[dict[str, str]], str], ...] = (
    lambda w: f"{w['brand']} {w['filler']} {w['colour']} {w['pattern']} {w['category']} {w['trim_with']}",
    lambda w: f"{w['filler']} {w['category']} in {w['colour']} {w['pattern']} {w['trim_with']} - {w['brand']}",
    lambda w: f"{w['colour']} {w['pattern']} {w['category']} | {w['trim_plain']} | {w['brand']}",
    lambda w: f"{w['brand']}: {w['category']}, {w['colour']}, {w['pattern']}, {w['trim_plain']}",
    lambda w: f"{w['filler']} {w['pattern']} {w['category']} ({w['colour']}) {w['trim_with']} by {w['brand']}",
    lambda w: f"{w['pattern']} {w['colour']} {w['category']} with {w['trim_plain']} {w['filler']} {w['brand']}",
)


def _tidy(title: str) -> str:
    """Removes the gaps and dangling separators that omitted attributes leave behind."""
    title = re.sub(r"\(\s*\)", "", title)
    title = re.sub(r"\s+", " ", title)
    title = re.sub(r"\s+([,:)])", r"\1", title)
    title = re.sub(r"(\s*[,|]\s*)+(?=[,|]|$)", "", title)
    title = re.sub(r"(\s*(,|\|)\s*)+", lambda m: m.group(2) + " " if m.group(2) == "," else " | ", title)
    title = re.sub(r"\s+(-|by|with|\|)\s*$", "", title)
    title = re.sub(r"\s+with\s+(-|by|\|)\s", r" \1 ", title)
    title = re.sub(r"^\s*[:|,-]\s*", "", title)
    return re.sub(r"\s+", " ", title).strip(" ,|:-")


def make_title(rng: np.random.Generator, category: int, colour: int, pattern: int, trim: int,
               brand: int) -> str:
    """A catalog-style title naming the category and main colour (always), the pattern (solid
    often omitted), the trim colour and part (when the product has trim) and the brand (usually)."""
    product = PRODUCTS[CATEGORIES[category]]
    pattern_name = PATTERNS[pattern]
    words = {
        "category": _pick(rng, product.synonyms),
        "colour": _pick(rng, COLOUR_SYNONYMS[COLOURS[colour]], 0.6),
        "pattern": "" if pattern_name == "solid" and rng.random() < _SOLID_OMITTED_PROB
        else _pick(rng, PATTERN_SYNONYMS[pattern_name], 0.6),
        "brand": "" if rng.random() < _BRAND_OMITTED_PROB else BRANDS[brand],
        "trim_with": "", "trim_plain": "",
    }
    if trim < len(COLOURS):
        trim_colour = _pick(rng, COLOUR_SYNONYMS[COLOURS[trim]], 0.7)
        part = _pick(rng, product.trim_parts, 0.6)
        words["trim_plain"] = f"{'contrast ' if rng.random() < 0.2 else ''}{trim_colour} {part}"
        words["trim_with"] = f"with {words['trim_plain']}"
    fillers = _FILLERS[product.group] + _GENERIC_FILLERS
    num_fillers = int(rng.choice(3, p=(0.3, 0.5, 0.2)))
    words["filler"] = " ".join(fillers[int(k)] for k in rng.choice(len(fillers), num_fillers, replace=False))
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    if not words["trim_plain"] and template is _TEMPLATES[5]:
        template = _TEMPLATES[0]
    title = _tidy(template(words))
    casing = rng.random()
    if casing < 0.2:
        title = title.lower()
    elif casing < 0.4:
        title = " ".join(w[:1].upper() + w[1:] for w in title.split(" "))
    else:
        title = title[:1].upper() + title[1:]
    return title


def make_catalog(split: str, num_items: int, seed: int = 0, image_size: int = 64) -> Catalog:
    """`num_items` products of `split`, identical bytes for the same arguments.

    Item i draws everything (attributes, title, placement, noise) from its own stream seeded
    by (seed, split, i): splits are independent and a catalog is a prefix of any larger one.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    pairs = _allowed_pairs(split, seed)
    split_key = _stable_hash(split)
    images = np.empty((num_items, image_size, image_size, 3), np.uint8)
    titles: list[str] = []
    labels = {name: np.empty(num_items, np.int32) for name in LABEL_NAMES}
    for i in range(num_items):
        rng = np.random.default_rng([seed, split_key, i])
        category, colour = (int(v) for v in pairs[rng.integers(len(pairs))])
        pattern = int(rng.integers(len(PATTERNS)))
        if rng.random() < _TRIM_ABSENT_PROB:
            trim = len(COLOURS)
        else:
            trim = int(rng.integers(len(COLOURS) - 1))
            trim += trim >= colour  # any colour but the main one
        brand = int(rng.integers(len(BRANDS)))
        for name, value in zip(LABEL_NAMES, (category, colour, pattern, trim, brand)):
            labels[name][i] = value
        titles.append(make_title(rng, category, colour, pattern, trim, brand))
        images[i] = render_product(rng, image_size, CATEGORIES[category], COLOURS[colour], PATTERNS[pattern],
                                   COLOURS[trim] if trim < len(COLOURS) else None, brand)
    ids = SPLITS.index(split) * _ID_STRIDE + np.arange(num_items, dtype=np.int64)
    return Catalog(images=images, titles=titles, ids=ids, labels=labels, label_names=dict(LABEL_NAMES))


def distinctness(catalog: Catalog) -> dict[str, float]:
    """Fractions of items whose title / visible attribute combination is unique in the catalog.

    Retrieval can only tell apart items that differ visibly, so both matter.
    """
    n = max(len(catalog), 1)
    combos = np.stack([catalog.labels[name] for name in LABEL_NAMES], axis=1)
    _, combo_counts = np.unique(combos, axis=0, return_counts=True)
    _, title_counts = np.unique(np.asarray(catalog.titles, dtype=object).astype(str), return_counts=True)
    return {
        "distinct_titles": len(set(catalog.titles)) / n,
        "unique_titles": float(np.sum(title_counts == 1)) / n,
        "distinct_attribute_combos": float(len(combo_counts)) / n,
        "unique_attribute_combos": float(np.sum(combo_counts == 1)) / n,
    }
