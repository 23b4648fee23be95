"""Ranking a gallery against queries by embedding score, with bounded memory: top-k and the ranks of positives.

Scores are dot products between query and gallery embeddings (cosine
similarity when both are L2-normalised). Gallery item ``g`` is a positive for
query ``q`` iff ``gallery_keys[g] == query_keys[q]``; keys are arbitrary
integers (title ids, product ids, ...), so a query may have several positives.

The full ``Q x G`` score matrix is never materialised: queries are processed in
blocks of ``query_block`` rows and the gallery is streamed in chunks of
``chunk_size`` rows, so device memory is ``O(query_block * chunk_size)`` plus
the running top-k, independent of ``G``. Every chunk (and query block) is padded
to the same shape, so each jitted step compiles once per call configuration.

Tie rule (shared by every function here): the gallery is ranked by descending
score, and items with *equal* float32 score are ranked by ascending gallery
index. ``-0.0`` and ``+0.0`` count as equal. Scores are the float32 values
produced by the chunked device computation, so "equal" means equal after
rounding; identical gallery rows always tie.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "chunk_step_memory_bytes",
    "chunked_top_k",
    "positive_ranks",
]

DEFAULT_CHUNK_SIZE = 8192
DEFAULT_QUERY_BLOCK = 4096
_MAX_INT32 = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------
# Jitted per-chunk steps. Shapes depend only on (query_block, chunk_size, D, k),
# never on the gallery size G, which is passed as a traced scalar.
# ----------------------------------------------------------------------------


@jax.jit
def _score_chunk(queries: jax.Array, chunk: jax.Array, offset: jax.Array, num_gallery: jax.Array) -> jax.Array:
    """Scores one query block against one gallery chunk.

    Args:
      queries: [B, D] float32 query block.
      chunk: [C, D] float32 gallery rows ``offset .. offset + C - 1`` (zero-padded
        past the end of the gallery).
      offset: int32 scalar, gallery index of ``chunk[0]``.
      num_gallery: int32 scalar, G.

    Returns:
      [B, C] float32 scores; columns at gallery index >= G are ``-inf``.
    """
    scores = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
    # lax.top_k orders -0.0 below +0.0 (total order) while `==` treats them as
    # equal; canonicalising keeps top-k and rank counting on the same tie rule.
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)
    index = offset + jnp.arange(chunk.shape[0], dtype=jnp.int32)
    return jnp.where(index[None, :] < num_gallery, scores, -jnp.inf)


@jax.jit
def _merge_top_k(
    run_scores: jax.Array, run_index: jax.Array, scores: jax.Array, offset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Merges a chunk's scores into the running top-k.

    Args:
      run_scores: [B, k] float32 running best scores, best first.
      run_index: [B, k] int32 gallery indices of ``run_scores``.
      scores: [B, C] float32 chunk scores from ``_score_chunk``.
      offset: int32 scalar, gallery index of the chunk's first column.

    Returns:
      The new ([B, k] float32, [B, k] int32) running top-k.
    """
    k = run_scores.shape[1]
    chunk_index = offset + jnp.arange(scores.shape[1], dtype=jnp.int32)
    # lax.top_k puts the lower *position* first among equal values. Running
    # entries come first and all have smaller gallery indices than this chunk
    # (chunks arrive in order; running ties are already index-ordered), and
    # chunk columns are in index order, so position order == gallery-index
    # order for equal scores and the tie rule survives every merge.
    all_scores = jnp.concatenate([run_scores, scores], axis=1)
    all_index = jnp.concatenate([run_index, jnp.broadcast_to(chunk_index, scores.shape)], axis=1)
    top_scores, position = jax.lax.top_k(all_scores, k)
    return top_scores, jnp.take_along_axis(all_index, position, axis=1)


