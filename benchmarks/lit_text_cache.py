"""LiT with a locked all-MiniLM-L6-v2 text tower: train-step pairs/s with and without the text cache.

    python benchmarks/lit_text_cache.py [--num-train 4096] [--steps 6] [--batch 128] [--out lit.json]

Myntra catalog (configs/myntra.py, first --num-train train rows), the config's ViT image tower,
the MiniLM text tower locked (optim.lock_text, no title-word dropout), embed_dim 384 (the
sentence-embedding space, no text projection). Both modes start from the same state and see
the same batches; the first step of each is compilation and is not timed. It prints pairs/s of
both side by side, the loss of every step of both, and the one-off cost of building the cache.
Needs the optional extra: pip install 'prodclip[minilm]'.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lit_config(num_train: int, batch: int):
    sys.path.insert(0, str(ROOT / "configs"))
    import myntra

    from prodclip import config_checks
    from prodclip import convert_bert

    c = myntra.get_config()
    convert_bert.use_pretrained_text(c, convert_bert.minilm_dir(), pooling="mean")
    c.model.text.bert.projection = False
    c.model.embed_dim = 384
    c.optim.lock_text = True
    c.data.title_dropout_prob = 0.0
    c.data.num_train = num_train
    c.train.batch_size = batch
    c.lock()
    config_checks.validate(c)
    return c


def timed_steps(step, state, batches):
    """(losses, pairs/s over all but the first step); `state` is not modified (no donation)."""
    losses, start = [], None
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done
        if i == 0:
            start = time.perf_counter()
    return losses, (len(batches) - 1) * len(batches[0]["ids"]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6, help="steps per mode, the first one untimed")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    from prodclip import convert_bert, optim, text_cache, train
    from prodclip import run as run_lib
    from prodclip.models import factory
    from prodclip.data import pipeline

    config = lit_config(args.num_train, args.batch)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="lit_bench_"))
    tokenizer, sources, _ = run_lib.load_tokenizer_and_sources(config, workdir, {"train": None})
    graphdef, params = factory.create_model(config, tokenizer, config.seed)
    params = convert_bert.load_text_tower(config.model.text.pretrained, config, params)
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    iterator = pipeline.train_iterator(sources["train"], tokenizer, config)
    batches = [next(iterator) for _ in range(args.steps)]
    iterator.close()

    t0 = time.perf_counter()
    cache = text_cache.for_run(config, workdir, graphdef, params, tokenizer, sources["train"])
    cache_seconds = time.perf_counter() - t0
    step = jax.jit(train.make_train_step(config, graphdef, tx))
    uncached_losses, uncached_rate = timed_steps(step, state, batches)
    cached_losses, cached_rate = timed_steps(step, state, [cache.attach(b) for b in batches])

    result = {"device": str(jax.devices()[0]), "batch": args.batch, "steps": args.steps,
              "distinct_titles": len(cache), "cache_build_seconds": cache_seconds,
              "uncached_pairs_per_sec": uncached_rate, "cached_pairs_per_sec": cached_rate,
              "uncached_losses": uncached_losses, "cached_losses": cached_losses,
              "max_abs_loss_difference": float(np.max(np.abs(np.subtract(cached_losses, uncached_losses))))}
    print(f"| mode | pairs/s | loss, steps 1..{args.steps} |\n|---|---:|---|")
    for mode, rate, losses in (("uncached", uncached_rate, uncached_losses), ("cached", cached_rate, cached_losses)):
        print(f"| {mode} | {rate:.1f} | {' '.join(f'{x:.6f}' for x in losses)} |")
    print(f"speed-up {cached_rate / uncached_rate:.1f}x; max |loss difference| "
          f"{result['max_abs_loss_difference']:.2e}; cache of {len(cache)} distinct titles built once in "
          f"{cache_seconds:.1f} s")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
