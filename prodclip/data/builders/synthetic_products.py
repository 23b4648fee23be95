"""`synthetic_products`: the embedded procedural catalog (prodclip/data/synthetic.py) as a TFDS dataset.

Images are stored as PNG (lossless), so a record decodes to exactly the pixels that
`synthetic.make_catalog` draws. Labels: category, colour, pattern, trim, brand.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from prodclip.data import synthetic
from prodclip.data.builders.features import pair_features
from prodclip.data.catalog import png_bytes


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Split sizes and rendering of the catalog to write."""
    sizes: dict = dataclasses.field(default_factory=lambda: {"train": 20000, "val": 500, "test": 1000,
                                                              "compositional": 1000})
    seed: int = 0
    image_size: int = 64


class SyntheticProducts(tfds.core.GeneratorBasedBuilder):
    """The synthetic catalog; `spec` is needed to build, not to read a prepared copy."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, spec: SyntheticSpec | None = None, **kwargs):
        self.spec = spec or SyntheticSpec()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=pair_features(dict(synthetic.LABEL_NAMES)),
                                     description=__doc__)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.spec.sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_items: int):
        catalog = synthetic.make_catalog(split, num_items, seed=self.spec.seed, image_size=self.spec.image_size)
        for i in range(len(catalog)):
            product_id = str(int(catalog.ids[i]))
            yield product_id, {
                "image": png_bytes(catalog.images[i]), "title": catalog.titles[i], "product_id": product_id,
                **{name: int(values[i]) for name, values in catalog.labels.items()},
            }
