"""grain input pipeline: shuffle per epoch, shard per process, augment, tokenize, batch.

A *source* is anything with `__len__` and `__getitem__(i) -> dict` holding at least
`image` ([H, W, 3] uint8), `title` (str) and `id` (int). The synthetic catalog, the
TFDS data sources and the parquet reader all fit. Batches are dicts of numpy arrays:

    images    [b, S, S, 3] uint8     (b = global batch / process count)
    token_ids [b, L]       int32
    ids       [b]          int64
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image

from prodclip.data.tokenizer import TitleTokenizer
from prodclip.data.workers import ResumableIterator


def fit_to_square(image: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Resizes [H, W, 3] uint8 to [size, size, 3], keeping aspect ratio unless mode='stretch'.

    'pad' letterboxes with white (product photos sit on light studio backgrounds);
    'crop' takes the central square.
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    pil = Image.fromarray(image)
    if mode == "stretch" or h == w:
        return np.asarray(pil.resize((size, size), Image.BICUBIC))
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return np.asarray(pil.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(pil.resize((new_w, new_h), Image.BICUBIC), ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, *, scale_min: float,
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop of a square [S, S, 3] image covering [scale_min, 1] of its area, resized back to S."""
    size = image.shape[0]
    if scale_min >= 1.0:
        return image
    area = size * size * rng.uniform(scale_min, 1.0)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    crop_w = int(min(size, round(np.sqrt(area * aspect))))
    crop_h = int(min(size, round(np.sqrt(area / aspect))))
    top = int(rng.integers(0, size - crop_h + 1))
    left = int(rng.integers(0, size - crop_w + 1))
    crop = Image.fromarray(image[top:top + crop_h, left:left + crop_w])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def drop_title_words(title: str, rng: np.random.Generator, keep_prob: float) -> str:
    """Keeps each word with probability keep_prob (at least one), in order.

    A shortened title still describes its image, only less specifically, like a shopper's
    query or a zero-shot prompt ("navy shirt"); training on some of them teaches the text
    tower that partial descriptions belong near the product.
    """
    words = title.split()
    kept = [w for w in words if rng.random() < keep_prob]
    return " ".join(kept) if kept else words[int(rng.integers(len(words)))]


class _Preprocess(grain.transforms.RandomMap):
    """Per-item: fit to the model's input, then (train only) crop, flip and title-word dropout.

    Colour is never changed.
    """

    def __init__(self, size: int, resize: str, augment: bool, scale_min: float, flip: bool,
                 title_dropout_prob: float = 0.0, title_keep_prob: float = 1.0):
        self.size, self.resize, self.augment, self.scale_min, self.flip = size, resize, augment, scale_min, flip
        self.title_dropout_prob, self.title_keep_prob = title_dropout_prob, title_keep_prob

    def random_map(self, item: dict, rng: np.random.Generator) -> dict:
        image = fit_to_square(np.asarray(item["image"]), self.size, self.resize)
        if self.augment:
            image = random_resized_crop(image, rng, scale_min=self.scale_min)
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
        title = item["title"]
        if self.augment and self.title_dropout_prob > 0 and rng.random() < self.title_dropout_prob:
            title = drop_title_words(title, rng, self.title_keep_prob)
        return {"image": np.ascontiguousarray(image), "title": title, "id": np.int64(item["id"]),
                "title_complete": np.bool_(title == item["title"])}


def _collate(tokenizer: TitleTokenizer):
    def collate(items: Sequence[dict]) -> dict[str, np.ndarray]:
        return {
            "images": np.stack([it["image"] for it in items]),
            "token_ids": tokenizer([it["title"] for it in items]),
            "ids": np.asarray([it["id"] for it in items], np.int64),
            # False where title-word dropout shortened the title (train only).
            "title_complete": np.asarray([it.get("title_complete", True) for it in items], bool),
        }
    return collate


def train_dataset(source, tokenizer: TitleTokenizer, config: ml_collections.ConfigDict, *,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """An endless, deterministic stream of this process's share of each global batch.

    Every epoch is a fresh permutation of the whole split (seeded by config.seed);
    process p reads rows p, p + P, p + 2P, ... of it, so shards are disjoint and cover
    the split. The iterator's state (`get_state`/`set_state`) resumes exactly. With
    data.num_workers > 0, batches are made in worker processes: iterate it through
    `train_iterator`, which handles their set-up.
    """
    global_batch = config.train.batch_size
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by {process_count} processes")
    d = config.data
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
    ds = ds[process_index::process_count]
    ds = ds.random_map(_Preprocess(d.image_size, d.resize, d.augment, d.crop_scale_min, d.flip,
                                   d.title_dropout_prob, d.title_keep_prob))
    ds = ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=_collate(tokenizer))
    if d.num_workers > 0:
        # each worker process makes whole batches; grain interleaves them back in order
        return ds.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=d.num_workers, per_worker_buffer_size=max(1, d.prefetch)))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=d.prefetch))


def train_iterator(source, tokenizer: TitleTokenizer, config: ml_collections.ConfigDict, *,
                   process_index: int = 0, process_count: int = 1, state: dict | None = None) -> ResumableIterator:
    """An iterator over `train_dataset(...)` that runs with `data.num_workers` worker processes
    and resumes from `state` (a previous iterator's `get_state()`), if given."""
    ds = train_dataset(source, tokenizer, config, process_index=process_index, process_count=process_count)
    iterator = ResumableIterator(ds, uses_workers=config.data.num_workers > 0)
    if state is not None:
        iterator.set_state(state)
    return iterator


def eval_batches(source, tokenizer: TitleTokenizer, config: ml_collections.ConfigDict,
                 batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """All items of `source` in order, un-augmented, in batches (the last one may be short)."""
    d = config.data
    ds = grain.MapDataset.source(source).map(
        lambda item: _Preprocess(d.image_size, d.resize, False, 1.0, False).random_map(item, None)
    )
    ds = ds.batch(batch_size or config.eval.batch_size, drop_remainder=False, batch_fn=_collate(tokenizer))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def source_titles(source) -> list[str]:
    """All titles of a source, in order (cheap for sources that keep titles in memory)."""
    if hasattr(source, "titles"):
        return list(source.titles)
    return [source[i]["title"] for i in range(len(source))]
