"""Querybank normalisation of retrieval scores (Bogolin et al., "Cross Modal Retrieval with Querybank
Normalisation", CVPR 2022), with the run's own train split as the bank.

A gallery item that lies close to many queries (a hub: a plain studio shot of a common type) wins
queries it does not answer. Each gallery item gets a density, the mean of its k highest cosines to
a bank of queries that the run trained on (its train titles for a photo gallery, its train photos
for a title gallery), and a query ranks the gallery by

    cos(query, item) - 0.5 * density(item)

which is the CSLS score of evaluate/hubness.py with the query's own density dropped (it is the same
for every item of one query's ranking). The bank holds no eval item, so the score of a pair reads
nothing of the other queries being evaluated: it is inductive, and a search service can store the
densities beside its index.
"""

from __future__ import annotations

import numpy as np

from prodclip.evaluate import hubness, retrieval

DENSITY_WEIGHT = 0.5  # CSLS's weight (hubness.corrected); the query's half is constant per query


def bank_titles(titles) -> list[str]:
    """The distinct titles of a split, in order of first appearance: a title listed for several colour
    variants counts once in the bank."""
    return list(dict.fromkeys(str(t) for t in titles))


def densities(gallery_emb: np.ndarray, bank_emb: np.ndarray, k: int) -> np.ndarray:
    """[N] float64 mean of each gallery row's k highest cosines to the bank ([N, D], [B, D] L2-normalised)."""
    if len(bank_emb) < k:
        raise ValueError(f"the query bank has {len(bank_emb)} rows, fewer than eval.querybank_k={k}; "
                         f"lower eval.querybank_k or train on a larger split")
    return hubness.mean_top_k(gallery_emb, bank_emb, k)


def with_density(query_emb: np.ndarray, gallery_emb: np.ndarray, density: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """([Q, D+1], [N, D+1]) float32 rows whose inner products are cos - DENSITY_WEIGHT * density.

    The query gains a constant -DENSITY_WEIGHT column and the gallery its density, so any inner-product
    ranking (an exact scan, a faiss index) ranks by the normalised score exactly.
    """
    q = np.concatenate([np.asarray(query_emb, np.float32),
                        np.full((len(query_emb), 1), -DENSITY_WEIGHT, np.float32)], axis=1)
    g = np.concatenate([np.asarray(gallery_emb, np.float32), np.asarray(density, np.float32)[:, None]], axis=1)
    return q, g


def normalised_scores(query_emb: np.ndarray, gallery_emb: np.ndarray, bank_emb: np.ndarray, k: int) -> np.ndarray:
    """[Q, N] float cos(query, item) - DENSITY_WEIGHT * density(item) for L2-normalised [Q, D] queries and [N, D]
    gallery rows. With class prompts as the gallery (zero-shot), it is a per-class offset read from the bank."""
    return np.asarray(query_emb) @ np.asarray(gallery_emb).T - DENSITY_WEIGHT * densities(gallery_emb, bank_emb, k)[None, :]


def normalised_retrieval(image_emb: np.ndarray, text_emb: np.ndarray, keys: np.ndarray, *,
                         title_bank: np.ndarray | None, photo_bank: np.ndarray | None, k: int,
                         ks=(1, 5, 10)) -> dict[str, float]:
    """'t2i_bank/R@1', ... (photos normalised by `title_bank`) and 'i2t_bank/...' (titles by `photo_bank`).

    image_emb, text_emb: [N, D] the split's pairs, L2-normalised; keys: [N] int64 match keys (suite.retrieval_keys);
    title_bank: [B, D] the run's train titles, embedded; photo_bank: [B', D] its train photos. A direction
    whose bank is None is left out.
    """
    metrics: dict[str, float] = {}
    directions = (("t2i", text_emb, image_emb, title_bank), ("i2t", image_emb, text_emb, photo_bank))
    for name, queries, gallery, bank in directions:
        if bank is None:
            continue
        q, g = with_density(queries, gallery, densities(gallery, bank, k))
        found = retrieval.retrieval_metrics(q, g, keys, keys, ks=tuple(ks))
        metrics.update({f"{name}_bank/{m}": v for m, v in found.items()})
    return metrics
