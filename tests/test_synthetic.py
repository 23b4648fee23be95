"""The procedural product catalog: determinism, splits, titles, label ranges."""
import re

import numpy as np
import pytest

from prodclip.data import synthetic

N = 240


@pytest.fixture(scope="module")
def splits():
    return {split: synthetic.make_catalog(split, N, seed=0) for split in synthetic.SPLITS}


def _pairs(catalog):
    return set(zip(catalog.labels["category"].tolist(), catalog.labels["colour"].tolist()))


def test_same_arguments_give_identical_bytes(splits):
    again = synthetic.make_catalog("train", N, seed=0)
    first = splits["train"]
    assert again.images.tobytes() == first.images.tobytes()
    assert again.titles == first.titles
    assert np.array_equal(again.ids, first.ids)
    for name in first.labels:
        assert np.array_equal(again.labels[name], first.labels[name])


def test_smaller_catalog_is_a_prefix(splits):
    small = synthetic.make_catalog("train", 50, seed=0)
    assert small.images.tobytes() == splits["train"].images[:50].tobytes()
    assert small.titles == splits["train"].titles[:50]


def test_other_seed_differs(splits):
    other = synthetic.make_catalog("train", N, seed=1)
    assert other.images.tobytes() != splits["train"].images.tobytes()
    assert other.titles != splits["train"].titles


def test_splits_are_independent_draws(splits):
    train, val = splits["train"], splits["val"]
    assert not np.array_equal(train.images[:20], val.images[:20])
    assert len(set(train.titles) & set(val.titles)) < 0.02 * N


def test_image_shape_and_dtype(splits):
    for catalog in splits.values():
        assert catalog.images.shape == (N, 64, 64, 3)
        assert catalog.images.dtype == np.uint8
    big = synthetic.make_catalog("test", 3, image_size=96)
    assert big.images.shape == (3, 96, 96, 3)
    assert big.images.std() > 10  # not blank


def test_item_access(splits):
    catalog = splits["test"]
    item = catalog[7]
    assert len(catalog) == N
    assert item["image"].shape == (64, 64, 3)
    assert item["title"] == catalog.titles[7]
    assert item["id"] == int(catalog.ids[7])
    assert set(catalog.labels) <= set(item)
    assert item["category"] == int(catalog.labels["category"][7])


def test_heldout_pairs_are_about_a_tenth_and_fixed():
    held = synthetic.heldout_pairs(0)
    total = len(synthetic.CATEGORIES) * len(synthetic.COLOURS)
    assert 0.07 * total <= len(held) <= 0.13 * total
    assert held == synthetic.heldout_pairs(0)
    assert all(0 <= c < len(synthetic.CATEGORIES) and 0 <= k < len(synthetic.COLOURS) for c, k in held)
    seen_categories = {c for c in range(len(synthetic.CATEGORIES))
                       if any((c, k) not in held for k in range(len(synthetic.COLOURS)))}
    assert len(seen_categories) == len(synthetic.CATEGORIES)


def test_compositional_split_holds_only_heldout_pairs(splits):
    held = synthetic.heldout_pairs(0)
    compositional = _pairs(splits["compositional"])
    assert compositional <= held
    assert len(compositional) >= 0.8 * len(held)
    for split in ("train", "val", "test"):
        assert not _pairs(splits[split]) & held, split
        assert not _pairs(splits[split]) & compositional, split


def test_ids_unique_across_splits(splits):
    ids = np.concatenate([catalog.ids for catalog in splits.values()])
    assert ids.dtype == np.int64
    assert len(np.unique(ids)) == len(ids)


def test_titles_name_category_and_colour(splits):
    for catalog in splits.values():
        for title, category, colour in zip(catalog.titles, catalog.labels["category"], catalog.labels["colour"]):
            lowered = title.lower()
            category_words = synthetic.CATEGORY_SYNONYMS[synthetic.CATEGORIES[category]]
            colour_words = synthetic.COLOUR_SYNONYMS[synthetic.COLOURS[colour]]
            assert any(word in lowered for word in category_words), title
            assert any(word in lowered for word in colour_words), title


