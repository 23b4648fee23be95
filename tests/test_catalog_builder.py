"""product_catalog / synthetic_products TFDS builders: every kind of bad input is counted exactly,
good pairs round-trip pixel- and title-exact, and builds are reproducible."""

import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prodclip import config as config_lib
from prodclip.data.builders import build as build_lib
from prodclip.data.tfds_source import TfdsSource, open_builder


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _pixels(rng, h=12, w=10):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_bad_folder(root: pathlib.Path):
    """A folder catalog holding every kind of bad input; returns (manifest, expected)."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    rows, expected_pixels = [], {}
    expected = {"skipped": {}, "converted": {}}

    def add(item_id, filename, data, title, expect=None, skip=None, convert=None, tol=0):
        if data is not None:
            (images / filename).write_bytes(data)
        rows.append((item_id, f"images/{filename}", title))
        if skip:
            expected["skipped"][skip] = expected["skipped"].get(skip, 0) + 1
        else:
            expected_pixels[item_id] = (expect, tol)
        if convert:
            expected["converted"][convert] = expected["converted"].get(convert, 0) + 1

    # good RGB images, stored as they are
    for i in range(4):
        px = _pixels(rng)
        add(f"p{i}", f"p{i}.png", _png(Image.fromarray(px)), f"Good shirt {i}".encode(), expect=px)
    jpeg = _jpeg(Image.fromarray(_pixels(rng, 16, 16)))
    add("j0", "j0.jpg", jpeg, b"Good jpeg sneaker", expect=np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    # converted modes: expected RGB computed here with numpy
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    add("gray", "gray.png", _png(Image.fromarray(gray, "L")), b"Gray sock", expect=np.repeat(gray[..., None], 3, -1),
        convert="L")
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    pal_image = Image.fromarray(index, "P")
    pal_image.putpalette(palette.ravel().tolist())
    add("pal", "pal.png", _png(pal_image), b"Palette cap", expect=palette[index], convert="P")
    rgb = _pixels(rng, 6, 6)
    alpha = np.where(rng.random((6, 6)) < 0.5, 0, 255).astype(np.uint8)
    rgba_expected = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    add("rgba", "rgba.png", _png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), b"Transparent bag",
        expect=rgba_expected, convert="RGBA")
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    add("cmyk", "cmyk.jpg", _jpeg(cmyk), b"Red CMYK dress", expect=np.full((8, 8, 3), (255, 0, 0), np.uint8),
        convert="CMYK", tol=8)
    deep = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    deep_image = Image.frombytes("I;16", (6, 5), deep.astype("<u2").tobytes())
    deep_mode = Image.open(io.BytesIO(_png(deep_image))).mode  # how PIL reports a 16-bit PNG
    add("deep", "deep.png", _png(deep_image), b"Sixteen bit watch",
        expect=np.repeat((deep / 65535 * 255)[..., None], 3, -1), convert=deep_mode, tol=1)
    # bad images
    good_png = _png(Image.fromarray(_pixels(rng)))
    add("corrupt", "corrupt.jpg", b"this is not an image at all", b"Corrupt hat", skip="corrupt_image")
    add("empty", "empty.png", b"", b"Empty file shoe", skip="corrupt_image")
    add("trunc_jpg", "trunc.jpg", _jpeg(Image.fromarray(_pixels(rng, 64, 64)))[:300], b"Truncated jpg",
        skip="corrupt_image")
    add("trunc_png", "trunc.png", good_png[: len(good_png) // 2], b"Truncated png", skip="corrupt_image")
    add("missing", "missing.png", None, b"Missing file", skip="missing_image")
    (images / "folder.png").mkdir()  # a path that exists but cannot be read as a file
    add("unreadable", "folder.png", None, b"Unreadable path", skip="missing_image")
    add("bomb", "bomb.png", _png(Image.new("1", (8000, 7000))), b"Huge poster", skip="oversized_image")
    # bad titles (with good images)
    add("t_empty", "t1.png", good_png, b"", skip="empty_title")
    add("t_space", "t2.png", good_png, b"   \t  ", skip="empty_title")
    add("t_bytes", "t3.png", good_png, b"caf\xe9 \xff\xfe shirt", skip="bad_title_encoding")
    # ids
    add("p0", "dup.png", good_png, b"Duplicate of p0", skip="duplicate_id")
    add("", "noid.png", good_png, b"No id", skip="missing_id")

    manifest = root / "catalog.csv"
    with manifest.open("wb") as f:
        f.write(b"id,image,title,brand\n")
        for item_id, path, title in rows:
            f.write(b",".join([item_id.encode(), path.encode(), b'"' + title + b'"', b"Acme"]) + b"\n")
    expected["rows"] = len(rows)
    expected["kept"] = len(expected_pixels)
    return manifest, expected, expected_pixels


def _config(manifest, **data):
    config = config_lib.base_config()
    config.data.path = str(manifest)
    config.data.title_template = "{title}"
    config.data.caption_templates = ("{brand} product {id}",)
    config.data.label_columns = ("brand",)
    config.data.split_ratios = (("train", 0.6), ("val", 0.4))
    for key, value in data.items():
        config.data[key] = value
    return config


def _all_records(data_dir, name="product_catalog"):
    builder = open_builder(name, data_dir)
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        out[split] = [source[i] for i in range(len(source))]
    return out


def test_product_catalog_bad_inputs_counted_and_good_pairs_exact(tmp_path):
    manifest, expected, expected_pixels = make_bad_folder(tmp_path / "catalog")
    report = build_lib.build("product_catalog", tmp_path / "tfds", _config(manifest))

    assert report["rows"] == expected["rows"]
    assert report["kept"] == expected["kept"]
    assert report["skipped"] == expected["skipped"]
    assert report["converted"] == expected["converted"]
    assert len(report["skipped_rows"]) == sum(expected["skipped"].values())
    assert {r["reason"] for r in report["skipped_rows"]} == set(expected["skipped"])
    assert sum(c["products"] for c in report["split_counts"].values()) == expected["kept"]
    assert sum(c["pairs"] for c in report["split_counts"].values()) == 2 * expected["kept"]  # two captions each
    written = json.loads((pathlib.Path(open_builder("product_catalog", tmp_path / "tfds").data_dir)
                          / "build_report.json").read_text())
    assert written["skipped"] == expected["skipped"]

    seen = set()
    for split, records in _all_records(tmp_path / "tfds").items():
        assert len(records) == report["split_counts"][split]["pairs"]
        source = TfdsSource("product_catalog", tmp_path / "tfds", split, label_keys=("brand",))
        assert len(source) == len(records)
        for i, record in enumerate(records):
            product = record["product_id"].decode()
            pixels, tol = expected_pixels[product]
            got = source[i]["image"]
            assert got.shape == pixels.shape and got.dtype == np.uint8, product
            np.testing.assert_allclose(got.astype(int), pixels.astype(int), atol=tol, err_msg=product)
            title = record["title"].decode()
            assert title == source[i]["title"]
            seen.add((product, title))
            assert source.label_names["brand"][source[i]["brand"]] == "Acme"
        # both captions of a product share its id (they are positives in the loss)
        by_id = {}
        for i in range(len(source)):
            by_id.setdefault(source.ids[i], set()).add(source.titles[i])
        assert all(len(t) == 2 for t in by_id.values())
    good_titles = {"p0": "Good shirt 0", "j0": "Good jpeg sneaker", "gray": "Gray sock", "deep": "Sixteen bit watch"}
    for product, title in good_titles.items():
        assert (product, title) in seen and (product, f"Acme product {product}") in seen

    # a second build gives identical records
    build_lib.build("product_catalog", tmp_path / "tfds2", _config(manifest))
    first, second = _all_records(tmp_path / "tfds"), _all_records(tmp_path / "tfds2")
    assert first.keys() == second.keys()
    for split in first:
        assert len(first[split]) == len(second[split])
        for a, b in zip(first[split], second[split]):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_parquet_with_image_bytes_skips_corrupt_empty_and_duplicates(tmp_path):
    rng = np.random.default_rng(1)
    good = {f"g{i}": _pixels(rng) for i in range(5)}
    rows = [(k, _png(Image.fromarray(v)), f"Blue jeans {k}", "train" if i < 3 else "val")
            for i, (k, v) in enumerate(good.items())]
    rows += [
        ("bad1", b"\x89PNG\r\n\x1a\n garbage", "Broken png", "train"),
        ("bad2", _png(Image.fromarray(_pixels(rng)))[:40], "Cut png", "train"),
        ("e1", _png(Image.fromarray(_pixels(rng))), "", "train"),
        ("e2", _png(Image.fromarray(_pixels(rng))), "  ", "val"),
        ("g1", _png(Image.fromarray(_pixels(rng))), "Duplicate id", "train"),
        ("g3", _png(Image.fromarray(_pixels(rng))), "Another duplicate", "val"),
    ]
    table = pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows], "title": [r[2] for r in rows],
                      "split": [r[3] for r in rows]})
    pq.write_table(table, tmp_path / "catalog.parquet", row_group_size=4)  # several row groups
    config = config_lib.base_config()
    config.data.path = str(tmp_path / "catalog.parquet")
    config.data.label_columns = ()
    config.data.split_column = "split"
    report = build_lib.build("product_catalog", tmp_path / "tfds", config)
    assert report["rows"] == 11 and report["kept"] == 5
    assert report["skipped"] == {"corrupt_image": 2, "empty_title": 2, "duplicate_id": 2}
    assert report["split_counts"] == {"train": {"products": 3, "pairs": 3}, "val": {"products": 2, "pairs": 2}}
    for split, n in (("train", 3), ("val", 2)):
        source = TfdsSource("product_catalog", tmp_path / "tfds", split)
        assert len(source) == n
        for i in range(n):
            item = source[i]
            key = item["title"].split()[-1]
            np.testing.assert_array_equal(item["image"], good[key])


def test_synthetic_products_matches_embedded_catalog(tmp_path):
    from prodclip.data import synthetic

    config = config_lib.base_config()
    config.data.num_train, config.data.num_val, config.data.num_test, config.data.num_compositional = 6, 3, 0, 2
    config.data.image_size = 32
    build_lib.build("synthetic_products", tmp_path, config)
    for split, n in (("train", 6), ("val", 3), ("compositional", 2)):
        reference = synthetic.make_catalog(split, n, image_size=32)
        source = TfdsSource("synthetic_products", tmp_path, split, label_keys=("category", "colour"))
        assert len(source) == n
        order = np.argsort(source.ids)
        np.testing.assert_array_equal(source.ids[order], reference.ids)
        for j, i in enumerate(order):
            item = source[i]
            np.testing.assert_array_equal(item["image"], reference.images[j])
            assert item["title"] == reference.titles[j]
            assert item["category"] == reference.labels["category"][j]
        assert source.label_names["colour"] == reference.label_names["colour"]
    assert "test" not in open_builder("synthetic_products", tmp_path).info.splits


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset 'product_catalog'"):
        TfdsSource("product_catalog", tmp_path, "train")


def test_image_path_template_reads_files_named_by_id(tmp_path):
    from prodclip.data.catalog import CatalogSource
    images = tmp_path / "images"
    images.mkdir()
    expected = {}
    for item_id, colour in ((7, (255, 0, 0)), (9, (0, 0, 255))):
        pixels = np.full((8, 6, 3), colour, np.uint8)
        Image.fromarray(pixels).save(images / f"{item_id}.png")
        expected[item_id] = pixels
    manifest = tmp_path / "styles.csv"
    manifest.write_text("id,productDisplayName\n7,Red Tee\n9,Blue Tee\n11,Missing Photo\n")
    source = CatalogSource(manifest, image_column="images/{id}.png", title_template="{productDisplayName}")
    assert [source[i]["title"] for i in range(len(source))] == ["Red Tee", "Blue Tee"]
    for i, item_id in enumerate((7, 9)):
        np.testing.assert_array_equal(source[i]["image"], expected[item_id])
    assert dict(source.report.skipped) == {"missing_image": 1}
