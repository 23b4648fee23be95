"""Image feature cache: a locked image tower's output for every train image, computed once.

With `optim.lock_image` the image tower never changes, and without image augmentation
(`data.augment=False`) each train image is always the same input. So each image goes through
the tower once, before training; a training step then reads its rows of the cache as
`image_features` [B, F] and runs only the trainable image head (model.head.image) on them,
not the tower (train.py's `embed`). On a 2-core CPU this turns a pretrained EfficientNet
from most of a step's cost into a one-off cost per catalog.

The trade-off: cached features cannot be augmented per step (no fresh random crops or flips),
which is why the cache applies only with `data.augment=False`. What it can hold instead is
`train.image_cache_views` views of every photo: view 0 the photo as it is, views 1.. a fixed
augmentation of it (prodclip/data/view_augment.py: flips, crops, new backgrounds, JPEG), each
costing one more pass of the tower over the catalog; training reads a random view of each photo
per epoch (`train_iterator`), and the probe reads view 0.

A cache lives in `<train.image_cache_dir or workdir/image_cache>/<key>/`:

    features.npy   [V * N, F] float32   the tower's output per view and train row, view-major, in source order
    tokens.npy     [V * N, T, W] float16  with a fusion encoder only: the image tokens it reads, same rows
                                         (the final map, pooled to model.fusion.image_grid)
    meta.json      rows, feature width, seconds it took to compute

`key` is a SHA-256 over the image tower's weights, the image preprocessing (size, resize
mode, model.image config, dtype) and the catalog's rows (ids and image bytes), so runs (e.g.
seeds) sharing a locked tower and catalog share its cache, and any change computes a new
one. Files are written to a temporary name and renamed, so a cache that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from typing import Any, Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np

from prodclip import config as config_lib, files, trees
from prodclip.data import pipeline, view_augment
from prodclip.data.workers import ResumableIterator
from prodclip.models import inference

log = logging.getLogger("prodclip")


def catalog_digest(source) -> str:
    """SHA-256 hex of a source's rows: ids and image bytes (decoded pixels for sources without bytes)."""
    h = hashlib.sha256()
    ids = np.asarray(source.ids if hasattr(source, "ids") else [source[i]["id"] for i in range(len(source))])
    h.update(np.ascontiguousarray(ids.astype(np.int64)).tobytes())
    for i in range(len(source)):
        data = source.image_bytes(i) if hasattr(source, "image_bytes") else np.asarray(source[i]["image"]).tobytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# The towers' feature code: raise it when a tower computes other features from the same weights and config
# (a pooling's arithmetic), so that caches written by the older code are not read as the new ones.
FEATURES_VERSION = 2


def preprocessing_description(config: ml_collections.ConfigDict) -> dict:
    """Everything besides the weights that decides what the tower sees and computes."""
    # test_time_flip acts at inference only, on whole photos: the cached features are the same either way.
    image = {k: v for k, v in config.model.image.to_dict().items() if k != "test_time_flip"}
    description = {"features_version": FEATURES_VERSION, "image_size": config.data.image_size,
                   "resize": config.data.resize,
                   "image": image, "embed_dim": config.model.embed_dim, "dtype": config.model.dtype}
    if config.model.fusion.enabled:
        description["fusion_tokens"] = {"grid": config.model.fusion.image_grid, "dtype": "float16"}
    if config.train.image_cache_views > 1:
        description["views"] = {"count": config.train.image_cache_views, "seed": config.data.seed,
                                "augmentation": view_augment.SPEC}
    return description


def cache_key(image_params: Any, config: ml_collections.ConfigDict, catalog: str) -> str:
    """16 hex chars identifying the cached features: tower weights, preprocessing, catalog digest."""
    h = hashlib.sha256()
    trees.hash_tree(h, image_params)
    h.update(json.dumps(preprocessing_description(config), sort_keys=True, default=str).encode())
    h.update(catalog.encode())
    return h.hexdigest()[:16]


