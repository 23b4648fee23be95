"""A FAISS index over an embedding store, for search in milliseconds instead of a full scan.

    prodclip index --store STORE [--kind auto|flat|hnsw|ivf-flat|ivf-sq8|ivf-pq] [--target-recall 0.95]

The index lives inside the store directory (index.faiss + index.json) and records the
store's model fingerprint and size; `open_index` refuses an index whose store has since
been re-embedded by another model or resized. Scores are inner products of L2-normalised
vectors (cosines), the same numbers the exact scan gives.

Kinds (bytes per item at dim D; measured in docs/search_latency.md):
  flat      exact scan (4D). The default up to AUTO_FLAT_MAX_ITEMS (20k) items.
  hnsw      graph search (4D + ~8M links); slow to build on 2 cores.
  ivf-flat  inverted lists of full vectors (4D + 8). The default above that, up to 2M items.
  ivf-sq8   inverted lists of int8 vectors (D + 8). The default above AUTO_IVF_FLAT_MAX_ITEMS (2M).
  ivf-pq    inverted lists of product-quantised codes (D/8 + 8); re-scored with exact store
            vectors by default (RESCORE_FACTOR * k candidates), since PQ alone ranks coarsely.

The approximate kinds choose their search breadth (IVF nprobe, HNSW efSearch) at build time:
the smallest setting whose recall@10 against the exact scan reaches `target_recall` on
calibration queries, which are store rows plus Gaussian noise of norm CALIBRATION_NOISE,
re-normalised (the query sits near, not on, catalog items).

Any search can re-score its top candidates with the exact store vectors (`rescore`), and
returns store rows, so a fusion head can re-rank the candidates afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time

import numpy as np

from prodclip import files
from prodclip.errors import StoreError
from prodclip.evaluate import store as store_lib

log = logging.getLogger("prodclip")

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
KINDS = ("flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq")
# Chosen with benchmarks/search_latency.py (docs/search_latency.md; 2-core CPU, dim 256): an exact
# scan takes 7 ms per query at 30k items and 11 ms at 100k, so search stays exact only up to 20k
# (~5 ms); inverted lists answered in 0.1-0.2 ms at recall@10 0.98-1.0 from 30k to 1M items.
# Float32 lists cost 1 KB per item at dim 256 (1 GB per million), so above
# AUTO_IVF_FLAT_MAX_ITEMS the int8 lists (a quarter of that) are used.
AUTO_FLAT_MAX_ITEMS = 20_000
AUTO_IVF_FLAT_MAX_ITEMS = 2_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
RESCORE_FACTOR = 8  # ivf-pq: exact re-scoring of RESCORE_FACTOR * k candidates
CALIBRATION_QUERIES = 256
CALIBRATION_NOISE = 1.0
ADD_CHUNK = 65536


def auto_kind(num_items: int) -> str:
    """The index kind `--kind auto` builds for a store of `num_items` rows."""
    if num_items <= AUTO_FLAT_MAX_ITEMS:
        return "flat"
    return "ivf-flat" if num_items <= AUTO_IVF_FLAT_MAX_ITEMS else "ivf-sq8"


def num_lists(num_items: int) -> int:
    """IVF lists for `num_items`: the power of two nearest 2 sqrt(N), in [16, 2048].

    2048 caps the build on 2 cores: adding 10M items assigns each to its nearest list
    (10M x 2048 x 256 multiply-adds, ~2.5 min); longer lists cost latency, which the
    calibrated nprobe keeps in view.
    """
    return int(np.clip(2 ** round(np.log2(2 * np.sqrt(max(num_items, 1)))), 16, 2048))


def factory_string(kind: str, dim: int, num_items: int) -> str:
    """The faiss.index_factory description of an index kind."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    nlist = num_lists(num_items)
    if kind == "ivf-flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf-sq8":
        return f"IVF{nlist},SQ8"
    if kind == "ivf-pq":
        if dim % 8:
            raise StoreError(f"ivf-pq needs a dim divisible by 8, the store has dim {dim}; use ivf-sq8")
        return f"IVF{nlist},PQ{dim // 8}np"  # np: no polysemous training (slow, unused here)
    raise StoreError(f"index kind {kind!r} is not one of auto, {', '.join(KINDS)}")


