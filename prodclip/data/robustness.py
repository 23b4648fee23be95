"""Photo perturbations for a robustness check: studio backgrounds replaced by scenes, crops, JPEG re-encoding.

Catalog photos are studio shots on white; shoppers' photos are not. A model can learn "white
background = catalog photo" and lean on framing and clean pixels. These transforms turn a catalog
split into a harder copy, with nothing downloaded:

* `replace_background`: the region of the border's colour connected to the border (the studio background) is
  replaced by a random scene: a colour gradient with noise, stripes or checks in random colours, or
  a tiled crop of another product's photo (clutter that looks like products).
* `random_crop`: a random crop covering 40-80% of the area, resized back (partial, off-centre framing).
* `jpeg_reencode`: re-encoded at JPEG quality 10-25 (phone compression, messaging apps).

All take and return [H, W, 3] uint8 and draw from the given numpy Generator, so a perturbed split is
the same for the same seed. `perturb_catalog` writes a perturbed copy of a parquet catalog.
"""

from __future__ import annotations

import io
import pathlib
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

WHITE_THRESHOLD = 225  # a pixel with every channel at least this counts as white (tests, summaries)
BACKGROUND_TOLERANCE = 30.0  # RGB distance from the border's median colour that still counts as background
KINDS = ("background", "crop", "jpeg", "all")


def background_mask(image: np.ndarray, tolerance: float = BACKGROUND_TOLERANCE) -> np.ndarray:
    """[H, W] bool: the studio background, i.e. pixels within `tolerance` (RGB distance) of the border's
    median colour and connected to the border. Studio backgrounds are white to light grey, often with a
    vignette; a product of another colour, or a white logo inside it, is not connected to them."""
    border_pixels = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    colour = np.median(border_pixels, axis=0)
    close = np.linalg.norm(image.astype(np.float32) - colour, axis=-1) <= tolerance
    labels, _ = ndimage.label(close)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, border[border > 0])


def random_scene(height: int, width: int, rng: np.random.Generator,
                 other_photos: list[np.ndarray] | None = None) -> np.ndarray:
    """[H, W, 3] uint8: a gradient with noise, stripes / checks, or tiled crops of other photos."""
    kinds = ["gradient", "pattern"] + (["clutter"] if other_photos else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "gradient":
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        scene = a + (b - a) * t[..., None] + rng.normal(0, 12, (height, width, 3))
    elif kind == "pattern":
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        period = rng.uniform(4, 16)
        if rng.random() < 0.5:  # stripes at a random angle
            angle = rng.uniform(0, np.pi)
            on = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period) > 0
        else:  # checks
            on = ((xx // period).astype(int) + (yy // period).astype(int)) % 2 == 0
        scene = np.where(on[..., None], a, b) + rng.normal(0, 8, (height, width, 3))
    else:
        return tiled_scene(height, width, rng, other_photos)
    return np.clip(scene, 0, 255).astype(np.uint8)


def tiled_scene(height: int, width: int, rng: np.random.Generator, other_photos: list[np.ndarray]) -> np.ndarray:
    """[H, W, 3] uint8: a random quarter-size crop of one of `other_photos`, tiled (clutter that looks like products)."""
    other = other_photos[int(rng.integers(len(other_photos)))]
    oh, ow = other.shape[:2]
    ch, cw = max(4, oh // 2), max(4, ow // 2)
    top, left = int(rng.integers(0, oh - ch + 1)), int(rng.integers(0, ow - cw + 1))
    tile = other[top:top + ch, left:left + cw]
    return np.ascontiguousarray(np.tile(tile, (-(-height // ch), -(-width // cw), 1))[:height, :width], np.uint8)


def replace_background(image: np.ndarray, rng: np.random.Generator,
                       other_photos: list[np.ndarray] | None = None) -> np.ndarray:
    """The image with its studio background (see background_mask) replaced by a random scene."""
    mask = background_mask(image)
    scene = random_scene(image.shape[0], image.shape[1], rng, other_photos)
    return np.where(mask[..., None], scene, image)


def random_crop(image: np.ndarray, rng: np.random.Generator, scale=(0.4, 0.8)) -> np.ndarray:
    """A random crop covering `scale` of the area (aspect kept within 3/4..4/3), resized back to [H, W]."""
    h, w = image.shape[:2]
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(2, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(2, round(np.sqrt(area * aspect)))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.asarray(Image.fromarray(image[top:top + ch, left:left + cw]).resize((w, h), Image.BILINEAR))


def jpeg_reencode(image: np.ndarray, rng: np.random.Generator, quality=(10, 25)) -> np.ndarray:
    """The image after a JPEG round trip at a random quality in `quality` (inclusive)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def perturbation(kind: str) -> Callable[[np.ndarray, np.random.Generator, list], np.ndarray]:
    """image, rng, other photos -> perturbed image, for kind in KINDS ('all': background, crop, then JPEG)."""
    if kind == "background":
        return lambda im, rng, others: replace_background(im, rng, others)
    if kind == "crop":
        return lambda im, rng, others: random_crop(im, rng)
    if kind == "jpeg":
        return lambda im, rng, others: jpeg_reencode(im, rng)
    if kind == "all":
        return lambda im, rng, others: jpeg_reencode(random_crop(replace_background(im, rng, others), rng), rng)
    raise ValueError(f"unknown perturbation {kind!r}; valid: {', '.join(KINDS)}")


def perturb_catalog(src: str | pathlib.Path, dst: str | pathlib.Path, kind: str, *, image_column: str = "image",
                    seed: int = 0) -> int:
    """Writes `src` (a parquet catalog with image bytes in `image_column`) to `dst` with every photo
    perturbed by `kind`, re-encoded as PNG (lossless, so only the perturbation changes pixels). Returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prodclip.data.catalog import decode_image

    table = pq.read_table(src)
    photos = [decode_image(b) for b in table.column(image_column).to_pylist()]
    rng = np.random.default_rng(seed)
    apply = perturbation(kind)
    out = []
    for i, photo in enumerate(photos):
        others = [photos[int(j)] for j in rng.integers(0, len(photos), 4) if int(j) != i]
        buffer = io.BytesIO()
        Image.fromarray(apply(photo, rng, others)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    index = table.column_names.index(image_column)
    table = table.set_column(index, image_column, pa.array(out, pa.binary()))
    pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dst)
    return len(out)
