"""Zero-shot classification: classes become text prompts; images go to the nearest class.

Each class embedding is the mean of its prompt-template embeddings (each
L2-normalised), normalised again: the prompt ensemble of the CLIP paper.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def class_embeddings(encode_titles: Callable[[Sequence[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """Prompt-ensemble class embeddings.

    Args:
      encode_titles: N strings -> [N, D] L2-normalised embeddings.
      class_names: C names; a name may list synonyms separated by '|' ("t-shirt|tee"), and
        every synonym x template prompt enters that class's average.
      templates: format strings with one '{}' for the class name.

    Returns: [C, D] float32, L2-normalised.
    """
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    synonyms = [[n.strip() for n in name.split("|") if n.strip()] or [name] for name in class_names]
    prompts = [template.format(n) for names in synonyms for n in names for template in templates]
    emb = encode_titles(prompts)
    out, start = [], 0
    for names in synonyms:
        count = len(names) * len(templates)
        out.append(emb[start:start + count].mean(axis=0))
        start += count
    out = np.stack(out)
    return (out / np.linalg.norm(out, axis=-1, keepdims=True)).astype(np.float32)


def classify(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
             ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_emb [N, D], class_emb [C, D], labels [N] int (negative = unlabelled, skipped).

    Returns top-k accuracy for each k < C and the mean per-class accuracy (top-1),
    plus the predictions are available through `predict`.
    """
    keep = labels >= 0
    scores = image_emb[keep] @ class_emb.T
    labels = labels[keep]
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {}
    for k in ks:
        if k < class_emb.shape[0] or k == 1:
            out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
    predicted = order[:, 0]
    per_class = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    out["mean_per_class"] = float(np.mean(per_class))
    return out


def confusion_matrix(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[C, C] int64 counts: rows are true classes, columns predicted."""
    keep = labels >= 0
    predicted = np.argmax(image_emb[keep] @ class_emb.T, axis=1)
    c = class_emb.shape[0]
    return np.bincount(labels[keep] * c + predicted, minlength=c * c).reshape(c, c)
