"""Which dataset a config names, as random-access sources per split.

A source has `__len__`, `__getitem__(i) -> {"image", "title", "id", <labels>}`,
`titles` (list[str]), `labels` (dict name -> [N] int32) and `label_names`
(dict name -> tuple of class names), so that evaluation can run zero-shot
classification on any label column.

`data.name`:
  synthetic  the embedded procedural catalog (prodclip/data/synthetic.py)
  catalog    a real catalog: `data.path` is a folder holding `<split>.parquet` (or .csv /
             .jsonl), or a path with a `{split}` placeholder, or one file (used for every split)
  tfds       a prepared TFDS dataset: `data.tfds_name` in `data.data_dir`, features mapped by
             `data.image_key`, `data.text_key`, `data.id_column`, `data.label_columns`
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from prodclip.data.catalog import CatalogSource
from prodclip.errors import ConfigError, DataError

log = logging.getLogger("prodclip")

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl")
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
    """Items to read for a split; for real catalogs 0 means all of them."""
    d = config.data
    sizes = {"train": d.num_train, "val": d.num_val, "test": d.num_test, "compositional": d.num_compositional}
    if split not in sizes:
        if d.name == "synthetic":
            raise DataError(f"the synthetic catalog has no split {split!r}; valid: {', '.join(sizes)} "
                            "(check data.eval_splits and match.fit_split)")
        return 0
    return sizes[split]


def catalog_file(path: str, split: str) -> pathlib.Path:
    """Resolves `data.path` for one split (see the module docstring)."""
    if "{split}" in path:
        return pathlib.Path(path.format(split=split))
    root = pathlib.Path(path)
    if root.is_dir():
        for suffix in MANIFEST_SUFFIXES:
            if (root / f"{split}{suffix}").exists():
                return root / f"{split}{suffix}"
        found = sorted(p.name for p in root.iterdir() if p.suffix in MANIFEST_SUFFIXES)
        raise DataError(f"no {split}.parquet/.csv/.jsonl in {root} (found: {', '.join(found) or 'none'}); "
                        "the splits read are train, val, data.eval_splits and match.fit_split")
    if not root.exists():
        raise DataError(f"catalog not found: {root} (data.path); pass --config.data.path=DIR_OR_FILE, a folder "
                        "holding train.parquet / val.parquet (or .csv / .jsonl) or one catalog file")
    return root


def open_catalog(config: ml_collections.ConfigDict, path: str | pathlib.Path, *, max_items: int = 0,
                 label_vocab: dict[str, Sequence[str]] | None = None) -> CatalogSource:
    d = config.data
    return CatalogSource(path, image_column=d.image_column, id_column=d.id_column,
                         title_template=d.title_template, label_columns=tuple(d.label_columns),
                         label_vocab=label_vocab, max_items=max_items or None)


def make_source(config: ml_collections.ConfigDict, split: str,
                label_vocab: dict[str, Sequence[str]] | None = None):
    """The source for `split` of the dataset that `config.data` names.

    label_vocab: class names per label column (from the training run), so that labels of
    an evaluation catalog index the same classes the run was trained and prompted with.
    """
    d = config.data
    if d.name == "synthetic":
        from prodclip.data import synthetic

        return synthetic.make_catalog(split, split_size(config, split), seed=d.seed, image_size=d.image_size)
    if d.name == "catalog":
        return open_catalog(config, catalog_file(d.path, split), max_items=split_size(config, split),
                            label_vocab=label_vocab)
    if d.name == "tfds":
        from prodclip.data.tfds_source import TfdsSource

        return TfdsSource(d.tfds_name, d.data_dir, split, image_key=d.image_key, text_key=d.text_key,
                          id_key=d.id_column, label_keys=tuple(d.label_columns),
                          max_items=split_size(config, split))
    raise ConfigError(f"data.name={d.name!r} is not readable; valid: synthetic, catalog, tfds")


def skipped_rows(split_sources: dict) -> list[dict]:
    """Every row the sources skipped: {"split", "file", "row", "id", "reason", "detail"}, in split order."""
    rows = []
    for split, source in split_sources.items():
        report = getattr(source, "report", None)
        if report is None:
            continue
        for row, item_id, reason, detail in report.skipped_rows:
            rows.append({"split": split, "file": str(source.path), "row": row, "id": item_id, "reason": reason,
                         "detail": detail})
    return rows


def report_skipped(split_sources: dict, out_dir: str | pathlib.Path, name: str = SKIPPED_ROWS_FILE) -> dict:
    """Logs, per split read from a catalog, the rows kept and the rows skipped by reason, and writes
    every skipped row (split, file, row number, id, reason, detail) to out_dir/name as JSON lines.

    Sources without a skip report (synthetic, TFDS) are left out; nothing is written when no source
    has one. Returns split -> {reason: count}.
    """
    counts, seen = {}, set()
    for split, source in split_sources.items():
        report = getattr(source, "report", None)
        if report is None or id(source) in seen:
            continue
        seen.add(id(source))
        counts[split] = dict(report.skipped)
        unseen = {label: sum(values.values()) for label, values in getattr(source, "unseen_labels", {}).items()}
        if report.skipped:
            listing = ", ".join(f"{reason} {n}" for reason, n in report.skipped.most_common())
            log.warning("data: %s (%s): %d rows read, %d kept, %d skipped: %s; see %s", split, source.path,
                        report.rows, report.kept, sum(report.skipped.values()), listing,
                        pathlib.Path(out_dir) / name)
        else:
            log.info("data: %s (%s): %d rows read, all kept", split, source.path, report.rows)
        for label in getattr(source, "missing_label_columns", []):
            log.warning("data: %s (%s) has no label column %r; it is left out", split, source.path, label)
        for label, n in unseen.items():
            log.warning("data: %s: %d rows have a %s value the run was not trained on (%s); they are "
                        "not scored for %s", split, n, label, ", ".join(list(source.unseen_labels[label])[:5]), label)
    if counts:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / name, "w", encoding="utf-8") as f:
            for row in skipped_rows({s: src for s, src in split_sources.items() if s in counts}):
                f.write(json.dumps(row, default=str) + "\n")
    return counts


def label_vocabulary(train_source) -> dict[str, dict]:
    """Per label column: class names and their counts in the training split.

    Saved as labels.json in the workdir, so that evaluating on another catalog file indexes
    the classes the run was trained and prompted with.
    """
    stats = {}
    for label, names in getattr(train_source, "label_names", {}).items():
        values = np.asarray(train_source.labels[label])
        counts = np.bincount(values[values >= 0], minlength=len(names))
        stats[label] = {"names": list(names), "train_counts": [int(c) for c in counts]}
    return stats


def save_label_vocabulary(workdir: pathlib.Path, stats: dict) -> None:
    (pathlib.Path(workdir) / "labels.json").write_text(json.dumps(stats, indent=1))


def load_label_vocabulary(workdir: pathlib.Path) -> dict | None:
    path = pathlib.Path(workdir) / "labels.json"
    return json.loads(path.read_text()) if path.exists() else None


class RowRange:
    """Rows start..stop-1 of a source, as a source."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        return self.source[self.start + int(i)]
