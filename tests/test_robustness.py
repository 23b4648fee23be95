"""Robustness perturbations: the studio background is found and replaced, the product is kept; crops and
JPEG re-encoding keep the shape; the perturbed catalog is deterministic."""

import io

import numpy as np
import pytest
from PIL import Image

from prodclip.data import robustness


def studio_photo():
    """[80, 60, 3]: a white background (with JPEG-like noise) and a dark-red product with a white logo inside."""
    rng = np.random.default_rng(0)
    image = np.full((80, 60, 3), 250, np.uint8) - rng.integers(0, 5, (80, 60, 3)).astype(np.uint8)
    image[20:60, 15:45] = (120, 20, 30)
    image[35:40, 25:35] = 255  # white inside the product: not connected to the border, so kept
    return image


def test_background_replaced_product_kept():
    image = studio_photo()
    mask = robustness.background_mask(image)
    assert mask[0, 0] and mask[79, 59] and not mask[30, 30] and not mask[37, 30]
    assert mask.sum() == 80 * 60 - 40 * 30
    out = robustness.replace_background(image, np.random.default_rng(1), [image])
    np.testing.assert_array_equal(out[20:60, 15:45], image[20:60, 15:45])
    assert np.mean(np.all(out[~mask] == image[~mask], axis=-1)) == 1.0
    assert np.mean(np.all(out[mask] >= robustness.WHITE_THRESHOLD, axis=-1)) < 0.5  # mostly not white now


@pytest.mark.parametrize("kind", robustness.KINDS)
def test_perturbations_keep_shape_and_are_seeded(kind):
    image = studio_photo()
    apply = robustness.perturbation(kind)
    a = apply(image, np.random.default_rng(3), [image])
    b = apply(image, np.random.default_rng(3), [image])
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image)


def test_perturb_catalog_rewrites_only_the_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = []
    for _ in range(3):
        buffer = io.BytesIO()
        Image.fromarray(studio_photo()).save(buffer, format="JPEG", quality=95)
        photos.append(buffer.getvalue())
    pq.write_table(pa.table({"id": [1, 2, 3], "title": ["a", "b", "c"], "image": photos}), tmp_path / "v.parquet")
    assert robustness.perturb_catalog(tmp_path / "v.parquet", tmp_path / "p.parquet", "background") == 3
    out = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert out["id"] == [1, 2, 3] and out["title"] == ["a", "b", "c"]
    assert np.asarray(Image.open(io.BytesIO(out["image"][0]))).shape == (80, 60, 3)


def test_zeroshot_weighted_f1_equals_sklearn():
    from sklearn.metrics import f1_score

    from prodclip.evaluate import zeroshot

    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 6, 300), rng.integers(0, 7, 300)
    assert zeroshot.weighted_f1(labels, predicted) == pytest.approx(
        f1_score(labels, predicted, average="weighted", labels=np.unique(labels)), abs=1e-12)
