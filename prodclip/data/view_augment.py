"""Augmented views of train photos for a locked tower's feature cache: flips, crops, new backgrounds, JPEG.

A locked image tower's features are cached once per photo (prodclip/image_cache.py), so the
photos cannot be augmented per step. Instead the cache can hold `train.image_cache_views` views
of every photo: view 0 the photo as it is, views 1.. a fixed random augmentation of it, drawn
from (seed, view, row). Training then reads one view per photo per epoch.

An augmented view, each part independently:

* mirrored left-right with probability 0.5;
* the studio background replaced (probability 0.5) by a plain colour with noise, or by tiles of
  other train photos (`robustness.replace_background`'s mask; a scene unlike the val check's
  gradients, stripes and checks);
* cropped to 55-100% of its area (probability 0.5), resized back;
* re-encoded as JPEG at quality 35-90 (probability 0.3).

The val robustness copies (prodclip/data/robustness.py) use harsher settings (40-80% crops, quality
10-25) and scene kinds this never draws, but tiles of other photos are common to both, so the
`background` check is not fully independent of a model trained on these views.

Titles get views too (`train.text_cache_views`): view 0 the title as it is, views 1.. the title
with each word kept with probability `data.title_keep_prob` (at least one word), drawn from
(seed, view, row) like the photos'. A locked text tower embeds every view once (text_cache.py);
the shortened titles stand for shoppers' queries and zero-shot prompts ("men navy shirt"), which
full titles alone never teach the text head to place.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prodclip.data import pipeline, robustness

SPEC = {"flip": 0.5, "background": 0.5, "crop": 0.5, "crop_scale": (0.55, 1.0), "jpeg": 0.3,
        "jpeg_quality": (35, 90)}


def plain_scene(height: int, width: int, rng: np.random.Generator, other_photos: list[np.ndarray]) -> np.ndarray:
    """[H, W, 3] uint8: a random colour with noise, or (when other photos are given, half the time) their tiles."""
    if other_photos and rng.random() < 0.5:
        return robustness.tiled_scene(height, width, rng, other_photos)
    colour = rng.uniform(0, 255, 3)
    return np.clip(colour + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)


def augment_view(image: np.ndarray, rng: np.random.Generator, other_photos: list[np.ndarray]) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W, 3] uint8, one random draw of the view augmentation above."""
    if rng.random() < SPEC["flip"]:
        image = image[:, ::-1]
    if rng.random() < SPEC["background"]:
        mask = robustness.background_mask(image)
        scene = plain_scene(image.shape[0], image.shape[1], rng, other_photos)
        image = np.where(mask[..., None], scene, image)
    if rng.random() < SPEC["crop"]:
        image = robustness.random_crop(np.ascontiguousarray(image), rng, scale=SPEC["crop_scale"])
    if rng.random() < SPEC["jpeg"]:
        image = robustness.jpeg_reencode(np.ascontiguousarray(image), rng, quality=SPEC["jpeg_quality"])
    return np.ascontiguousarray(image, dtype=np.uint8)


class AugmentedViews:
    """A source whose item i is item i of `source` with its image replaced by view `view` of it.

    The draw depends only on (seed, view, i), so the view is the same whenever it is computed.
    """

    def __init__(self, source, view: int, seed: int, num_other_photos: int = 256):
        self.source, self.view, self.seed = source, int(view), int(seed)
        picks = np.random.default_rng([self.seed, 0x5CE7E]).choice(len(source), min(num_other_photos, len(source)),
                                                                   replace=False)
        self.other_photos = [np.asarray(source[int(i)]["image"]) for i in picks]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.source[int(i)])
        rng = np.random.default_rng([self.seed, self.view, int(i)])
        item["image"] = augment_view(np.asarray(item["image"]), rng, self.other_photos)
        return item


def title_views(titles: Sequence[str], count: int, seed: int, keep_prob: float) -> list[list[str]]:
    """[count][N] titles: view 0 the titles as they are, view v >= 1 each title with words dropped.

    View v of row i keeps each word with probability keep_prob (at least one), drawn from
    (seed, v, i) only, so a view is the same whenever and wherever it is computed.
    """
    views = [list(titles)]
    for v in range(1, count):
        views.append([pipeline.drop_title_words(t, np.random.default_rng([seed, 0x717E, v, i]), keep_prob)
                      for i, t in enumerate(titles)])
    return views