@jax.jit
def _gather_scores(scores: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """[B, C] float32 scores, [P] int32 rows/cols -> [P] float32 ``scores[rows, cols]``."""
    return scores[rows, cols]


@jax.jit
def _count_ahead(
    scores: jax.Array, rows: jax.Array, items: jax.Array, thresholds: jax.Array, offset: jax.Array
) -> jax.Array:
    """Counts, per positive, the chunk items ranked ahead of it.

    Args:
      scores: [B, C] float32 chunk scores from ``_score_chunk``.
      rows: [P] int32 query row (within the block) of each positive.
      items: [P] int32 gallery index of each positive.
      thresholds: [P] float32 score of each positive.
      offset: int32 scalar, gallery index of the chunk's first column.

    Returns:
      [P] int32 number of chunk items with a greater score, or an equal score
      and a lower gallery index. Padded columns hold ``-inf`` and indices >= G,
      so they are never counted for a finite threshold.
    """
    row_scores = scores[rows]
    chunk_index = offset + jnp.arange(scores.shape[1], dtype=jnp.int32)
    t = thresholds[:, None]
    ahead = (row_scores > t) | ((row_scores == t) & (chunk_index[None, :] < items[:, None]))
    return jnp.sum(ahead, axis=1, dtype=jnp.int32)


# ----------------------------------------------------------------------------
# Host-side helpers.
# ----------------------------------------------------------------------------


def _check_embeddings(query_emb: Any, gallery_emb: Any) -> tuple[Any, Any]:
    """Validates [Q, D] / [G, D] embeddings; returns them without copying."""
    for name, x in (("query_emb", query_emb), ("gallery_emb", gallery_emb)):
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"{name} must be a 2-D array [N, D], got shape {getattr(x, 'shape', None)}")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: query_emb {query_emb.shape}, gallery_emb {gallery_emb.shape}"
        )
    if gallery_emb.shape[0] == 0:
        raise ValueError("empty gallery: gallery_emb has 0 rows, nothing to retrieve")
    if gallery_emb.shape[0] > _MAX_INT32:
        raise ValueError(f"gallery of {gallery_emb.shape[0]} rows exceeds int32 indexing")
    if isinstance(gallery_emb, jax.Array) and not bool(jnp.all(jnp.isfinite(gallery_emb))):
        raise ValueError("gallery_emb contains non-finite values")
    return query_emb, gallery_emb


def query_sharding(block: int) -> jax.sharding.NamedSharding | None:
    """Splits a query block's rows over all local devices, when there are several and they divide it.

    Each row's scores and running top-k depend on that row alone, so row-sharding
    changes where the work runs, never the result; the gallery chunk is replicated.
    """
    devices = jax.local_devices()
    if len(devices) < 2 or block % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("queries",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("queries", None))


def _check_sizes(chunk_size: int, query_block: int) -> None:
    if chunk_size < 1 or query_block < 1:
        raise ValueError(f"chunk_size and query_block must be >= 1, got {chunk_size}, {query_block}")


def _plan(num_queries: int, num_gallery: int, chunk_size: int, query_block: int) -> tuple[int, int]:
    """(query block rows, gallery chunk rows) actually used; never larger than needed."""
    return max(1, min(query_block, num_queries)), min(chunk_size, num_gallery)


def _iter_blocks(x: Any, size: int, name: str) -> Iterator[tuple[int, int, Any]]:
    """Yields (start, valid_rows, block) with block [size, D] float32, zero-padded.

    numpy inputs are sliced on the host (one chunk in memory at a time) and
    checked for non-finite values; jax inputs are sliced on their device.
    """
    n = x.shape[0]
    for start in range(0, n, size):
        stop = min(start + size, n)
        if isinstance(x, jax.Array):
            if stop - start == size:
                # dynamic_slice takes `start` as a traced operand: one compile.
                block = jax.lax.dynamic_slice_in_dim(x, start, size).astype(jnp.float32)
            else:
                block = jnp.pad(x[start:stop].astype(jnp.float32), ((0, size - (stop - start)), (0, 0)))
        else:
            block = np.asarray(x[start:stop], dtype=np.float32)
            if not np.all(np.isfinite(block)):
                raise ValueError(f"{name} contains non-finite values in rows {start}..{stop - 1}")
            if stop - start < size:
                block = np.concatenate([block, np.zeros((size - (stop - start), x.shape[1]), np.float32)])
        yield start, stop - start, block


def _as_keys(keys: Any, n: int, name: str) -> np.ndarray:
    """Integer keys of length n -> [n] int64 (a bijective cast, so equality is kept)."""
    keys = np.asarray(keys)
    if keys.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {keys.shape}")
    if not (np.issubdtype(keys.dtype, np.integer) or keys.dtype == np.bool_):
        raise ValueError(f"{name} must be integers, got dtype {keys.dtype}; see retrieval.keys_from_strings")
    return keys.astype(np.int64)


