"""The attribute check of match verdicts: the colour / gender words a title names against the photo's zero-shot
posterior (prodclip/evaluate/attribute_check.py), and its weight in the match calibration."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from prodclip import config as config_lib
from prodclip import config_checks, errors
from prodclip.evaluate import attribute_check, matching


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_named_values_are_whole_words_the_longest_first():
    names = ["Blue", "Navy Blue", "Black", "White", "Men", "Women", " "]
    patterns = attribute_check.value_patterns(names)
    named = lambda title: sorted(attribute_check.named_values(title, patterns))  # noqa: E731
    assert named("Nike Men Navy Blue Shirt") == [1, 4]  # "Blue" inside "Navy Blue" is not named again
    assert named("Women Black and White Top") == [2, 3, 5]  # "Men" is not a word of "Women"
    assert named("blue NAVY BLUE jeans") == [0, 1]  # case-insensitive, and a free "Blue" counts
    assert named("Mens shoes") == [] and named("Roadster Men's Tee") == [] and named("") == []


def test_log_likelihood_is_the_log_posterior_of_the_named_value():
    rng = np.random.default_rng(0)
    colour_emb = _unit(rng.normal(size=(4, 8))).astype(np.float32)
    gender_emb = _unit(rng.normal(size=(2, 8))).astype(np.float32)
    classes = attribute_check.AttributeClasses(
        ("colour", "gender"), {"colour": ["red", "blue", "navy blue", "black"], "gender": ["men", "women"]},
        {"colour": colour_emb, "gender": gender_emb}, logit_scale=12.0)
    images = _unit(rng.normal(size=(5, 8)))
    titles = ["Men Red Shirt", "Navy Blue Women Kurta", "Black and Red Bag", "A Plain Mug", "Men Blue Shirt"]
    got = attribute_check.log_likelihood(images, titles, classes)

    def log_p(emb, i):
        logits = 12.0 * images[i] @ emb.astype(np.float64).T
        return logits - np.log(np.exp(logits).sum())
    expected = [log_p(colour_emb, 0)[0] + log_p(gender_emb, 0)[0],
                log_p(colour_emb, 1)[2] + log_p(gender_emb, 1)[1],
                max(log_p(colour_emb, 2)[3], log_p(colour_emb, 2)[0]),  # the named value that fits best
                0.0,  # names no value of either label
                log_p(colour_emb, 4)[1] + log_p(gender_emb, 4)[0]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    scores, evidence = attribute_check.check(images, titles, classes)
    np.testing.assert_allclose(scores, got, rtol=0, atol=0)
    bag = evidence[2]["colour"]  # "Black and Red Bag": the named value that fits best, and the photo's own best
    best = int(np.argmax(log_p(colour_emb, 2)))
    assert bag["named"] == ("black" if log_p(colour_emb, 2)[3] > log_p(colour_emb, 2)[0] else "red")
    assert bag["p_named"] == pytest.approx(np.exp(expected[2]), abs=1e-4)
    assert bag["photo"] == classes.names["colour"][best]
    assert bag["p_photo"] == pytest.approx(np.exp(log_p(colour_emb, 2)[best]), abs=1e-4)
    assert "gender" not in evidence[2] and evidence[3] == {} and set(evidence[0]) == {"colour", "gender"}


def test_calibration_weighs_the_attribute_words(tmp_path):
    """Negatives that the cosine cannot tell from the positives, but whose named colour the photo does not
    show: the fit gives the attribute a positive weight and separates them."""
    rng = np.random.default_rng(1)
    n = 3000
    labels = rng.integers(0, 2, n)
    swapped = (labels == 0) & (rng.random(n) < 0.5)
    cos = np.where(labels == 1, 0.3, np.where(swapped, 0.3, 0.1)) + rng.normal(0, 0.05, n)
    attribute = np.where(swapped, -3.0, -0.5) + rng.normal(0, 0.5, n)
    calibration = matching.fit_calibration(cos, labels, loss_name="softmax", attribute=attribute,
                                           attribute_labels=("colour",))
    assert calibration.method == "platt" and calibration.attribute_weight > 0
    plain = matching.fit_calibration(cos, labels, loss_name="softmax")
    assert (roc_auc_score(labels, calibration.two_tower(cos, attribute))
            > roc_auc_score(labels, plain.two_tower(cos)) + 0.05)
    with pytest.raises(ValueError, match="colour"):
        calibration.two_tower(cos)  # the fit needs the attribute it was fit with
    calibration.save(tmp_path / "c.json")
    loaded = matching.Calibration.load(tmp_path / "c.json")
    assert loaded.attribute_labels == ("colour",) and loaded.attribute_weight == calibration.attribute_weight
    np.testing.assert_allclose(loaded.two_tower(cos, attribute), calibration.two_tower(cos, attribute), atol=0)
    with pytest.raises(ValueError, match="platt"):
        matching.fit_calibration(cos, labels, loss_name="sigmoid", method="native", logit_scale=10.0,
                                 logit_bias=-3.0, attribute=attribute, attribute_labels=("colour",))
    itm = matching.sigmoid(rng.normal(0, 1, n))
    combined = matching.fit_calibration(cos, labels, loss_name="softmax", itm_prob=itm, attribute=attribute,
                                        attribute_labels=("colour",))
    assert combined.combined_attribute_weight > 0
    assert set(combined.probabilities(cos, itm, attribute)) == {"two_tower", "fusion", "combined"}


@pytest.mark.parametrize("overrides, message", [({"attribute_labels": ("size",)}, "data.label_columns"),
                                                ({"attribute_labels": ("colour",), "calibration": "native"},
                                                 "platt")])
def test_config_rejects_bad_attribute_labels(overrides, message):
    config = config_lib.base_config()
    config.match.update(overrides)
    with pytest.raises(errors.ConfigError, match=message):
        config_checks.validate(config)
