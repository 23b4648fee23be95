"""Build prodclip's TFDS datasets into a data_dir, and look inside prepared ones.

    build("product_catalog", "/data/tfds", config)   -> the build report (dict)
    inspect("/data/tfds", "product_catalog", "grid.png") -> per-split counts; writes a PNG grid
"""

from __future__ import annotations

import pathlib
import textwrap

import ml_collections
import numpy as np

BUILDERS = ("synthetic_products", "product_catalog")


def catalog_spec(config: ml_collections.ConfigDict):
    """The product_catalog spec named by `config.data` (path = the manifest)."""
    from prodclip.data.builders.product_catalog import CatalogSpec

    d = config.data
    if not d.path:
        raise ValueError("product_catalog needs data.path: a .parquet, .csv or .jsonl manifest")
    return CatalogSpec(
        manifest=d.path, image_root=d.image_root, image_column=d.image_column, id_column=d.id_column,
        title_template=d.title_template, caption_templates=tuple(d.caption_templates),
        captions_column=d.captions_column, label_columns=tuple(d.label_columns), split_column=d.split_column,
        split_ratios=tuple((str(name), float(r)) for name, r in d.split_ratios), seed=d.seed)


def make_builder(name: str, data_dir: str | pathlib.Path, config: ml_collections.ConfigDict):
    if name == "synthetic_products":
        from prodclip.data.builders.synthetic_products import SyntheticProducts, SyntheticSpec

        d = config.data
        sizes = {"train": d.num_train, "val": d.num_val, "test": d.num_test, "compositional": d.num_compositional}
        return SyntheticProducts(spec=SyntheticSpec(sizes=sizes, seed=d.seed, image_size=d.image_size),
                                 data_dir=str(data_dir))
    if name == "product_catalog":
        from prodclip.data.builders.product_catalog import ProductCatalog

        return ProductCatalog(spec=catalog_spec(config), data_dir=str(data_dir))
    raise ValueError(f"unknown builder {name!r}; valid: {', '.join(BUILDERS)}")


def build(name: str, data_dir: str | pathlib.Path, config: ml_collections.ConfigDict) -> dict:
    """Prepares dataset `name` in `data_dir` (array_record); returns the build report.

    An existing prepared copy of the same version is rebuilt from scratch.
    """
    import shutil

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    builder = make_builder(name, data_dir, config)
    if pathlib.Path(builder.data_dir).exists():
        shutil.rmtree(builder.data_dir)
        builder = make_builder(name, data_dir, config)
    builder.download_and_prepare()
    if hasattr(builder, "write_report"):
        return builder.write_report()
    counts = {split: {"pairs": info.num_examples} for split, info in builder.info.splits.items()}
    return {"split_counts": counts}


def inspect(data_dir: str | pathlib.Path, name: str, out_png: str | pathlib.Path | None = None, *,
            split: str = "train", num_pairs: int = 16, image_key: str = "image", text_key: str = "title") -> dict:
    """Per-split record counts of a prepared dataset; optionally a PNG grid of `num_pairs` pairs of `split`."""
    from prodclip.data.tfds_source import open_builder

    builder = open_builder(name, data_dir)
    counts = {s: info.num_examples for s, info in builder.info.splits.items()}
    if out_png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = builder.as_data_source(split=split)
        n = min(num_pairs, len(records))
        cols = min(4, max(n, 1))
        rows = max(1, -(-n // cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, ax in zip(np.linspace(0, len(records) - 1, n).astype(int) if n else [], axes.flat):
            record = records[int(i)]
            title = record[text_key]
            title = title.decode("utf-8", "replace") if isinstance(title, bytes) else str(title)
            ax.imshow(record[image_key])
            ax.set_title("\n".join(textwrap.wrap(title, 28)[:3]), fontsize=8)
        fig.suptitle(f"{name} / {split}: {n} of {len(records)} pairs")
        fig.tight_layout()
        fig.savefig(out_png, dpi=80)
        plt.close(fig)
    return counts
