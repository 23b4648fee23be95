"""Metrics of match verdicts: threshold metrics per negative kind, the expected calibration error and
the reliability diagram (scikit-learn's definitions)."""

from __future__ import annotations

import pathlib

import numpy as np
from sklearn import metrics as sk_metrics

from prodclip.evaluate import pairs as pairs_lib


def expected_calibration_error(prob: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Sum over equal-width probability bins of (bin share) * |mean label - mean probability|.

    Bins are those of sklearn.calibration.calibration_curve(strategy='uniform').
    """
    prob, labels = np.asarray(prob, np.float64), np.asarray(labels, np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.searchsorted(edges[1:-1], prob)
    counts = np.bincount(bins, minlength=num_bins)
    gap = np.abs(np.bincount(bins, labels, num_bins) - np.bincount(bins, prob, num_bins))
    return float(gap.sum() / max(counts.sum(), 1))


def classification_metrics(prob: np.ndarray, labels: np.ndarray, threshold: float,
                           num_bins: int = 15) -> dict[str, float]:
    """ROC-AUC, PR-AUC, and accuracy / precision / recall / F1 / Cohen's kappa at prob >= threshold, plus ECE."""
    predicted = (np.asarray(prob) >= threshold).astype(np.int32)
    both = len(np.unique(labels)) == 2
    return {
        "roc_auc": float(sk_metrics.roc_auc_score(labels, prob)) if both else float("nan"),
        "pr_auc": float(sk_metrics.average_precision_score(labels, prob)) if both else float("nan"),
        "accuracy": float(sk_metrics.accuracy_score(labels, predicted)),
        "precision": float(sk_metrics.precision_score(labels, predicted, zero_division=0)),
        "recall": float(sk_metrics.recall_score(labels, predicted, zero_division=0)),
        "f1": float(sk_metrics.f1_score(labels, predicted, zero_division=0)),
        "kappa": float(sk_metrics.cohen_kappa_score(labels, predicted)),
        "ece": expected_calibration_error(prob, labels, num_bins),
        "num_pairs": int(len(labels)),
        "num_positive": int(np.sum(labels)),
    }


def metrics_by_kind(prob: np.ndarray, pair_set: pairs_lib.PairSet, threshold: float,
                    num_bins: int = 15) -> dict[str, dict[str, float]]:
    """Metrics on all pairs ("all") and on the positives against each negative kind alone,
    and against each swapped attribute ("attribute_swap:<label>")."""
    kinds = np.asarray(pair_set.kinds)
    groups = {"all": np.ones(len(kinds), bool)}
    for kind in dict.fromkeys(pair_set.kinds):
        if kind != pairs_lib.POSITIVE:
            groups[kind] = (kinds == kind) | (kinds == pairs_lib.POSITIVE)
    attributes = np.asarray(pair_set.attributes)
    for attribute in sorted(set(pair_set.attributes) - {""}):
        groups[f"attribute_swap:{attribute}"] = (attributes == attribute) | (kinds == pairs_lib.POSITIVE)
    return {name: classification_metrics(prob[mask], pair_set.labels[mask], threshold, num_bins)
            for name, mask in groups.items()}


def reliability_diagram(curves: dict[str, np.ndarray], labels: np.ndarray, path: str | pathlib.Path, *,
                        num_bins: int = 15, title: str = "") -> None:
    """A PNG: observed match rate against mean predicted probability per bin, one line per curve
    (name -> [P] probabilities), with each curve's ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for name, prob in curves.items():
        observed, predicted = calibration_curve(labels, prob, n_bins=num_bins, strategy="uniform")
        ece = expected_calibration_error(prob, labels, num_bins)
        ax.plot(predicted, observed, marker="o", markersize=3, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted match probability")
    ax.set_ylabel("observed match rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
