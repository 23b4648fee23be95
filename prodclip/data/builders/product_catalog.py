"""`product_catalog`: a user's catalog (image folder + CSV/JSONL/parquet manifest, or parquet with
image bytes) as a TFDS dataset of image-title pairs.

Rows are validated by prodclip/data/catalog.py: bad rows are skipped and counted with their
reason, odd image modes are converted to RGB. A product gives one record per caption: the
title template, each extra caption template, and each entry of a list-of-captions column.
Splits come from a split column, or from ratios applied to a hash of the product id (so a
product keeps its split when rows are added or reordered).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib
from typing import Any, Sequence

import tensorflow_datasets as tfds

from prodclip.data import catalog as catalog_lib
from prodclip.data.builders.features import image_for_tfds, pair_features

REPORT_FILE = "build_report.json"


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
    """Where a catalog is and how to read it.

    manifest: a .parquet / .csv / .jsonl file, one row per product.
    image_root: folder that relative image paths start from (default: the manifest's folder).
    title_template: "{productDisplayName}" or "{baseColour} {articleType}": the first caption.
    caption_templates: further templates, each one more caption of the same product.
    captions_column: a column holding a list of captions (or one string), each one more caption.
    split_column: a column naming each row's split; empty = split by `split_ratios`.
    split_ratios: (split name, fraction) pairs, applied to a hash of the product id.
    """
    manifest: str
    image_root: str = ""
    image_column: str = "image"
    id_column: str = "id"
    title_template: str = "{title}"
    caption_templates: tuple[str, ...] = ()
    captions_column: str = ""
    label_columns: tuple[str, ...] = ()
    split_column: str = ""
    split_ratios: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.1), ("test", 0.1))
    seed: int = 0


def split_by_ratio(product_id: Any, ratios: Sequence[tuple[str, float]], seed: int = 0) -> str:
    """The split of a product: its hash in [0, 1) against the cumulative ratios."""
    total = sum(r for _, r in ratios)
    point = zlib.crc32(f"{seed}:{product_id}".encode("utf-8")) / 2**32 * total
    for name, ratio in ratios:
        point -= ratio
        if point < 0:
            return name
    return ratios[-1][0]


def captions_of(record: catalog_lib.CatalogRecord, spec: CatalogSpec, report: catalog_lib.BuildReport) -> list[str]:
    """All distinct captions of a product, the title first; unusable extra captions are counted and dropped."""
    raw: list[Any] = []
    row = {**record.extra, **record.labels}
    for template in spec.caption_templates:
        try:
            raw.append(catalog_lib.render_title(template, row))
        except ValueError as e:
            report.dropped_captions[str(e)] += 1
    if spec.captions_column:
        value = record.extra.get(spec.captions_column)
        raw.extend(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    captions = [record.title]
    for value in raw:
        try:
            caption = catalog_lib.clean_title(value)
        except ValueError as e:
            report.dropped_captions[str(e)] += 1
            continue
        if caption not in captions:
            captions.append(caption)
    return captions


class ProductCatalog(tfds.core.GeneratorBasedBuilder):
    """A local product catalog; `spec` is needed to build, not to read a prepared copy."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, spec: CatalogSpec | None = None, **kwargs):
        self.spec = spec
        self.report = catalog_lib.BuildReport()
        self._by_split: dict[str, list] | None = None
        self._label_names: dict[str, list[str]] | None = None
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    # The label vocabularies are part of the features, so the catalog is read before _info is asked.
    def _read_catalog(self) -> None:
        if self._by_split is not None:
            return
        spec = self.spec
        keep = tuple(c for c in (spec.split_column, spec.captions_column) if c)
        keep += tuple(name for t in spec.caption_templates for name in catalog_lib.template_fields(t))
        self._by_split = {}
        values: dict[str, set] = {c: set() for c in spec.label_columns}
        for record in catalog_lib.read_catalog(
                spec.manifest, image_column=spec.image_column, id_column=spec.id_column,
                title_template=spec.title_template, label_columns=spec.label_columns,
                image_root=spec.image_root or None, keep_columns=keep, report=self.report):
            if spec.split_column:
                split = str(record.extra.get(spec.split_column) or "").strip()
                if not split:
                    self.report.kept -= 1
                    self.report.skip(record.row, record.id, "missing_split", f"column {spec.split_column!r} is empty")
                    continue
            else:
                split = split_by_ratio(record.id, spec.split_ratios, spec.seed)
            self._by_split.setdefault(split, []).append(record)
            for column in spec.label_columns:
                if record.labels[column] not in (None, ""):
                    values[column].add(str(record.labels[column]))
        self._label_names = {c: sorted(v) for c, v in values.items()}
        self._label_index_of = {c: {name: i for i, name in enumerate(names)} for c, names in self._label_names.items()}

    def _info(self) -> tfds.core.DatasetInfo:
        if self.spec is None:
            raise ValueError("ProductCatalog needs a CatalogSpec to build; read prepared data with "
                             "prodclip.data.tfds_source or tfds.builder_from_directory")
        self._read_catalog()
        return tfds.core.DatasetInfo(builder=self, features=pair_features(self._label_names),
                                     description=__doc__)

    def _split_generators(self, dl_manager):
        self._read_catalog()
        if not self._by_split:
            raise ValueError(f"{self.spec.manifest}: no usable rows ({dict(self.report.skipped)})")
        return {split: self._generate_examples(split) for split in sorted(self._by_split)}

    def _generate_examples(self, split: str):
        products = pairs = 0
        for record in self._by_split[split]:
            captions = captions_of(record, self.spec, self.report)
            image = image_for_tfds(record.image_bytes, record.mode, record.image_format)
            labels = {c: self._label_index(c, record.labels[c]) for c in self.spec.label_columns}
            products += 1
            for k, caption in enumerate(captions):
                pairs += 1
                yield f"{record.id}/{k}", {"image": image, "title": caption, "product_id": str(record.id),
                                           **labels}
        self.report.split_counts[split] = {"products": products, "pairs": pairs}

    def _label_index(self, column: str, value: Any) -> int:
        if value in (None, ""):
            return -1
        return self._label_index_of[column][str(value)]

    def write_report(self) -> dict:
        """Writes build_report.json beside the prepared data; returns it as a dict."""
        report = {"manifest": str(self.spec.manifest), **self.report.to_dict()}
        (pathlib.Path(self.data_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        return report