def compute_features(source, tokenizer, config: ml_collections.ConfigDict,
                     image_features: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """[N, F] float32: `image_features` ([b, S, S, 3] uint8 -> [b, F], b = eval.batch_size) on every
    image of `source` in order, preprocessed as at evaluation (no augmentation)."""
    return compute_arrays(source, tokenizer, config, image_features)[0].astype(np.float32)


def compute_arrays(source, tokenizer, config: ml_collections.ConfigDict, encode: Callable) -> list[np.ndarray]:
    """`encode` ([b, S, S, 3] uint8 -> one array or a tuple of arrays, each [b, ...]) on every image of
    `source` in order, preprocessed as at evaluation: one [N, ...] array per output."""
    batch_size = config.eval.batch_size
    out: list[list[np.ndarray]] = []
    for batch in pipeline.eval_batches(source, tokenizer, config, batch_size):
        images = batch["images"]
        n = len(images)
        if n < batch_size:  # pad the last chunk, so one compilation serves all
            images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
        result = encode(images)
        for i, part in enumerate(result if isinstance(result, tuple) else (result,)):
            if len(out) == i:
                out.append([])
            out[i].append(np.asarray(part)[:n])
    return [np.concatenate(parts) for parts in out]


def build_or_load(directory: str | pathlib.Path, compute: Callable[[], dict[str, np.ndarray]], num_rows: int,
                  names: Sequence[str] = ("features",), width: int | None = None) -> dict[str, np.ndarray]:
    """The arrays `names` ([num_rows, ...] each, `<name>.npy`) in `directory` if all are complete (and the
    first is `width` wide, when given), else `compute()` (a dict with those names) written there. Returns
    them memory-mapped."""
    directory = pathlib.Path(directory)
    paths = {name: directory / f"{name}.npy" for name in names}
    if all(path.is_file() for path in paths.values()):
        stored = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
        stored_width = stored[names[0]].shape[1]
        if all(a.shape[0] == num_rows for a in stored.values()) and width in (None, stored_width):
            log.info("image cache: %d x %d features read from %s", *stored[names[0]].shape[:2], directory)
            return stored
        log.warning("image cache %s has %s rows of width %d, expected %d of width %s; recomputing", directory,
                    sorted({a.shape[0] for a in stored.values()}), stored_width, num_rows, width)
    t0 = time.time()
    arrays = compute()
    seconds = time.time() - t0
    for name in names:
        if arrays[name].shape[0] != num_rows:
            raise ValueError(f"image cache: computed {arrays[name].shape[0]} rows of {name}, expected {num_rows}")
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        files.save_npy(path, arrays[name])
    first = arrays[names[0]]
    files.write_text(directory / "meta.json", json.dumps(
        {"rows": int(first.shape[0]), "width": int(first.shape[1]), "seconds": round(seconds, 2)}))
    log.info("image cache: %d images through the locked tower in %.1f s (%.0f images/s) into %s",
             num_rows, seconds, num_rows / max(seconds, 1e-9), directory)
    return {name: np.load(path, mmap_mode="r") for name, path in paths.items()}


class FeatureRows:
    """A grain source over cached features: item i = {features [F] float32 (view 0), title, id, row} of train row i.

    features: [N, F], or [V, N, F] for V cached views of each row. tokens: None, or the rows' image
    tokens [V, N, T, W] (items then carry 'image_tokens' [T, W] of the same view). titles: [N] strings, or [T][N]
    for T title views of each row (view 0 the titles as they are). negative_titles: optional N
    lists of wrong titles per row (hard negatives, evaluate/pairs.swapped_titles). `with_random_view`
    draws an image view of the row uniformly and, independently, with probability `short_title_prob`
    one of its shortened title views 1.. (uniformly), else view 0, and one of its negative titles.
    """

    def __init__(self, features: np.ndarray, titles: Sequence[str] | Sequence[Sequence[str]], ids: np.ndarray,
                 short_title_prob: float = 0.5, negative_titles: Sequence[Sequence[str]] | None = None,
                 tokens: np.ndarray | None = None):
        self.features = features if features.ndim == 3 else features[None]
        self.tokens = tokens
        if tokens is not None and tokens.shape[:2] != self.features.shape[:2]:
            raise ValueError(f"image tokens {tokens.shape[:2]} and features {self.features.shape[:2]} differ in "
                             "views or rows")
        self.short_title_prob = float(short_title_prob)
        self.title_views = [list(t) for t in titles] if titles and not isinstance(titles[0], str) else [list(titles)]
        self.titles, self.ids = self.title_views[0], np.asarray(ids, np.int64)
        self.negative_titles = [list(n) for n in negative_titles] if negative_titles is not None else None
        lengths = {len(t) for t in self.title_views} | ({len(self.negative_titles)} if self.negative_titles else set())
        if not lengths == {self.features.shape[1]} == {len(self.ids)}:
            raise ValueError(f"features ({self.features.shape[1]}), titles ({sorted(lengths)}) and ids ({len(ids)}) "
                             "differ in length")

    @property
    def views(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return len(self.titles)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        item = {"features": np.asarray(self.features[0, i], np.float32), "title": self.titles[i], "id": self.ids[i],
                "row": i}
        if self.tokens is not None:
            item["image_tokens"] = np.asarray(self.tokens[0, i])
        if self.negative_titles is not None:
            negatives = self.negative_titles[i]
            item["negative_title"] = negatives[0] if negatives else self.titles[i]
            item["has_negative"] = bool(negatives)
        return item

    @property
    def draws_per_epoch(self) -> bool:
        """True when items differ between epochs (several image, title or negative views)."""
        return (self.views > 1 or len(self.title_views) > 1
                or (self.negative_titles is not None and any(len(n) > 1 for n in self.negative_titles)))

    def with_random_view(self, item: dict, rng: np.random.Generator) -> dict:
        """The item with the features of a drawn view of its row and, with title views, its title replaced
        by a drawn title view (grain random_map)."""
        view = int(rng.integers(self.views))
        if view:
            item = {**item, "features": np.asarray(self.features[view, item["row"]], np.float32)}
            if self.tokens is not None:
                item["image_tokens"] = np.asarray(self.tokens[view, item["row"]])
        if len(self.title_views) > 1 and rng.random() < self.short_title_prob:
            title_view = 1 + int(rng.integers(len(self.title_views) - 1))
            item = {**item, "title": self.title_views[title_view][item["row"]], "title_complete": False}
        negatives = self.negative_titles[item["row"]] if self.negative_titles is not None else ()
        if len(negatives) > 1:
            item = {**item, "negative_title": negatives[int(rng.integers(len(negatives)))]}
        return item


def train_iterator(rows: FeatureRows, tokenizer, config: ml_collections.ConfigDict, *, process_index: int = 0,
                   process_count: int = 1) -> ResumableIterator:
    """Endless batches {image_features [b, F] float32, token_ids [b, L] int32, ids [b] int64, title_complete [b]},
    plus negative_token_ids [b, L] int32 and negative_mask [b] bool (a complete title with a negative)
    when `rows` has negative titles, and image_tokens [b, T, W] when it has tokens.

    The same order as pipeline.train_dataset (a fresh seeded permutation each epoch, process p
    reading rows p, p + P, ...), and resumable through get_state / set_state like it.
    """
    global_batch = config.train.batch_size
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by {process_count} processes")

    def collate(items):
        batch = {"image_features": np.stack([it["features"] for it in items]),
                 "token_ids": tokenizer([it["title"] for it in items]),
                 "ids": np.asarray([it["id"] for it in items], np.int64),
                 "title_complete": np.asarray([it.get("title_complete", True) for it in items], bool)}
        if rows.tokens is not None:
            batch["image_tokens"] = np.stack([it["image_tokens"] for it in items])
        if rows.negative_titles is not None:
            # A negative against a shortened title ("shirt") would teach nothing about the swapped attribute.
            batch["negative_token_ids"] = tokenizer([it["negative_title"] for it in items])
            batch["negative_mask"] = batch["title_complete"] & np.asarray([it["has_negative"] for it in items], bool)
        return batch

    ds = grain.MapDataset.source(rows).seed(config.seed).shuffle().repeat()
    if rows.draws_per_epoch:  # after repeat: each epoch draws its own view of a row
        ds = ds.random_map(rows.with_random_view)
    ds = ds[process_index::process_count]
    ds = ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=collate)
    return ResumableIterator(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)),
                             uses_workers=False)


