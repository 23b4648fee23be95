"""Hubness-corrected match scores (CSLS, match.hubness_k): numpy references, calibration, config checks."""

import numpy as np
import pytest

from prodclip import config as config_lib
from prodclip import config_checks, errors
from prodclip.evaluate import hubness, matching, pairs


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_mean_top_k(queries, reference, k):
    scores = queries.astype(np.float64) @ reference.astype(np.float64).T
    return np.sort(scores, axis=1)[:, ::-1][:, :k].mean(axis=1)


def test_mean_top_k_and_csls_equal_a_numpy_reference():
    rng = np.random.default_rng(0)
    queries, reference = _unit(rng.normal(size=(37, 16))), _unit(rng.normal(size=(53, 16)))
    for k in (1, 3, 53):
        np.testing.assert_allclose(hubness.mean_top_k(queries, reference, k),
                                   _brute_mean_top_k(queries, reference, k), rtol=0, atol=1e-6)
    cos = rng.uniform(-1, 1, 37)
    image_density, title_density = rng.uniform(0, 1, 37), rng.uniform(0, 1, 37)
    np.testing.assert_allclose(hubness.corrected(cos, image_density, title_density),
                               cos - (image_density + title_density) / 2, rtol=0, atol=1e-12)


def test_a_hub_photo_no_longer_matches_every_title_best():
    """Titles e_1..e_8; photo i = 0.3 e_i + (a direction of its own); photo 0 = the mean direction of all
    titles, a hub at cosine 8^-1/2 = 0.354 to every title, above each title's own photo (0.3). With k = 2
    the hub's density (0.354) exceeds an own photo's (0.15), and every title gets its own photo back."""
    n = 8
    eye = np.eye(2 * n, dtype=np.float32)
    titles = eye[:n]
    photos = 0.3 * eye[:n] + np.sqrt(1 - 0.09) * eye[n:]
    photos[0] = titles.sum(axis=0) / np.sqrt(n)
    cos = photos @ titles.T
    assert np.all(cos[0, 1:] > np.diag(cos)[1:])
    csls = hubness.corrected(cos, hubness.mean_top_k(photos, titles, 2)[:, None],
                                      hubness.mean_top_k(titles, photos, 2)[None, :])
    assert np.all(csls[0, 1:] < np.diag(csls)[1:])
    np.testing.assert_allclose(csls[1, 1], 0.3 - (0.15 + (n ** -0.5 + 0.3) / 2) / 2, atol=1e-6)


def test_pair_scores_use_the_split_as_reference():
    rng = np.random.default_rng(2)
    n, k = 60, 4
    image_emb, title_emb = _unit(rng.normal(size=(n, 12))), _unit(rng.normal(size=(n, 12)))
    titles = [f"t{i}" for i in range(n)]
    pair_set = pairs.PairSet(
        image_index=np.r_[np.arange(n), np.arange(n)], title_index=np.r_[np.arange(n), -np.ones(n, np.int64)],
        titles=titles + [f"edited {i}" for i in range(n)], labels=np.r_[np.ones(n), np.zeros(n)].astype(np.int64),
        kinds=["positive"] * n + ["attribute_swap"] * n, attributes=[""] * (2 * n), edited=np.r_[np.zeros(n),
                                                                                                 np.ones(n)].astype(bool),
        missing={})
    edited_emb = _unit(rng.normal(size=(n, 12)))
    encode = lambda texts: edited_emb[[int(t.split()[1]) for t in texts]]  # noqa: E731
    cos, raw = matching.pair_cosines(image_emb, title_emb, pair_set, encode)
    np.testing.assert_array_equal(cos, raw)
    cos_k, score = matching.pair_cosines(image_emb, title_emb, pair_set, encode, hubness_k=k)
    np.testing.assert_array_equal(cos_k, cos)
    texts = np.concatenate([title_emb, edited_emb]).astype(np.float64)
    images = image_emb[pair_set.image_index].astype(np.float64)
    expected = (np.einsum("pd,pd->p", images, texts)
                - 0.5 * _brute_mean_top_k(image_emb, title_emb, k)[pair_set.image_index]
                - 0.5 * _brute_mean_top_k(texts, image_emb, k))
    np.testing.assert_allclose(score, expected, rtol=0, atol=1e-6)


def test_calibration_records_hubness_and_refuses_native(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    score = labels * 0.2 + rng.normal(0, 0.1, 400)
    with pytest.raises(ValueError, match="hubness_k"):
        matching.fit_calibration(score, labels, loss_name="sigmoid", method="native", logit_scale=10.0,
                                 logit_bias=-3.0, hubness_k=3)
    calibration = matching.fit_calibration(score, labels, loss_name="sigmoid", logit_scale=10.0, logit_bias=-3.0,
                                           hubness_k=3)
    assert calibration.method == "platt" and calibration.hubness_k == 3
    calibration.save(tmp_path / "c.json")
    assert matching.Calibration.load(tmp_path / "c.json").hubness_k == 3
    assert matching.fit_calibration(score, labels, loss_name="softmax").hubness_k == 0


@pytest.mark.parametrize("overrides, message", [({"hubness_k": -1}, ">= 0"),
                                                ({"hubness_k": 3, "calibration": "native"}, "platt")])
def test_config_rejects_bad_hubness(overrides, message):
    config = config_lib.base_config()
    config.match.update(overrides)
    with pytest.raises(errors.ConfigError, match=message):
        config_checks.validate(config)
