"""Input pipeline throughput: pairs/s at 64 and 224 px with 0 and 2 grain workers, against the
quickstart train step rate measured in the same run.

    python benchmarks/input_pipeline.py [--items 512] [--batches 12] [--skip-train-step]

The data is the synthetic catalog prepared as a TFDS dataset (synthetic_products, PNG in
array_record) at each resolution, read through the training pipeline (decode, fit, random
resized crop, flip, tokenize, batch of 64).
"""

from __future__ import annotations

import argparse
import tempfile
import time


from prodclip import optim
from prodclip.models import factory
from prodclip import config as config_lib, config_loading
from prodclip.data import pipeline, synthetic
from prodclip.data import tokenizer as tok
from prodclip.data.builders import build as build_lib
from prodclip.data.tfds_source import TfdsSource

BATCH = 64


def pipeline_rate(data_dir: str, size: int, workers: int, batches: int) -> float:
    source = TfdsSource("synthetic_products", data_dir, "train")
    tokenizer = tok.TitleTokenizer(tok.train_tokenizer(source.titles[:256], vocab_size=512), context_length=20)
    config = config_lib.base_config()
    config.data.image_size = size
    config.data.num_workers = workers
    config.train.batch_size = BATCH
    iterator = pipeline.train_iterator(source, tokenizer, config)
    for _ in range(2):  # warm-up: worker start-up and first reads
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * BATCH / (time.perf_counter() - start)
    iterator.close()
    return rate


def quickstart_step_rate(steps: int = 4) -> float:
    """Pairs/s of the quickstart train step (batch 256, 64 px), compile excluded."""
    import pathlib

    import jax

    from prodclip import train

    config = config_loading.load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py")
    catalog = synthetic.make_catalog("train", 256)
    tokenizer = tok.TitleTokenizer(tok.train_tokenizer(catalog.titles, vocab_size=1024), context_length=20)
    graphdef, params = factory.create_model(config, tokenizer, 0)
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    batch = {"images": catalog.images, "token_ids": tokenizer(catalog.titles), "ids": catalog.ids}
    step = jax.jit(train.make_train_step(config, graphdef, tx), donate_argnums=(0,))
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * 256 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--skip-train-step", action="store_true")
    args = parser.parse_args()
    rows = []
    for size in (64, 224):
        with tempfile.TemporaryDirectory() as data_dir:
            config = config_lib.base_config()
            config.data.image_size = size
            config.data.num_train, config.data.num_val, config.data.num_test, config.data.num_compositional = (
                args.items, 0, 0, 0)
            build_lib.build("synthetic_products", data_dir, config)
            for workers in (0, 2):
                rows.append((size, workers, pipeline_rate(data_dir, size, workers, args.batches)))
                print(f"{size} px, {workers} workers: {rows[-1][2]:.0f} pairs/s", flush=True)
    print("\n| image size | workers | pairs/s |\n|---:|---:|---:|")
    for size, workers, rate in rows:
        print(f"| {size} | {workers} | {rate:.0f} |")
    if not args.skip_train_step:
        print(f"\nquickstart train step (batch 256, 64 px): {quickstart_step_rate():.0f} pairs/s")


if __name__ == "__main__":
    main()