def _positive_pairs(query_keys: np.ndarray, gallery_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (query, gallery) key matches without building a Q x G mask.

    Returns:
      positives: [P] int64 gallery index of each positive, grouped by query and
        ascending within a query.
      offsets: [Q + 1] int64; query q's positives are ``positives[offsets[q]:offsets[q+1]]``.
    """
    order = np.argsort(gallery_keys, kind="stable")
    sorted_keys = gallery_keys[order]
    lo = np.searchsorted(sorted_keys, query_keys, side="left")
    counts = np.searchsorted(sorted_keys, query_keys, side="right") - lo
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
    return order[np.repeat(lo, counts) + within].astype(np.int64), offsets


def _batches(length: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, size):
        yield start, min(start + size, length)


def _pad_to(x: np.ndarray, size: int, fill: Any) -> np.ndarray:
    return np.concatenate([x, np.full(size - len(x), fill, dtype=x.dtype)]) if len(x) < size else x


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def chunked_top_k(
    query_emb: Any,
    gallery_emb: Any,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items per query by dot-product score, streaming the gallery.

    Args:
      query_emb: [Q, D] float32 (numpy or jax) queries.
      gallery_emb: [G, D] float32 (numpy or jax) gallery, G >= 1.
      k: number of items to return per query, >= 1; clipped to G.
      chunk_size: gallery rows scored per device step.
      query_block: query rows scored per device step; when several local devices
        divide the block, its rows are split over them (see ``query_sharding``).

    Returns:
      (scores [Q, k'] float32, indices [Q, k'] int64), k' = min(k, G), best
      first; equal scores are ordered by ascending gallery index.

    Raises:
      ValueError: on an empty gallery, mismatched dims, k < 1 or non-finite
        embeddings.
    """
    query_emb, gallery_emb = _check_embeddings(query_emb, gallery_emb)
    _check_sizes(chunk_size, query_block)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_queries, num_gallery = query_emb.shape[0], gallery_emb.shape[0]
    block, chunk = _plan(num_queries, num_gallery, chunk_size, query_block)
    k_eff = min(k, num_gallery)

    rows = query_sharding(block)
    out_scores = np.empty((num_queries, k_eff), np.float32)
    out_index = np.empty((num_queries, k_eff), np.int64)
    for q0, q_valid, queries in _iter_blocks(query_emb, block, "query_emb"):
        queries = jnp.asarray(queries) if rows is None else jax.device_put(queries, rows)
        # -inf placeholders are displaced by real (finite) items since k' <= G.
        run_scores = jnp.full((block, k_eff), -jnp.inf, jnp.float32, device=rows)
        run_index = jnp.full((block, k_eff), num_gallery, jnp.int32, device=rows)
        for g0, _, items in _iter_blocks(gallery_emb, chunk, "gallery_emb"):
            previous = run_scores
            scores = _score_chunk(queries, items, g0, num_gallery)
            run_scores, run_index = _merge_top_k(run_scores, run_index, scores, g0)
            # Async dispatch would otherwise let Python enqueue every chunk,
            # each holding its own [B, C] score buffer: O(G) memory in flight.
            # Waiting on the previous step keeps at most two steps queued.
            previous.block_until_ready()
        out_scores[q0 : q0 + q_valid] = np.asarray(run_scores)[:q_valid]
        out_index[q0 : q0 + q_valid] = np.asarray(run_index)[:q_valid]
    return out_scores, out_index


def positive_ranks(
    query_emb: Any,
    gallery_emb: Any,
    query_keys: Any,
    gallery_keys: Any,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> list[np.ndarray]:
    """1-based ranks of every positive in each query's full ranking of the gallery.

    The rank of positive ``g`` is 1 + the number of gallery items with a greater
    score, or an equal score and a lower index (the module's tie rule, the same
    order ``chunked_top_k`` returns). Two streaming passes per query block:
    the first gathers each positive's own score, the second counts the items
    ahead of it. Both passes use the same jitted chunk scorer on the same
    blocks, so a positive's threshold is bit-identical to the score it is
    compared against. Memory is O(query_block * chunk_size) on device plus
    O(#positives) on the host.

    Args:
      query_emb: [Q, D] float32 queries.
      gallery_emb: [G, D] float32 gallery, G >= 1.
      query_keys: [Q] integer keys.
      gallery_keys: [G] integer keys; g is a positive for q iff keys are equal.
      chunk_size: gallery rows scored per device step.
      query_block: query rows scored per device step (also the number of
        positives compared per step).

    Returns:
      Q arrays of int64 ranks, each sorted ascending; empty for a query with no
      positive.
    """
    query_emb, gallery_emb = _check_embeddings(query_emb, gallery_emb)
    _check_sizes(chunk_size, query_block)
    num_queries, num_gallery = query_emb.shape[0], gallery_emb.shape[0]
    query_keys = _as_keys(query_keys, num_queries, "query_keys")
    gallery_keys = _as_keys(gallery_keys, num_gallery, "gallery_keys")
    positives, offsets = _positive_pairs(query_keys, gallery_keys)
    block, chunk = _plan(num_queries, num_gallery, chunk_size, query_block)
    ranks = np.ones(len(positives), np.int64)

    for q0, q_valid, queries in _iter_blocks(query_emb, block, "query_emb"):
        lo, hi = offsets[q0], offsets[q0 + q_valid]
        if lo == hi:
            continue
        queries = jnp.asarray(queries)
        items = positives[lo:hi].astype(np.int32)
        rows = np.repeat(np.arange(q_valid), np.diff(offsets[q0 : q0 + q_valid + 1])).astype(np.int32)

        # Pass 1: each positive's own score, read from the chunk that holds it.
        thresholds = np.empty(hi - lo, np.float32)
        by_chunk = np.argsort(items // chunk, kind="stable")
        chunk_bounds = np.searchsorted(items[by_chunk] // chunk, np.arange(-(-num_gallery // chunk) + 1))
        for g0, _, gallery_chunk in _iter_blocks(gallery_emb, chunk, "gallery_emb"):
            members = by_chunk[chunk_bounds[g0 // chunk] : chunk_bounds[g0 // chunk + 1]]
            if len(members) == 0:
                continue
            scores = _score_chunk(queries, gallery_chunk, g0, num_gallery)
            for s, e in _batches(len(members), block):
                sel = members[s:e]
                got = _gather_scores(scores, _pad_to(rows[sel], block, 0), _pad_to(items[sel] - g0, block, 0))
                thresholds[sel] = np.asarray(got)[: e - s]

        # Pass 2: count items ranked ahead; padded positives get a +inf
        # threshold, which nothing exceeds or equals.
        ahead = np.zeros(hi - lo, np.int64)
        for g0, _, gallery_chunk in _iter_blocks(gallery_emb, chunk, "gallery_emb"):
            scores = _score_chunk(queries, gallery_chunk, g0, num_gallery)
            for s, e in _batches(hi - lo, block):
                counts = _count_ahead(
                    scores,
                    _pad_to(rows[s:e], block, 0),
                    _pad_to(items[s:e], block, 0),
                    _pad_to(thresholds[s:e], block, np.inf),
                    g0,
                )
                ahead[s:e] += np.asarray(counts)[: e - s]
        ranks[lo:hi] = ahead + 1

    return [np.sort(ranks[offsets[q] : offsets[q + 1]]) for q in range(num_queries)]


def chunk_step_memory_bytes(
    num_queries: int,
    num_gallery: int,
    dim: int,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> dict[str, int]:
    """XLA's compiled memory for one ``chunked_top_k`` step at these sizes.

    Compiles (does not run) the score and merge steps with the shapes
    ``chunked_top_k`` would use, to size ``chunk_size`` / ``query_block`` for a
    device. Returns {"score": bytes, "merge": bytes}, each the sum of argument,
    output and temp bytes of that step.
    """
    _check_sizes(chunk_size, query_block)
    block, chunk = _plan(num_queries, num_gallery, chunk_size, query_block)
    k_eff = min(k, num_gallery)
    f32, i32 = jnp.float32, jnp.int32
    spec = jax.ShapeDtypeStruct
    scalar = spec((), i32)
    steps = {
        "score": _score_chunk.lower(spec((block, dim), f32), spec((chunk, dim), f32), scalar, scalar),
        "merge": _merge_top_k.lower(
            spec((block, k_eff), f32), spec((block, k_eff), i32), spec((block, chunk), f32), scalar
        ),
    }
    out = {}
    for name, lowered in steps.items():
        stats = lowered.compile().memory_analysis()
        out[name] = int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)
    return out
