"""Hubness correction of cross-modal cosines (CSLS, Lample et al., "Word translation without parallel data", 2018).

In a shared embedding space some points are hubs: a plain white-background shirt photo, a
generic title, close to many items of the other side. Their raw cosine matches everything a
little. CSLS scores a pair by how much closer its two sides are to each other than to their own
best alternatives, each measured against a reference set (the split or catalog being scored).
"""

from __future__ import annotations

import numpy as np

from prodclip.evaluate import ranking


def mean_top_k(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """[Q] float64 mean of each query's k highest cosines to the reference rows ([Q, D], [N, D] L2-normalised)."""
    scores, _ = ranking.chunked_top_k(np.asarray(queries, np.float32), np.asarray(reference, np.float32), k)
    return scores.astype(np.float64).mean(axis=1)


def corrected(cos: np.ndarray, image_density: np.ndarray, title_density: np.ndarray) -> np.ndarray:
    """[P] CSLS scores (Lample et al., 2018): cos - (image_density + title_density) / 2.

    image_density: [P] mean top-k cosine of each pair's photo to the reference titles; title_density:
    [P] mean top-k cosine of its title to the reference photos. A photo or title close to
    everything (a hub) no longer matches everything, and the score of a pair says how much better
    it is than the best alternatives of both sides.
    """
    return np.asarray(cos, np.float64) - 0.5 * (np.asarray(image_density, np.float64)
                                                 + np.asarray(title_density, np.float64))
