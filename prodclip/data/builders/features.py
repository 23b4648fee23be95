"""The TFDS feature layout shared by prodclip's builders: one image-title pair per record.

    image       PNG or JPEG bytes, decoded to [H, W, 3] uint8 RGB
    title       str (one caption; a product with several captions has several records)
    product_id  str (records of one product share it)
    <label>     ClassLabel int64 per label column, -1 when the product has no value
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

PASSTHROUGH_FORMATS = ("JPEG", "PNG")  # stored as-is when already RGB; anything else is re-encoded as PNG


def pair_features(label_names: dict[str, Sequence[str]]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "title": tfds.features.Text(),
        "product_id": tfds.features.Text(),
        **{name: tfds.features.ClassLabel(names=list(names)) for name, names in label_names.items()},
    })


def image_for_tfds(image_bytes: bytes, mode: str, image_format: str, pixels: np.ndarray | None = None):
    """What to hand TFDS for one image: the original bytes when they already decode to the stored
    RGB pixels, else the RGB pixels (`pixels`, or decoded here) as a PIL image, which TFDS writes as PNG."""
    if mode == "RGB" and image_format in PASSTHROUGH_FORMATS:
        return image_bytes
    if pixels is None:
        from prodclip.data.catalog import decode_image

        pixels = decode_image(image_bytes)
    return Image.fromarray(pixels)


