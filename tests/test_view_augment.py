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