def embed_features(graphdef, params: Any, features: np.ndarray, batch_size: int) -> np.ndarray:
    """[N, F] cached features -> [N, D] float32 image embeddings through the model's image head."""
    return inference.embed_cached_features(graphdef, params, features, batch_size)


def cache_root(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """The folder holding a run's image caches, one subfolder per key: train.image_cache_dir or <workdir>/image_cache."""
    return pathlib.Path(config.train.image_cache_dir) if config.train.image_cache_dir else pathlib.Path(workdir) / "image_cache"


def train_features_path(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, params: Any,
                        train_source) -> pathlib.Path:
    """Where the run's cache of `train_source`'s features for these weights and preprocessing lives
    (features.npy, [views * N, F]); it may not exist."""
    key = cache_key(params["image_tower"], config, catalog_digest(train_source))
    return cache_root(config, workdir) / key / "features.npy"


def cached_train_embeddings(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, graphdef, params: Any,
                            train_source) -> np.ndarray | None:
    """[N, D] float32 image embeddings of the train photos as they are (view 0 of the cache, through the
    image head) when the run's cache holds them for these weights, preprocessing and catalog; else
    None, also when `train_source` is None. Reads only: evaluation uses it instead of running the
    locked tower over the train photos."""
    if train_source is None or not config_lib.image_cache_on(config):
        return None
    path = train_features_path(config, workdir, params, train_source)
    if not path.is_file():
        return None
    features = np.load(path, mmap_mode="r")
    if features.shape[0] != config.train.image_cache_views * len(train_source):
        log.warning("image cache %s is incomplete (%d rows); the train photos go through the tower", path.parent,
                    features.shape[0])
        return None
    width = feature_width(inference.feature_encoders(graphdef)[0], params, config)
    if features.shape[1] != width:
        log.warning("image cache %s holds features %d wide, the tower gives %d; the train photos go through the "
                    "tower", path.parent, features.shape[1], width)
        return None
    log.info("train photos: cached features read from %s", path.parent)
    return embed_features(graphdef, params, features[:len(train_source)], config.eval.batch_size)


def feature_width(encode: Callable, params: Any, config: ml_collections.ConfigDict) -> int:
    """F, the width of the features `encode(params, [B, S, S, 3] uint8)` gives (the first output when it gives
    several), traced without running the tower."""
    size = config.data.image_size
    out = jax.eval_shape(lambda images: encode(params, images), jax.ShapeDtypeStruct((1, size, size, 3), np.uint8))
    return (out[0] if isinstance(out, tuple) else out).shape[1]


def for_run(config: ml_collections.ConfigDict, workdir: pathlib.Path, graphdef, params: Any, tokenizer,
            train_source) -> dict[str, np.ndarray] | None:
    """The run's train features {"features": [V, N, F]} (V = train.image_cache_views), plus "tokens"
    [V, N, T, W] float16 with a fusion encoder; None when `config.image_cache_on(config)` is False."""
    if not config_lib.image_cache_on(config):
        return None
    t0 = time.time()
    catalog = catalog_digest(train_source)
    key = cache_key(params["image_tower"], config, catalog)
    log.info("image cache: key %s (catalog hashed in %.1f s)", key, time.time() - t0)
    root = cache_root(config, workdir)
    with_tokens = bool(config.model.fusion.enabled)
    encode = (inference.token_state_encoders(graphdef)[0] if with_tokens
              else inference.feature_encoders(graphdef)[0])
    names = ("features", "tokens") if with_tokens else ("features",)
    views = config.train.image_cache_views
    sources = [train_source] + [view_augment.AugmentedViews(train_source, v, config.data.seed) for v in range(1, views)]

    def encode_batch(images):  # tokens in float16, batch by batch: half the memory of the cache and its build
        out = encode(params, images)
        return (np.asarray(out[0], np.float32), np.asarray(out[1], np.float16)) if with_tokens else out

    def compute():
        parts = [compute_arrays(s, tokenizer, config, encode_batch) for s in sources]
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}

    arrays = build_or_load(root / key, compute, views * len(train_source), names,
                           width=feature_width(encode, params, config))
    return {name: a.reshape(views, len(train_source), *a.shape[1:]) for name, a in arrays.items()}
