"""Real product catalogs: parquet with embedded image bytes, or a manifest plus an image folder.

One row per product. Columns are named in config: the image column (bytes, or a
path relative to the image folder), the id column, a title template over any
columns (e.g. "{title}" or "{baseColour} {articleType}"), and label columns kept
for zero-shot classification.

Bad rows never crash a run. Each is skipped and counted with its reason:
unreadable / corrupt / truncated / missing / oversized images, empty or
non-UTF-8 titles, duplicate ids. Grayscale, palette, RGBA, CMYK and 16-bit
images are converted to RGB and kept.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import pathlib
import string
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from prodclip import errors
from prodclip.errors import DataError

MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused as decompression bombs

SKIP_REASONS = (
    "missing_image", "corrupt_image", "oversized_image", "empty_title", "bad_title_encoding",
    "duplicate_id", "missing_id", "missing_split",
)


class ImageError(errors.DataError):
    """An image that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def png_bytes(pixels: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> lossless PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes -> [H, W, 3] uint8. Raises ImageError with a reason."""
    if not data:
        raise ImageError("corrupt_image", "empty image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ImageError("oversized_image", f"{image.width}x{image.height} pixels")
                image.load()
                return np.asarray(to_rgb(image))
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("oversized_image", str(e)) from e
        except Exception as e:  # PIL raises many types for truncated or corrupt files
            raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from e


def clean_title(value: Any) -> str:
    """A usable title string, or raises ValueError('empty_title' | 'bad_title_encoding')."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError("bad_title_encoding") from e
    if value is None:
        raise ValueError("empty_title")
    title = " ".join(str(value).split())
    if not title:
        raise ValueError("empty_title")
    return title


def template_fields(template: str) -> list[str]:
    """The column names a title template reads: "{brand} {title}" -> ["brand", "title"]."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_title(template: str, row: dict) -> str:
    """Fills `template` ("{brand} {title}") from row values; missing or null columns become ''.

    Raises ValueError('bad_title_encoding') for byte values that are not UTF-8.
    """
    fields = set(template_fields(template))
    values = {}
    for name in fields:
        value = row.get(name)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError("bad_title_encoding") from e
        if isinstance(value, str) and any(0xDC80 <= ord(ch) <= 0xDCFF for ch in value):
            raise ValueError("bad_title_encoding")  # undecodable bytes surfaced by surrogateescape
        values[name] = "" if value is None else value
    return template.format_map(values)


# ----------------------------------------------------------------------------- reading rows


def iter_manifest_rows(path: str | pathlib.Path, columns: Sequence[str] | None = None,
                       batch_rows: int = 4096) -> Iterator[dict]:
    """Rows of a parquet (read in row groups, never whole), CSV or JSONL manifest, as dicts."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        wanted = [c for c in columns if c in parquet.schema_arrow.names] if columns else None
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            yield from batch.to_pylist()
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            yield from csv.DictReader(f)
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        raise DataError(f"unsupported manifest {path}: use .parquet, .csv or .jsonl")


def manifest_columns(path: str | pathlib.Path, sample_rows: int = 100) -> list[str]:
    """The column names of a manifest (JSONL: the keys of its first `sample_rows` rows). Raises DataError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"catalog not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        columns: dict[str, None] = {}
        for i, row in enumerate(iter_manifest_rows(path)):
            columns.update(dict.fromkeys(row))
            if i + 1 >= sample_rows:
                break
        return list(columns)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow / csv / json raise many types for an unreadable file
        raise DataError(f"{path} cannot be read as a {path.suffix} catalog: {type(e).__name__}: {e}") from e


def check_columns(path: str | pathlib.Path, *, image_column: str, id_column: str, title_template: str,
                  extra: Sequence[str] = ()) -> list[str]:
    """Raises DataError naming every column the config reads that `path` lacks; returns the file's columns.

    Required: the id column, the image column (or the fields of an image path template such as
    "images/{id}.png"), every field of the title template, and `extra`.
    """
    columns = manifest_columns(path)
    image_fields = template_fields(image_column) if "{" in image_column else [image_column]
    wanted = {"data.id_column": [id_column], "data.image_column": image_fields,
              "data.title_template": template_fields(title_template), "": list(extra)}
    missing = [(key, c) for key, names in wanted.items() for c in names if c not in columns]
    if missing:
        listing = ", ".join(f"{c!r}" + (f" ({key})" if key else "") for key, c in missing)
        raise DataError(f"{path} has no column {listing}; its columns are: {', '.join(columns) or 'none'}. "
                        "Name the columns with --config.data.image_column / id_column / title_template")
    return columns


@dataclasses.dataclass
class BuildReport:
    """What a catalog read kept and skipped, with a reason per skipped row."""

    rows: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_rows: list = dataclasses.field(default_factory=list)  # (row index, id, reason, detail)
    split_counts: dict = dataclasses.field(default_factory=dict)  # split -> {"products", "pairs"}
    dropped_captions: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped),
                "converted": dict(self.converted), "split_counts": dict(self.split_counts),
                "dropped_captions": dict(self.dropped_captions),
                "skipped_rows": [dict(row=r, id=i, reason=why, detail=d) for r, i, why, d in self.skipped_rows]}

    def skip(self, row: int, item_id: Any, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_rows.append((row, None if item_id is None else str(item_id), reason, detail))


def _image_bytes(value: Any, image_root: pathlib.Path | None) -> bytes:
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face image struct {"bytes", "path"}
        value = value["bytes"] or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value is None or value == "":
        raise ImageError("missing_image", "no image in this row")
    path = pathlib.Path(str(value))
    if image_root is not None and not path.is_absolute():
        path = image_root / path
    if not path.is_file():
        what = "not a regular file" if path.exists() else "file not found"
        raise ImageError("missing_image", f"{what}: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError("missing_image", f"unreadable: {path}: {e}") from e


@dataclasses.dataclass
class CatalogRecord:
    id: int | str
    title: str
    image_bytes: bytes
    labels: dict[str, str | None]
    mode: str  # the image's original PIL mode
    image_format: str = ""  # the file's PIL format (JPEG, PNG, ...)
    extra: dict = dataclasses.field(default_factory=dict)  # values of `keep_columns`
    row: int = -1  # index of the manifest row


def read_catalog(path: str | pathlib.Path, *, image_column: str = "image", id_column: str = "id",
                 title_template: str = "{title}", label_columns: Sequence[str] = (),
                 image_root: str | pathlib.Path | None = None, keep_columns: Sequence[str] = (),
                 report: BuildReport | None = None,
                 only_rows: Callable[[int], bool] | None = None) -> Iterator[CatalogRecord]:
    """Validated records of a catalog manifest, in file order; bad rows go to `report`.

    keep_columns: further columns (a split column, a list of captions) copied raw to `record.extra`.
    only_rows: when given, manifest rows (by index) it rejects are passed over unread and uncounted;
    a second pass over rows a first pass kept (one split of them) streams them again.

    Every image is fully decoded once here, so a record that comes out is known to be
    readable; its original bytes are kept (decoding again at train time is cheap).
    """
    report = report if report is not None else BuildReport()
    root = pathlib.Path(image_root) if image_root else pathlib.Path(path).parent
    check_columns(path, image_column=image_column, id_column=id_column, title_template=title_template)
    seen: set = set()
    for index, row in enumerate(iter_manifest_rows(path)):
        if only_rows is not None and not only_rows(index):
            continue
        report.rows += 1
        item_id = row.get(id_column)
        if item_id is None or item_id == "":
            report.skip(index, None, "missing_id", f"column {id_column!r} is empty")
            continue
        if item_id in seen:
            report.skip(index, item_id, "duplicate_id", f"id {item_id} already seen")
            continue
        try:
            title = clean_title(render_title(title_template, row))
        except ValueError as e:
            report.skip(index, item_id, str(e), f"title template {title_template!r} gives no text")
            continue
        try:
            data = _image_bytes(render_title(image_column, row) if "{" in image_column else row.get(image_column), root)
            decode_image(data)  # first, so that a decompression bomb is reported as oversized
            with Image.open(io.BytesIO(data)) as probe:
                mode, image_format = probe.mode, probe.format or ""
        except ImageError as e:
            report.skip(index, item_id, e.reason, e.detail)
            continue
        except Exception as e:
            report.skip(index, item_id, "corrupt_image", f"{type(e).__name__}: {e}")
            continue
        if mode != "RGB":
            report.converted[mode] += 1
        seen.add(item_id)
        report.kept += 1
        yield CatalogRecord(item_id, title, data, {c: row.get(c) for c in label_columns}, mode, image_format,
                            {c: row.get(c) for c in keep_columns}, index)


class CatalogSource:
    """A random-access source over a validated catalog; images are decoded on access.

    Attributes:
      titles: list[str]; ids: [N] int64 (or a running index when ids are not integers);
      labels: name -> [N] int32 (-1 = missing or not in the vocabulary);
      label_names: name -> tuple of class names; report: the BuildReport.
      missing_label_columns: configured label columns the file lacks (left out of `labels`).
      unseen_labels: name -> {value: rows} of values outside `label_vocab` (labelled -1).
    """

    def __init__(self, path, *, image_column="image", id_column="id", title_template="{title}",
                 label_columns: Sequence[str] = (), image_root=None,
                 label_vocab: dict[str, Sequence[str]] | None = None, max_items: int | None = None):
        self.path = pathlib.Path(path)
        self.report = BuildReport()
        records = []
        for record in read_catalog(path, image_column=image_column, id_column=id_column,
                                   title_template=title_template, label_columns=label_columns,
                                   image_root=image_root, report=self.report):
            records.append(record)
            if max_items is not None and len(records) >= max_items:
                break
        if not records:
            skipped = ", ".join(f"{reason} {n}" for reason, n in self.report.skipped.most_common()) or "no rows"
            raise DataError(f"{path}: no usable rows out of {self.report.rows} ({skipped}); "
                            "check the image and title columns the config names (data.image_column, "
                            "data.title_template)")
        self.titles = [r.title for r in records]
        self._images = [r.image_bytes for r in records]
        try:
            self.ids = np.asarray([int(r.id) for r in records], np.int64)
        except (TypeError, ValueError):
            self.ids = np.arange(len(records), dtype=np.int64)
        self.raw_ids = [r.id for r in records]
        vocab = dict(label_vocab or {})
        self.labels, self.label_names, self.unseen_labels = {}, {}, {}
        present = manifest_columns(path)
        self.missing_label_columns = [c for c in label_columns if c not in present]
        for column in label_columns:
            if column in self.missing_label_columns:
                continue
            values = [r.labels[column] for r in records]
            names = tuple(vocab.get(column) or sorted({v for v in values if v not in (None, "")}))
            index = {name: i for i, name in enumerate(names)}
            self.labels[column] = np.asarray([index.get(v, -1) for v in values], np.int32)
            self.label_names[column] = names
            unseen = collections.Counter(str(v) for v in values if v not in (None, "") and v not in index)
            if unseen:
                self.unseen_labels[column] = dict(unseen.most_common())

    def __len__(self) -> int:
        return len(self.titles)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {"image": decode_image(self._images[i]), "title": self.titles[i], "id": int(self.ids[i]),
                **{name: int(values[i]) for name, values in self.labels.items()}}

    def image_bytes(self, i: int) -> bytes:
        return self._images[int(i)]
