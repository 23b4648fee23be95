"""Embedding and evaluating a catalog across several JAX processes (hosts).

Each process embeds its own contiguous slice of the source; then either

  - `embed_source_gathered`: the slices are gathered with
    `multihost_utils.process_allgather`, so every process holds the whole split's
    embeddings and computes the same retrieval metrics as a single process would; or
  - `store.embed_catalog_views` with several processes: each process writes its own
    shards (shard i belongs to process i mod P) into the shared store directory, and
    process 0 writes the header and the item list (see `shard_owner`).

With one process both are exactly the single-host code paths.
"""

from __future__ import annotations

import numpy as np


def process_slice(num_items: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows [start, stop) of a process: contiguous, sizes differing by at most one, in process order."""
    base, extra = divmod(num_items, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def shard_owner(shard_index: int, process_count: int) -> int:
    """The process that writes a store's shard `shard_index`."""
    return shard_index % process_count


def barrier(name: str) -> None:
    """Waits for every process (no-op with one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(local: np.ndarray, num_items: int) -> np.ndarray:
    """Each process's [n_p, D] slice (from `process_slice`) -> the whole [num_items, D] on every process."""
    import jax

    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    longest = -(-num_items // count)
    padded = np.zeros((longest,) + local.shape[1:], local.dtype)
    padded[:len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # [P, longest, D]
    parts = []
    for p in range(count):
        start, stop = process_slice(num_items, p, count)
        parts.append(gathered[p, :stop - start])
    return np.concatenate(parts)


def embed_source_gathered(graphdef, params, source, tokenizer, config) -> tuple[np.ndarray, np.ndarray]:
    """`inference.embed_source` of the whole source, each process embedding only its slice.

    Returns ([N, D], [N, D]) float32 image and title embeddings in source order, on every process.
    """
    import jax

    from prodclip.data.sources import RowRange
    from prodclip.models import inference

    start, stop = process_slice(len(source), jax.process_index(), jax.process_count())
    if stop > start:
        image_emb, text_emb = inference.embed_source(graphdef, params, RowRange(source, start, stop), tokenizer, config)
    else:
        dim = int(config.model.embed_dim)
        image_emb = text_emb = np.zeros((0, dim), np.float32)
    return gather_rows(image_emb, len(source)), gather_rows(text_emb, len(source))


def retrieval_metrics_gathered(graphdef, params, source, tokenizer, config) -> dict[str, float]:
    """Two-way retrieval metrics of a split (as `suite.evaluate_split` reports them), embedded across processes."""
    from prodclip.evaluate import retrieval, suite

    image_emb, text_emb = embed_source_gathered(graphdef, params, source, tokenizer, config)
    keys, _ = suite.retrieval_keys(source)
    return retrieval.two_way_retrieval(image_emb, text_emb, keys, keys, ks=tuple(config.eval.ks))