def test_titles_mention_trim_only_when_present(splits):
    catalog = splits["train"]
    no_trim = len(synthetic.COLOURS)
    absent = catalog.labels["trim"] == no_trim
    assert 0.05 < absent.mean() < 0.5
    for title, trim, category in zip(catalog.titles, catalog.labels["trim"], catalog.labels["category"]):
        name = synthetic.CATEGORIES[category]
        without_category = title.lower()
        # Category words can hold part words ("collared shirt" holds "collar"), so drop them first.
        for synonym in sorted(synthetic.CATEGORY_SYNONYMS[name], key=len, reverse=True):
            without_category = without_category.replace(synonym, "")
        mentions_part = any(part in without_category for part in synthetic.TRIM_PART_WORDS[name])
        assert mentions_part == (trim != no_trim), title


def test_titles_vary_in_wording(splits):
    titles = splits["train"].titles
    assert any(title.lower().startswith(brand.lower()) for title in titles for brand in synthetic.BRANDS)
    assert sum(" in " in title.lower() for title in titles) > 0.05 * N
    assert len({title.split()[0].lower() for title in titles}) > 30


def test_test_gallery_titles_and_combos_are_distinct():
    catalog = synthetic.make_catalog("test", 1000, seed=0)
    stats = synthetic.distinctness(catalog)
    print(f"1,000 test items: {len(set(catalog.titles))} distinct titles; {stats}")
    assert stats["distinct_titles"] >= 0.97
    assert stats["distinct_attribute_combos"] >= 0.9


def test_label_ranges(splits):
    for catalog in splits.values():
        assert set(catalog.labels) == set(catalog.label_names)
        for name, values in catalog.labels.items():
            assert values.dtype == np.int32
            assert values.shape == (N,)
            assert values.min() >= 0 and values.max() < len(catalog.label_names[name]), name
        trim_present = catalog.labels["trim"] < len(synthetic.COLOURS)
        assert np.all(catalog.labels["trim"][trim_present] != catalog.labels["colour"][trim_present])
    names = splits["train"].label_names
    assert names["category"] == synthetic.CATEGORIES and len(synthetic.CATEGORIES) >= 12
    assert names["colour"] == synthetic.COLOURS and len(synthetic.COLOURS) >= 10
    assert names["pattern"] == synthetic.PATTERNS and len(synthetic.PATTERNS) >= 5
    assert names["trim"][len(synthetic.COLOURS)] == synthetic.NO_TRIM


def test_every_class_is_drawn(splits):
    train = splits["train"]
    more = synthetic.make_catalog("train", 600, seed=0)
    for name in ("category", "colour", "pattern", "brand"):
        assert len(np.unique(more.labels[name])) == len(train.label_names[name]), name


def test_product_differs_from_background(splits):
    # The corners are background; a light product colour must still leave a visible product.
    images = splits["test"].images.astype(np.int16)
    corner = images[:, :2, :2].reshape(N, -1, 3).mean(axis=1)
    differs = np.abs(images - corner[:, None, None, :]).max(axis=-1) > 40
    assert differs.mean(axis=(1, 2)).min() > 0.03
    assert np.median(differs.mean(axis=(1, 2))) > 0.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="train, val, test, compositional"):
        synthetic.make_catalog("training", 10)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.make_catalog("train", 10, image_size=16)


def test_omitted_attributes_leave_no_dangling_separators(splits):
    dangling = r"\s\s|\(\s*\)|[,|(]\s*[,|)]|(\bwith|\bby|[-|,:(])\s*$|^\s*[-|,:)]"
    for catalog in splits.values():
        for title in catalog.titles:
            assert not re.search(dangling, title, re.IGNORECASE), title
