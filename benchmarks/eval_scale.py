"""Catalog-scale numbers: embed throughput, and search latency over 100k / 1M stored embeddings.

    python benchmarks/eval_scale.py            # ~2 minutes on a 2-core CPU
    python benchmarks/eval_scale.py --sizes 100000 --queries 20

Embed: the quickstart model (configs/quickstart.py, random weights: speed does not
depend on training) embeds synthetic products (64 px image + title) through the same
path as `prodclip embed` (grain eval batches, jit encoders, mix of image and title).

Search: random L2-normalised float32 embeddings of dim 256, split into store-sized
shards (embed.shard_size), searched with `prodclip.search.top_k` (the `prodclip search`
path: chunked top-k, chunk = embed.chunk_size rows). Latency is per query: at batch 1
each call is one query; at batch 256 a call's time is divided by 256. Peak RSS is the
process's high-water mark after each row (it includes the gallery itself, 1 GB at 1M).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def embed_throughput(num_items: int) -> dict:
    from prodclip.models import inference
    from prodclip.models import factory
    from prodclip import config_loading
    from prodclip.data import sources, synthetic
    from prodclip.data import tokenizer as tokenizer_lib
    from prodclip.evaluate import store

    config = config_loading.load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py")
    catalog = synthetic.make_catalog("test", num_items, image_size=config.data.image_size)
    hf = tokenizer_lib.train_tokenizer(catalog.titles, vocab_size=config.tokenizer.vocab_size)
    tokenizer = tokenizer_lib.TitleTokenizer(hf, context_length=config.tokenizer.context_length)
    graphdef, params = factory.create_model(config, tokenizer, seed=0)
    warm = sources.RowRange(catalog, 0, config.eval.batch_size)
    inference.embed_source(graphdef, params, warm, tokenizer, config)  # compile
    start = time.perf_counter()
    image_emb, text_emb = inference.embed_source(graphdef, params, catalog, tokenizer, config)
    store.product_vectors(image_emb, text_emb, config.embed.mode, config.embed.image_weight)
    seconds = time.perf_counter() - start
    return {"items": num_items, "seconds": seconds, "items_per_s": num_items / seconds,
            "batch": config.eval.batch_size, "num_params": sum(x.size for x in __import__("jax").tree.leaves(params))}


def random_gallery(num_items: int, dim: int, shard_size: int, seed: int = 0) -> list[np.ndarray]:
    """Shards of unit-norm float32 rows, generated shard by shard (no 2x temporary)."""
    rng = np.random.default_rng(seed)
    shards = []
    for start in range(0, num_items, shard_size):
        rows = rng.standard_normal((min(shard_size, num_items - start), dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        shards.append(rows)
    return shards


def search_latency(shards: list[np.ndarray], batch: int, calls: int, k: int, chunk_size: int) -> dict:
    from prodclip import search

    dim = shards[0].shape[1]
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((calls + 1, batch, dim), dtype=np.float32)
    search.top_k(shards, queries[0], k, chunk_size=chunk_size)  # compile
    per_query = []
    for q in queries[1:]:
        start = time.perf_counter()
        search.top_k(shards, q, k, chunk_size=chunk_size)
        per_query.append((time.perf_counter() - start) / batch)
    per_query_ms = np.asarray(per_query) * 1e3
    return {"p50_ms": float(np.percentile(per_query_ms, 50)), "p99_ms": float(np.percentile(per_query_ms, 99)),
            "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-items", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=40, help="calls timed at batch 1")
    parser.add_argument("--batches", type=int, default=4, help="calls timed at batch 256")
    args = parser.parse_args()

    from prodclip import config as config_lib

    defaults = config_lib.base_config().embed
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}")
    e = embed_throughput(args.embed_items)
    print(f"\nembed (quickstart model, {e['num_params'] / 1e6:.2f}M params, batch {e['batch']}, image + title): "
          f"{e['items_per_s']:.0f} items/s ({e['items']} items in {e['seconds']:.1f} s); "
          f"peak RSS {peak_rss_mb():.0f} MB\n")

    print(f"search: dim {args.dim}, top-{args.k}, shards of {defaults.shard_size}, chunk {defaults.chunk_size}\n")
    print("| gallery | batch | p50 ms/query | p99 ms/query | timed calls | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        shards = random_gallery(size, args.dim, defaults.shard_size)
        for batch, calls in ((1, args.queries), (256, args.batches)):
            r = search_latency(shards, batch, calls, args.k, defaults.chunk_size)
            print(f"| {size:,} | {batch} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['calls']} | "
                  f"{peak_rss_mb():.0f} |", flush=True)
        del shards


if __name__ == "__main__":
    main()