def exact_top_k(store: store_lib.Store, queries: np.ndarray, k: int, chunk: int = 65536
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over the whole store: (scores [Q, k], rows [Q, k] int64).

    Streams the store `chunk` rows at a time; equal scores go to the lower row.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    k = min(k, len(store))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start, rows in store.iter_rows(chunk):
        scores = queries @ rows.T
        take = min(k, rows.shape[0])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        order = np.lexsort((best_i, -best_s), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q|; found, truth: [Q, k] rows."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def calibration_queries(store: store_lib.Store, count: int = CALIBRATION_QUERIES, seed: int = 0) -> np.ndarray:
    """[count, D] float32 unit queries: random store rows plus Gaussian noise of norm ~CALIBRATION_NOISE."""
    rng = np.random.default_rng(seed)
    rows = store.rows(np.sort(rng.choice(len(store), size=min(count, len(store)), replace=False)))
    noise = rng.standard_normal(rows.shape).astype(np.float32) * (CALIBRATION_NOISE / np.sqrt(rows.shape[1]))
    queries = rows + noise
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


@dataclasses.dataclass
class Index:
    """An opened index. `meta`: kind, fingerprint, num_items, dim, search breadth, build stats.

    `store`: the store it was built from, used to re-score candidates with exact vectors.
    """

    faiss_index: object
    meta: dict
    store: store_lib.Store | None = None

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def _params(self, breadth: int | None):
        import faiss

        breadth = breadth or self.meta.get("breadth")
        if self.kind.startswith("ivf") and breadth:
            return faiss.SearchParametersIVF(nprobe=int(breadth))
        if self.kind == "hnsw" and breadth:
            return faiss.SearchParametersHNSW(efSearch=int(breadth))
        return None

    def candidates(self, queries: np.ndarray, k: int, breadth: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The index's own top-k (no re-scoring): (scores [Q, k'], rows [Q, k'] int64), k' = min(k, N).

        A query an approximate index finds fewer than k' rows for is searched again
        with a wider breadth (IVF: every list at most), so rows never hold -1.
        """
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.meta["dim"]:
            raise StoreError(f"queries have shape {queries.shape}, the index takes [Q, {self.meta['dim']}]")
        k = min(int(k), len(self))
        if k < 1:
            raise StoreError(f"k must be >= 1, got {k}")
        if self.kind == "hnsw":
            breadth = max(breadth or self.meta.get("breadth") or 16, k)
        scores, rows = self.faiss_index.search(queries, k, params=self._params(breadth))
        short = np.flatnonzero((rows < 0).any(axis=1))
        if len(short) and self.kind.startswith("ivf"):
            nlist = self.meta["nlist"]
            s2, r2 = self.faiss_index.search(queries[short], k, params=self._params(nlist))
            scores[short], rows[short] = s2, r2
        return scores, rows.astype(np.int64)

    def search(self, queries: np.ndarray, k: int, *, rescore: int | None = None, breadth: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k store rows per query: (scores [Q, k'] float32, rows [Q, k'] int64), best first.

        queries: [Q, D] float32, L2-normalised. rescore: re-score rescore * k candidates with
        the exact store vectors (0 = no; None = the index's default, 8 for ivf-pq). breadth:
        override the calibrated nprobe / efSearch.
        """
        factor = self.meta.get("rescore", 0) if rescore is None else int(rescore)
        if factor <= 1 or self.store is None or self.kind == "flat":
            return self.candidates(queries, k, breadth)
        _, rows = self.candidates(queries, k * factor, breadth)
        return rescore_exact(self.store, queries, rows, k)


def rescore_exact(store: store_lib.Store, queries: np.ndarray, rows: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Re-scores candidate rows [Q, C] with the store's vectors; the top k of them, best first.

    Returns (scores [Q, min(k, C)] float32, rows [Q, min(k, C)] int64); equal scores go to the lower row.
    """
    queries = np.asarray(queries, np.float32)
    vectors = store.rows(rows.reshape(-1)).reshape(rows.shape + (queries.shape[1],))
    scores = np.einsum("qcd,qd->qc", vectors, queries)
    order = np.lexsort((rows, -scores), axis=1)[:, :min(k, rows.shape[1])]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32), np.take_along_axis(rows, order, axis=1)


def _train_rows(store: store_lib.Store, nlist: int, seed: int) -> np.ndarray:
    count = min(len(store), 40 * nlist)
    rng = np.random.default_rng(seed)
    return store.rows(np.sort(rng.choice(len(store), size=count, replace=False)))


def calibrate(index: Index, queries: np.ndarray, truth: np.ndarray, target_recall: float, k: int = 10
              ) -> tuple[int | None, float]:
    """The smallest search breadth whose recall@k on (queries, truth) reaches target_recall.

    Returns (breadth, recall at it); breadth None for flat. Tries powers of two up to all
    IVF lists / efSearch 1024, and keeps the widest when none reaches the target.
    """
    if index.kind == "flat":
        return None, recall_at_k(index.search(queries, k)[1], truth)
    limit = index.meta["nlist"] if index.kind.startswith("ivf") else 1024
    breadth, recall = 1 if index.kind.startswith("ivf") else 16, 0.0
    while True:
        recall = recall_at_k(index.search(queries, k, breadth=breadth)[1], truth)
        if recall >= target_recall or breadth >= limit:
            return breadth, recall
        breadth = min(breadth * 2, limit)


def build_index(store_dir: str | pathlib.Path, kind: str = "auto", *, target_recall: float = 0.95,
                seed: int = 0, threads: int | None = None) -> pathlib.Path:
    """Builds the index of a store and writes it into the store directory; returns the index path.

    kind: auto | flat | hnsw | ivf-flat | ivf-sq8 | ivf-pq. Writes index.faiss and index.json
    (kind, fingerprint, num_items, dim, breadth, calibrated recall@10, build seconds, bytes per item).
    Raises StoreError for a missing or incomplete store or an unknown kind.
    """
    import faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    store = open_store(store_dir)
    n, dim = len(store), store.dim
    kind = auto_kind(n) if kind == "auto" else kind
    description = factory_string(kind, dim, n)
    started = time.perf_counter()
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    nlist = None
    if kind.startswith("ivf"):
        ivf = faiss.extract_index_ivf(index)
        nlist = int(ivf.nlist)
        ivf.cp.seed = seed
        ivf.cp.niter = 10
        train = _train_rows(store, nlist, seed)
        log.info("index: training %s on %d rows", description, len(train))
        index.train(train)
        del train
    elif kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    for _, rows in store.iter_rows(ADD_CHUNK):
        index.add(rows)
    build_seconds = time.perf_counter() - started
    meta = {"kind": kind, "factory": description, "fingerprint": store.header["fingerprint"],
            "num_items": n, "dim": dim, "store_dtype": store.dtype, "nlist": nlist,
            "rescore": RESCORE_FACTOR if kind == "ivf-pq" else 0, "breadth": None,
            "target_recall": float(target_recall), "build_seconds": round(build_seconds, 2)}
    opened = Index(index, meta, store)
    queries = calibration_queries(store, seed=seed)
    truth = exact_top_k(store, queries, 10)[1]
    meta["breadth"], meta["calibrated_recall_at_10"] = calibrate(opened, queries, truth, target_recall)
    path = pathlib.Path(store_dir) / INDEX_FILE
    tmp = files.temporary_path(path)
    faiss.write_index(index, str(tmp))
    meta["bytes_per_item"] = round(tmp.stat().st_size / n, 1)
    os.replace(tmp, path)
    files.write_text(path.parent / META_FILE, json.dumps(meta, indent=2))
    log.info("index: %s", meta)
    return path


def open_store(store_dir: str | pathlib.Path) -> store_lib.Store:
    """`store.open_store`, with its errors as `errors.StoreError`."""
    try:
        return store_lib.open_store(store_dir)
    except store_lib.StoreError as e:
        raise StoreError(str(e)) from e


def index_meta(store_dir: str | pathlib.Path) -> dict | None:
    """The index.json of a store's index, or None when the store has no index."""
    path = pathlib.Path(store_dir) / META_FILE
    if not path.exists() or not (path.parent / INDEX_FILE).exists():
        return None
    return json.loads(path.read_text())


def check_index(meta: dict, store: store_lib.Store, fingerprint: str | None = None) -> None:
    """Raises StoreError when an index does not belong to `store` (or to the model `fingerprint`)."""
    where = store.path / INDEX_FILE
    rebuild = f"rebuild it with `prodclip index --store {store.path}`"
    if meta["fingerprint"] != store.header["fingerprint"]:
        raise StoreError(f"{where} was built from embeddings of model {meta['fingerprint']}, but the store now "
                         f"holds model {store.header['fingerprint']}'s; {rebuild}")
    if meta["num_items"] != len(store) or meta["dim"] != store.dim:
        raise StoreError(f"{where} has {meta['num_items']} items of dim {meta['dim']}, the store has "
                         f"{len(store)} of dim {store.dim}; {rebuild}")
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise StoreError(f"{where} was built from model {meta['fingerprint']}'s embeddings, but the model "
                         f"loaded now is {fingerprint}; search with the run that made the store, or re-embed "
                         "and re-index with this one")


def open_index(store_dir: str | pathlib.Path, *, fingerprint: str | None = None,
               store: store_lib.Store | None = None) -> Index | None:
    """The store's index (its store attached for re-scoring), or None when it has none.

    Raises StoreError when the index was built from another model's or another size's store,
    or for `fingerprint` other than the index's.
    """
    import faiss

    meta = index_meta(store_dir)
    if meta is None:
        return None
    store = store if store is not None else open_store(store_dir)
    check_index(meta, store, fingerprint)
    faiss_index = faiss.read_index(str(pathlib.Path(store_dir) / INDEX_FILE))
    if faiss_index.ntotal != meta["num_items"]:
        raise StoreError(f"{pathlib.Path(store_dir) / INDEX_FILE} holds {faiss_index.ntotal} items, its "
                         f"index.json says {meta['num_items']}; rebuild it with `prodclip index`")
    return Index(faiss_index, meta, store)
