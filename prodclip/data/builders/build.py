"""Build prodclip's TFDS datasets into a data_dir, and look inside prepared ones.

    build("product_catalog", "/data/tfds", config)   -> the build report (dict)
    inspect("/data/tfds", "product_catalog", "grid.png") -> per-split counts; writes a PNG grid
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import textwrap
import types

import ml_collections
import numpy as np

log = logging.getLogger("prodclip")

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


# TFDS keeps a split's serialized examples in memory until they pass 1 GB, then spills them to
# bucket files; a smaller cap keeps a build's memory bounded for catalogs of any size.
WRITE_BUFFER_BYTES = 32 << 20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _NeverRaised(Exception):
    pass


# TFDS writes its spill files through tf.io.gfile, and prodclip runs without TensorFlow: local
# files through Python's own, with the two other names its bucket code touches.
LOCAL_GFILE = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))


@contextlib.contextmanager
def bounded_write_buffer(limit_bytes: int | None = None):
    """Within the block, TFDS spills examples to local bucket files once a split's buffer passes
    `limit_bytes` (default WRITE_BUFFER_BYTES). The prepared files are the same either way: both
    paths sort examples by their hashed key."""
    from tensorflow_datasets.core import shuffle

    previous, previous_tf = shuffle.MAX_MEM_BUFFER_SIZE, shuffle.tf
    shuffle.MAX_MEM_BUFFER_SIZE = min(previous, int(WRITE_BUFFER_BYTES if limit_bytes is None else limit_bytes))
    shuffle.tf = LOCAL_GFILE
    try:
        yield
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE, shuffle.tf = previous, previous_tf


def build(name: str, data_dir: str | pathlib.Path, config: ml_collections.ConfigDict) -> dict:
    """Prepares dataset `name` in `data_dir` (array_record); returns the build report.

    An existing prepared copy of the same version is rebuilt from scratch. Rows are streamed;
    the report's peak_rss_mb is the process's peak resident memory after the build.
    """
    import shutil

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    builder = make_builder(name, data_dir, config)
    if pathlib.Path(builder.data_dir).exists():
        shutil.rmtree(builder.data_dir)
        builder = make_builder(name, data_dir, config)
    with bounded_write_buffer():
        builder.download_and_prepare()
    if hasattr(builder, "write_report"):
        report = builder.write_report()
    else:
        report = {"split_counts": {split: {"pairs": info.num_examples} for split, info in builder.info.splits.items()}}
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    log.info("data build %s: peak RSS %.0f MB", name, report["peak_rss_mb"])
    return report


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
