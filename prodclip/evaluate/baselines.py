"""Reference rates that give zero-shot numbers their meaning: chance, majority class, linear probe.

The linear probe fits a multinomial logistic regression (scikit-learn) on the trained
image tower's L2-normalised embeddings of the train split and scores it on the eval
split: an estimate of what a classifier on this tower's features can reach, and so a
bound on zero-shot with the same tower.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression


def chance_and_majority(train_labels: np.ndarray, eval_labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Labels are class indices, -1 = not evaluated. Returns top-1 rates of guessing."""
    train_labels = train_labels[train_labels >= 0]
    eval_labels = eval_labels[eval_labels >= 0]
    majority = np.bincount(train_labels, minlength=num_classes).argmax()
    return {"chance/top1": 1.0 / num_classes, "majority/top1": float(np.mean(eval_labels == majority)),
            "majority/mean_per_class": 1.0 / num_classes}


def linear_probe(train_emb: np.ndarray, train_labels: np.ndarray, eval_emb: np.ndarray,
                 eval_labels: np.ndarray, *, c: float = 10.0, max_iter: int = 300) -> dict[str, float]:
    """Fits on rows with label >= 0 of the train split; top-1 and mean per-class accuracy on eval."""
    keep_train, keep_eval = train_labels >= 0, eval_labels >= 0
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit(train_emb[keep_train], train_labels[keep_train])
    predicted = model.predict(eval_emb[keep_eval])
    truth = eval_labels[keep_eval]
    per_class = [np.mean(predicted[truth == k] == k) for k in np.unique(truth)]
    return {"linear_probe/top1": float(np.mean(predicted == truth)),
            "linear_probe/mean_per_class": float(np.mean(per_class))}
