"""The audit's flag threshold at a catalog's mismatch rate: the precision it predicts is the precision it gets."""

import numpy as np
import pytest

from prodclip import audit
from prodclip.evaluate import matching

# Pair cosines of matched and mismatched (photo, title) pairs, as a trained two-tower model gives them.
MATCHED, MISMATCHED, SPREAD = 0.35, 0.05, 0.1
# |predicted - realised precision| allowed: the binomial spread of the realised precision over the
# few hundred flags of a 20,000-listing catalog (about 0.02) plus the fit split's own sampling error.
TOLERANCE = 0.05


def _balanced_fit_calibration(rng) -> matching.Calibration:
    """A Platt calibration and its max-F1 threshold, fit on a benchmark where half the pairs are wrong."""
    n = 4000
    cos = np.concatenate([rng.normal(MATCHED, SPREAD, n), rng.normal(MISMATCHED, SPREAD, n)])
    labels = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])
    return matching.fit_calibration(cos, labels, loss_name="softmax")


@pytest.mark.parametrize("error_rate,seed", [(0.03, 0), (0.03, 1), (0.10, 2)])
def test_flag_precision_matches_prediction_at_injected_rate(error_rate, seed):
    rng = np.random.default_rng(seed)
    calibration = _balanced_fit_calibration(rng)
    n = 20000
    wrong = rng.random(n) < error_rate  # the injected mismatches
    cos = np.where(wrong, rng.normal(MISMATCHED, SPREAD, n), rng.normal(MATCHED, SPREAD, n))
    prob = calibration.two_tower(cos)

    flags = audit.flag_threshold(calibration.fit_scores["two_tower"], error_rate, target_precision=0.5)
    flagged = prob < flags["threshold"]
    realised = wrong[flagged].mean()
    assert flags["reached"] and flags["expected_precision"] >= 0.5
    assert abs(realised - flags["expected_precision"]) <= TOLERANCE
    assert abs(flagged[wrong].mean() - flags["expected_recall"]) <= TOLERANCE

    if error_rate == 0.03:  # the balanced benchmark's max-F1 threshold: mostly correct listings flagged
        old = prob < calibration.thresholds["two_tower"]
        assert wrong[old].mean() < flags["expected_precision"] - 0.1


def test_unreachable_target_flags_at_the_highest_precision():
    rng = np.random.default_rng(3)
    scores = {"matched": np.sort(rng.random(500)).tolist(), "mismatched": np.sort(rng.random(500)).tolist()}
    flags = audit.flag_threshold(scores, 0.03, target_precision=0.9)  # scores carry no signal: ~0.03 at best
    assert not flags["reached"] and flags["expected_precision"] < 0.9
