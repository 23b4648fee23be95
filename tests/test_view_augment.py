"""Augmented views for the feature cache: fixed per (seed, view, row), shape and dtype kept, views differ."""

import numpy as np

from prodclip.data import synthetic, view_augment


def test_views_are_fixed_per_seed_view_and_row_and_differ_between_views():
    catalog = synthetic.make_catalog("train", 8, seed=0, image_size=32)
    a = view_augment.AugmentedViews(catalog, view=1, seed=0, num_other_photos=4)
    again = view_augment.AugmentedViews(catalog, view=1, seed=0, num_other_photos=4)
    other_view = view_augment.AugmentedViews(catalog, view=2, seed=0, num_other_photos=4)
    assert len(a) == len(catalog)
    changed = 0
    for i in range(len(catalog)):
        image = a[i]["image"]
        assert image.shape == np.asarray(catalog[i]["image"]).shape and image.dtype == np.uint8
        np.testing.assert_array_equal(image, again[i]["image"])
        assert a[i]["title"] == catalog[i]["title"]
        changed += not np.array_equal(image, np.asarray(catalog[i]["image"]))
        changed += not np.array_equal(image, other_view[i]["image"])
    assert changed >= 8  # most rows are augmented, and views draw differently


def test_background_replacement_keeps_the_product():
    image = np.full((40, 30, 3), 255, np.uint8)
    image[10:30, 8:22] = (200, 20, 20)  # a red product on white
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(40):
        view = view_augment.augment_view(image, rng, [])
        assert view.shape == image.shape
        hits += not (view == 255).all(axis=-1)[0].all()  # the white top row was replaced
    assert hits > 5


def test_title_views_keep_view_zero_and_drop_words_in_order_fixed_per_seed():
    titles = [f"brand{i} men navy blue slim fit cotton shirt" for i in range(20)] + ["single"]
    views = view_augment.title_views(titles, 3, seed=0, keep_prob=0.5)
    assert len(views) == 3 and views[0] == titles
    assert views == view_augment.title_views(titles, 3, seed=0, keep_prob=0.5)
    assert views != view_augment.title_views(titles, 3, seed=1, keep_prob=0.5)
    shorter = 0
    for view in views[1:]:
        for full, short in zip(titles, view):
            words, kept = full.split(), short.split()
            assert kept and all(w in words for w in kept)
            assert [words.index(w) for w in kept] == sorted(words.index(w) for w in kept)  # order kept
            shorter += len(kept) < len(words)
    assert shorter >= 30  # most 9-word titles lose words at keep_prob 0.5
    assert views[1] != views[2]
    assert view_augment.title_views(titles, 1, seed=0, keep_prob=0.5) == [titles]
