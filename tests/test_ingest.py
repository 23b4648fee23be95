"""Streaming ingestion and multi-host embedding: the streaming catalog builder writes what the
all-in-memory one did, spilling TFDS's write buffer changes nothing, and a 2-process embed on
127.0.0.1 writes the same store and metrics as 1 process."""

import collections
import io
import json
import pathlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from multihost_worker import run_processes

from prodclip import config as config_lib
from prodclip.data import catalog as catalog_lib
from prodclip.data.builders import build as build_lib
from prodclip.data.builders import product_catalog
from prodclip.data.tfds_source import open_builder
from prodclip.evaluate import multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_catalog(path: pathlib.Path, n: int = 60) -> None:
    """n products (a few bad rows among them) with two caption templates and a label column."""
    rng = np.random.default_rng(3)
    rows = [{"id": f"p{i}", "image": _png(rng.integers(0, 256, (6 + i % 5, 7, 3), dtype=np.uint8)),
             "title": f"item {i} {'navy' if i % 2 else 'red'} shirt", "colour": ["red", "navy", "grey"][i % 3]}
            for i in range(n)]
    rows[5]["image"] = b"not an image"
    rows[9]["title"] = "   "
    rows[13]["id"] = "p12"  # duplicate id
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    pq.write_table(table, path, row_group_size=16)


def catalog_config(path) -> "config_lib.ml_collections.ConfigDict":
    config = config_lib.base_config()
    config.data.path = str(path)
    config.data.label_columns = ("colour",)
    config.data.caption_templates = ("{colour} {title}",)
    config.data.split_ratios = (("train", 0.6), ("val", 0.2), ("test", 0.2))
    return config


def reference_examples(config) -> tuple[dict, dict]:
    """The pre-streaming builder's output, from the whole catalog held in memory: split -> sorted examples."""
    spec = build_lib.catalog_spec(config)
    report = catalog_lib.BuildReport()
    records = list(catalog_lib.read_catalog(spec.manifest, id_column=spec.id_column, title_template=spec.title_template,
                                            label_columns=spec.label_columns, keep_columns=("colour", "title"),
                                            report=report))
    names = sorted({str(r.labels["colour"]) for r in records})
    by_split = collections.defaultdict(list)
    for record in records:
        split = product_catalog.split_by_ratio(record.id, spec.split_ratios, spec.seed)
        for caption in product_catalog.captions_of(record, spec, catalog_lib.BuildReport()):
            pixels = catalog_lib.decode_image(record.image_bytes)
            by_split[split].append((str(record.id), caption, names.index(record.labels["colour"]), pixels.tobytes()))
    return {s: sorted(v) for s, v in by_split.items()}, report.to_dict()


def prepared_examples(data_dir) -> tuple[dict, dict]:
    builder = open_builder("product_catalog", data_dir)
    out, ordered = {}, {}
    for split in builder.info.splits:
        records = builder.as_data_source(split=split)
        items = [(r["product_id"].decode(), r["title"].decode(), int(r["colour"]), np.asarray(r["image"]).tobytes())
                 for r in (records[i] for i in range(len(records)))]
        out[split], ordered[split] = sorted(items), items
    return out, ordered


def test_streaming_build_equals_in_memory_reference_and_spilling_changes_nothing(tmp_path, monkeypatch):
    make_catalog(tmp_path / "catalog.parquet")
    config = catalog_config(tmp_path / "catalog.parquet")
    want, want_report = reference_examples(config)
    report = build_lib.build("product_catalog", tmp_path / "a", config)
    got, order_a = prepared_examples(tmp_path / "a")
    assert got == want
    assert report["skipped"] == want_report["skipped"] == {"corrupt_image": 1, "empty_title": 1, "duplicate_id": 1}
    assert report["rows"] == 60 and report["kept"] == 57
    assert {s: c["pairs"] for s, c in report["split_counts"].items()} == {s: len(v) for s, v in want.items()}
    assert report["peak_rss_mb"] > 0
    # a write buffer of 1 KB spills every split to TFDS's bucket files: same files, same order
    monkeypatch.setattr(build_lib, "WRITE_BUFFER_BYTES", 1024)
    build_lib.build("product_catalog", tmp_path / "b", config)
    assert prepared_examples(tmp_path / "b")[1] == order_a


def test_process_slices_cover_every_row_once():
    for n in (0, 1, 7, 40):
        for count in (1, 2, 3, 8):
            slices = [multihost.process_slice(n, p, count) for p in range(count)]
            assert slices[0][0] == 0 and slices[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
            assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1


def run_workers(out: pathlib.Path, tokenizer_dir: pathlib.Path, count: int) -> None:
    out.mkdir()
    run_processes("multihost_embed_worker.py", lambda i, port: (port, count, i, out, tokenizer_dir), count,
                  timeout=180)


def test_two_process_embed_gives_the_same_store_and_metrics_as_one(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import multihost_embed_worker

    multihost_embed_worker.save_tokenizer(tmp_path / "tokenizer")
    run_workers(tmp_path / "one", tmp_path / "tokenizer", 1)
    run_workers(tmp_path / "two", tmp_path / "tokenizer", 2)
    one, two = tmp_path / "one" / "store", tmp_path / "two" / "store"
    shards = sorted(p.name for p in (one / "shards").glob("*.npy"))
    assert len(shards) == 5 and shards == sorted(p.name for p in (two / "shards").glob("*.npy"))
    for name in shards:  # shards 0, 2, 4 came from process 0 and 1, 3 from process 1
        np.testing.assert_allclose(np.load(two / "shards" / name), np.load(one / "shards" / name), atol=1e-6)
    assert json.loads((one / "store.json").read_text()) == json.loads((two / "store.json").read_text())
    assert (one / "items.jsonl").read_text() == (two / "items.jsonl").read_text()
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics_one.keys() == metrics_two.keys() and "i2t/R@1" in metrics_one
    for key in metrics_one:
        np.testing.assert_allclose(metrics_two[key], metrics_one[key], atol=1e-6, err_msg=key)
