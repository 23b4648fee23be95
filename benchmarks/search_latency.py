"""Search latency at catalog scale: FAISS indexes (prodclip/index.py) beside today's exact scan.

    python benchmarks/search_latency.py --sizes 100000 1000000 --json out.json
    python benchmarks/search_latency.py --sizes 10000000 --kinds ivf-sq8 --json out10m.json

Vectors: dim 256, a mixture of CLUSTERS Gaussian clusters on the unit sphere (a point is its
cluster's centre plus isotropic noise of norm SPREAD, re-normalised), the centres grouped in
SUPER_CLUSTERS families of overlapping siblings: a query's ten nearest items sit in its own
cluster and its siblings, the way products of one type and its variants do in a real embedding
space, rather than uniform noise where every neighbour is equally far. Queries are
new draws from the same mixture (held out from the store). Stores are written with
`store.write_vector_store` (float32 up to 2M items; float16 above, to halve the disk and page
cache), indexes built with `index.build_index` (search breadth calibrated to --target-recall
on the index's own calibration queries, not on the benchmark queries).

Per size and method:
  build_s     index build time (training, adding, calibration), seconds
  MB, B/item  the index file's size (what it takes in memory), total and per item
  p50/p99 ms  latency of one query at a time (batch 1), over --queries queries
  QPS@64      queries per second answered in batches of 64
  recall@10   overlap of the top 10 with the exact top 10 (float32 inner products of the store rows)
"exact scan" is `prodclip.search.top_k`, the chunked JAX scan `prodclip search` uses without an index.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DIM = 256
CLUSTERS = 4096
SUPER_CLUSTERS = 64
SIBLING_OFFSET = 1.0  # sibling centres: cosine ~0.5 to each other
SPREAD = 1.0  # a point: cosine ~0.7 to its centre; nearest neighbours ~0.5-0.6
CHUNK = 65536
FLOAT32_MAX_ITEMS = 2_000_000
TEN_MILLION_FREE_GB = 12.0


def available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def centres(seed: int = 0) -> np.ndarray:
    """[CLUSTERS, DIM] unit cluster centres, themselves grouped: SUPER_CLUSTERS groups of siblings.

    A centre is its group's direction plus an offset of norm SIBLING_OFFSET, re-normalised, so
    sibling clusters (say, shirt types) overlap and a query's neighbours can sit in several.
    """
    rng = np.random.default_rng(seed)
    groups = rng.standard_normal((SUPER_CLUSTERS, DIM)).astype(np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    c = groups[np.arange(CLUSTERS) % SUPER_CLUSTERS]
    c += rng.standard_normal((CLUSTERS, DIM)).astype(np.float32) * np.float32(SIBLING_OFFSET / np.sqrt(DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def mixture_rows(n: int, seed: int, c: np.ndarray) -> np.ndarray:
    """[n, DIM] unit vectors drawn from the cluster mixture."""
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, len(c), n)]
    x += rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(SPREAD / np.sqrt(DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def mixture_chunks(n: int, c: np.ndarray, seed: int = 1):
    for i, start in enumerate(range(0, n, CHUNK)):
        yield mixture_rows(min(CHUNK, n - start), seed * 1_000_003 + i, c)


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_method(search_fn, queries: np.ndarray, batch1: int, batches64: int) -> dict:
    search_fn(queries[:1])  # warm-up (compile, page in)
    search_fn(queries[:64])
    single = []
    for q in queries[:batch1]:
        t = time.perf_counter()
        search_fn(q[None])
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    for b in range(batches64):
        search_fn(queries[(b * 64) % len(queries):][:64])
    qps = batches64 * 64 / (time.perf_counter() - t)
    p50, p99 = percentiles_ms(single)
    return {"p50_ms": p50, "p99_ms": p99, "qps_batch64": qps}


def run_size(n: int, kinds: list[str], args, root: pathlib.Path) -> list[dict]:
    from prodclip import index as index_lib
    from prodclip import search
    from prodclip.evaluate import store as store_lib
    from prodclip.evaluate import store_codec

    c = centres()
    dtype = "float32" if n <= FLOAT32_MAX_ITEMS else "float16"
    path = root / f"store_{n}"
    t = time.perf_counter()
    store_lib.write_vector_store(path, mixture_chunks(n, c), fingerprint="benchmark000000", num_items=n,
                                 shard_size=CHUNK * 4, dtype=dtype)
    print(f"[{n}] wrote {dtype} store in {time.perf_counter() - t:.0f} s", flush=True)
    store = store_lib.open_store(path)
    queries = mixture_rows(max(args.queries, 64), seed=999, c=c)
    t = time.perf_counter()
    truth = index_lib.exact_top_k(store, queries, 10)[1]
    print(f"[{n}] exact truth for {len(queries)} queries in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    base = {"items": n, "dim": DIM, "store_dtype": dtype,
            "store_bytes_per_item": store_codec.bytes_per_item(dtype, DIM)}
    if not args.skip_exact_scan:
        batch1 = args.queries if n <= 1_000_000 else 5
        timing = time_method(lambda q: search.top_k(store.shards, q, 10), queries, min(batch1, 50),
                             2 if n <= 1_000_000 else 1)
        found = search.top_k(store.shards, queries, 10)[1]
        rows.append({**base, "method": "exact scan (prodclip.search.top_k)", "build_s": 0.0,
                     "index_mb": n * store_codec.bytes_per_item(dtype, DIM) / 1e6,
                     "bytes_per_item": store_codec.bytes_per_item(dtype, DIM), **timing,
                     "recall_at_10": index_lib.recall_at_k(found, truth)})
        print(json.dumps(rows[-1]), flush=True)
    for kind in kinds:
        if kind == "flat" and n > 1_000_000:
            continue  # a flat index at 10M is the exact scan again, at 10 GB
        t = time.perf_counter()
        index_lib.build_index(path, kind, target_recall=args.target_recall)
        build_s = time.perf_counter() - t
        index = index_lib.open_index(path)
        meta = index.meta
        timing = time_method(lambda q: index.search(q, 10), queries, args.queries, args.batches)
        found = index.search(queries, 10)[1]
        size = (path / index_lib.INDEX_FILE).stat().st_size
        rows.append({**base, "method": f"faiss {meta['factory']}" + (f" rescore x{meta['rescore']}"
                                                                     if meta["rescore"] else ""),
                     "kind": kind, "breadth": meta["breadth"], "build_s": build_s, "index_mb": size / 1e6,
                     "bytes_per_item": size / n, **timing, "recall_at_10": index_lib.recall_at_k(found, truth),
                     "calibrated_recall_at_10": meta["calibrated_recall_at_10"]})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(path)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| items | method | breadth | build s | index MB | B/item | p50 ms | p99 ms | QPS@64 | recall@10 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['items']:,} | {r['method']} | {r.get('breadth') or ''} | {r['build_s']:.1f} | "
                     f"{r['index_mb']:.0f} | {r['bytes_per_item']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['qps_batch64']:.0f} | {r['recall_at_10']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf-flat", "ivf-sq8"])
    parser.add_argument("--queries", type=int, default=200, help="batch-1 queries timed (and recall queries)")
    parser.add_argument("--batches", type=int, default=10, help="batches of 64 timed for QPS")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--skip-exact-scan", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the temporary stores go (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import faiss

    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="search_latency_"))
    root.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for n in args.sizes:
        need_gb = n * (DIM + 8) / 2**30 + 1.5  # the int8 IVF lists plus working memory
        if n >= 10_000_000 and available_gb() < max(TEN_MILLION_FREE_GB, need_gb):
            skipped.append(f"{n} items skipped: {available_gb():.1f} GB available, {TEN_MILLION_FREE_GB} needed")
            print(skipped[-1], flush=True)
            continue
        rows += run_size(n, args.kinds, args, root)
    info = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "clusters": CLUSTERS, "super_clusters": SUPER_CLUSTERS, "sibling_offset": SIBLING_OFFSET,
            "spread": SPREAD, "skipped": skipped}
    print(json.dumps(info))
    print(markdown(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
