"""Train-step throughput of prodclip: pairs/s, step time, compile time, peak RSS, model FLOP/s and MFU.

    python benchmarks/train_throughput.py                       # quickstart, tiny_clip, vit_b16; JSON on stdout
    python benchmarks/train_throughput.py --configs tiny_clip --steps 20 --out tiny.json
    python benchmarks/train_throughput.py --configs quickstart --cache-dir /tmp/jaxcache   # persistent cache
    python benchmarks/train_throughput.py --configs tiny_clip --profile /tmp/prof         # + where the time goes

Each config runs in its own process (so peak RSS is that config's), on random data (input is
not timed), through the trainer's own step: `train.make_train_step` compiled by
`parallel.compile_train_step` with buffer donation. Each step is timed to completion
(`block_until_ready` on its loss). In the same process a float32 matmul peak is measured
(the best of `--peak-reps` [n, n] @ [n, n] products, n = 2048) and MFU is

    MFU = analytic model FLOPs per step / median step time / measured matmul peak.

Model FLOPs count the matmuls of the forward pass (dense layers, attention scores and
values, the [B, B] logits) times 3 for forward + backward; XLA's own cost analysis of the
compiled step (which also counts element-wise work) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

CONFIG_NAMES = ("quickstart", "tiny_clip", "vit_b16")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO:  # this checkout's prodclip, not another one installed in the environment
    sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- configs


def _tower(tower, width: int, depth: int, heads: int) -> None:
    tower.width, tower.depth, tower.num_heads = width, depth, heads


def tiny_clip_config():
    """The issue's tiny CLIP: ViT 64 px / patch 8, 6x256 (4 heads); text ctx 32, vocab 8192, 6x256; embed 256.

    Laid out like open_clip's CLIP (class token, learned positions, a LayerNorm before the
    blocks, no patch bias, causal text pooled at the largest id), AdamW, batch 128, float32,
    plain CLIP loss (no extra positives), so `vs_open_clip.py` can build the same model there.
    """
    from prodclip.config import base_config
    c = base_config()
    c.data.image_size = 64
    c.tokenizer.context_length = 32
    c.model.embed_dim = 256
    c.model.dtype = "float32"
    _tower(c.model.image, 256, 6, 4)
    c.model.image.patch_size = 8
    c.model.image.pooling = "cls"
    c.model.image.posemb = "learn"
    c.model.image.pre_norm = True
    c.model.image.patch_bias = False
    _tower(c.model.text, 256, 6, 4)
    c.model.text.vocab_size = 8192
    c.model.text.eot_rule = "argmax"
    c.loss.extra_positives = False
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.train.batch_size = 128
    return c


def quickstart_config():
    """configs/quickstart.py as it trains (batch 256), with its tokenizer's 1024-token vocabulary."""
    from prodclip import config_loading
    c = config_loading.load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
    c.model.text.vocab_size = c.tokenizer.vocab_size
    return c


def resnet_baseline_config():
    """configs/ablations/architectures.py's resnet_transformer row (ResNet-18 at width 0.5, GroupNorm) as it trains."""
    from prodclip import config_loading
    c = config_loading.load_config_file(os.path.join(REPO, "configs", "ablations", "architectures.py"),
                                    "resnet_transformer")
    c.model.text.vocab_size = c.tokenizer.vocab_size
    return c


def resized(config, *, image_size, patch, context, vocab, embed, image, text, batch):
    """`config` with other shapes: image / text are (width, depth, heads)."""
    config.data.image_size, config.model.image.patch_size = image_size, patch
    config.tokenizer.context_length, config.model.text.vocab_size = context, vocab
    config.model.embed_dim, config.train.batch_size = embed, batch
    _tower(config.model.image, *image)
    _tower(config.model.text, *text)
    return config


def vit_b16_config():
    """ViT-B/16 CLIP shapes (224 px, 12x768 image, 12x512 text, ctx 77, vocab 49408, embed 512), batch 8."""
    return resized(tiny_clip_config(), image_size=224, patch=16, context=77, vocab=49408, embed=512,
                   image=(768, 12, 12), text=(512, 12, 8), batch=8)


def micro_config():
    """A micro model for tests (seconds, not minutes)."""
    return resized(tiny_clip_config(), image_size=16, patch=8, context=8, vocab=64, embed=32,
                   image=(32, 1, 2), text=(32, 1, 2), batch=8)


CONFIGS = {"quickstart": quickstart_config, "tiny_clip": tiny_clip_config, "vit_b16": vit_b16_config,
           "resnet_baseline": resnet_baseline_config, "micro": micro_config}


# ----------------------------------------------------------------------------- FLOPs


def encoder_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of `depth` pre-LN blocks on one sequence of `tokens` tokens.

    Per token and block: q, k, v, out projections 4 * 2 * W^2; MLP 2 * 2 * W * hidden;
    attention scores and weighted values 2 * 2 * tokens * W.
    """
    hidden = int(width * mlp_ratio)
    per_token = 8 * width ** 2 + 4 * width * hidden + 4 * tokens * width
    return float(depth * tokens * per_token)


def model_flops_per_pair(config) -> dict[str, float]:
    """Analytic forward FLOPs of one (image, title) pair, by part, and the train total (3x forward)."""
    from prodclip import config as config_lib
    m = config.model
    image = config_lib.tower_dims(m.image, config_lib.VIT_PRESETS)
    text = config_lib.tower_dims(m.text, config_lib.TEXT_PRESETS)
    patch = m.image.patch_size
    patches = (config.data.image_size // patch) ** 2
    image_tokens = patches + (1 if m.image.pooling == "cls" else 0)
    image_fwd = (2 * patches * patch * patch * 3 * image["width"]
                 + encoder_flops(image_tokens, image["width"], image["depth"], m.image.mlp_ratio)
                 + 2 * image["width"] * m.embed_dim)
    if m.image.pooling == "map":
        image_fwd += (encoder_flops(1, image["width"], 1, m.image.mlp_ratio)
                      + 4 * image_tokens * image["width"] * 2)
    ctx = config.tokenizer.context_length
    text_fwd = encoder_flops(ctx, text["width"], text["depth"], m.text.mlp_ratio) + 2 * text["width"] * m.embed_dim
    logits_fwd = 2 * config.train.batch_size * m.embed_dim
    forward = image_fwd + text_fwd + logits_fwd
    return {"image_forward": image_fwd, "text_forward": text_fwd, "logits_forward": logits_fwd,
            "forward": forward, "train": 3 * forward}


# ----------------------------------------------------------------------------- measurements


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """The best float32 [n, n] @ [n, n] rate JAX reaches here, in FLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of random uint8 images and random titles (lengths 4..ctx, padded with id 0)."""
    rng = np.random.default_rng(seed)
    b, size, ctx = config.train.batch_size, config.data.image_size, config.tokenizer.context_length
    vocab = config.model.text.vocab_size
    token_ids = rng.integers(1, vocab, (b, ctx), dtype=np.int32)
    lengths = rng.integers(min(4, ctx), ctx + 1, b)
    token_ids[np.arange(ctx)[None, :] >= lengths[:, None]] = 0
    return {"images": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
            "token_ids": token_ids, "ids": np.arange(b, dtype=np.int32)}


def spread(times: list[float]) -> dict[str, float]:
    t = np.asarray(times)
    return {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90)),
            "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


class ProdclipStep:
    """prodclip's compiled train step on one config and a fixed random batch.

    Construction builds the model and optimizer state and compiles the step ahead of
    time (timed); `run(k)` returns the wall time of each of k steps, each run to completion.
    """

    def __init__(self, config, seed: int = 0):
        import jax
        from flax import nnx

        from prodclip import optim, parallel, train
        from prodclip.models import two_tower

        self.config = config
        model = two_tower.build_model(config, vocab_size=config.model.text.vocab_size, pad_id=0, rngs=nnx.Rngs(seed))
        graphdef, params = nnx.split(model, nnx.Param)
        params = params.to_pure_dict()
        tx = optim.make_optimizer(config, params)
        state = optim.init_train_state(config, params)
        self.num_params = int(sum(x.size for x in jax.tree.leaves(params)))
        mesh = parallel.make_mesh(config, jax.devices()[:1])
        compiled = parallel.compile_train_step(config, mesh, lambda loss, reduce: train.make_train_step(
            config, graphdef, tx, loss, reduce), train.make_pair_loss(config), state)
        self.state = compiled.place_state(state)
        self.batch = compiled.place_batch(random_batch(config, seed))
        t = time.perf_counter()
        lowered = compiled.step.lower(self.state, self.batch)
        self.lower_s = time.perf_counter() - t
        t = time.perf_counter()
        self.step = lowered.compile()
        self.compile_s = time.perf_counter() - t
        cost = self.step.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch)
            metrics["loss"].block_until_ready()
            times.append(time.perf_counter() - t)
            self.last_loss = float(metrics["loss"])
        return times


def profile_ops(runner: ProdclipStep, out_dir: str, steps: int = 2) -> dict[str, Any]:
    """Traces `steps` steps with jax.profiler (a Perfetto trace under out_dir) and sums XLA op time by kind.

    Kinds are op names without their numeric suffix (`ynn_fusion` = matmuls run by
    YNNPACK, `copy_bitcast_fusion` = layout copies, ...). Ops run concurrently on the CPU
    thread pool, so the op total can exceed the wall time.
    """
    import collections
    import glob
    import gzip
    import re

    import jax
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        wall = sum(runner.run(steps))
    trace = json.load(gzip.open(glob.glob(os.path.join(out_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_kind: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        op = re.fullmatch(r"([a-z][a-z0-9_\-]*)(\.\d+)?", name)  # HLO instruction names, not runtime events
        if e.get("ph") == "X" and op:
            by_kind[op.group(1)] += e.get("dur", 0) / 1e6
    total = sum(by_kind.values())
    memory = runner.step.memory_analysis()
    return {"steps": steps, "wall_s": wall, "op_s": total,
            "op_share": {k: v / total for k, v in by_kind.most_common(15)},
            "xla_temp_mib": memory.temp_size_in_bytes / 2**20, "xla_argument_mib": memory.argument_size_in_bytes / 2**20}


def summarize(config, step_times: list[float], peak_flops: float) -> dict[str, Any]:
    """pairs/s, step time spread, model FLOP/s and MFU from measured step times and the measured peak."""
    batch = config.train.batch_size
    flops = model_flops_per_pair(config)
    median = float(np.median(step_times))
    achieved = flops["train"] * batch / median
    return {"batch_size": batch, "pairs_per_sec": batch / median,
            "pairs_per_sec_mean": batch * len(step_times) / float(np.sum(step_times)),
            "step_time_s": spread(step_times), "model_flops_per_pair": flops["train"],
            "model_flops_per_pair_by_part": flops, "model_flops_per_sec": achieved,
            "matmul_peak_flops_per_sec": peak_flops, "mfu": achieved / peak_flops}


def measure(name: str, steps: int, warmup: int, peak_reps: int, cache_dir: str = "",
            batch_size: int = 0, profile_dir: str = "", dtype: str = "") -> dict[str, Any]:
    """Everything this benchmark reports for one config, measured in this process."""
    import jax
    if cache_dir:
        from prodclip import compile_cache
        compile_cache.enable(cache_dir)
    config = CONFIGS[name]()
    if batch_size:
        config.train.batch_size = batch_size
    if dtype:
        config.model.dtype = dtype
    peak = matmul_peak_flops(reps=peak_reps)
    runner = ProdclipStep(config)
    first = runner.run(1)[0]
    runner.run(warmup)
    times = runner.run(steps)
    result = {"config": name, "dtype": config.model.dtype, "num_params": runner.num_params,
              "trace_and_lower_s": runner.lower_s, "compile_s": runner.compile_s, "first_step_s": first,
              "compile_cache_dir": cache_dir or None, "xla_flops_per_step": runner.xla_flops,
              "loss_after": runner.last_loss, **summarize(config, times, peak)}
    result["peak_rss_mb"] = peak_rss_mb()
    if profile_dir:
        result["profile"] = profile_ops(runner, os.path.join(profile_dir, name))
    result["devices"] = str(jax.devices()[0].device_kind)
    return result


def machine() -> dict[str, Any]:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def print_json(report: dict, out: str = "") -> None:
    """Prints `report` as JSON on stdout, and writes it to `out` too when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIG_NAMES), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--peak-reps", type=int, default=10)
    parser.add_argument("--cache-dir", default="", help="JAX persistent compilation cache dir (empty = off)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the configs' batch size (0 = theirs)")
    parser.add_argument("--dtype", default="", help="override model.dtype (float32 | bfloat16)")
    parser.add_argument("--profile", default="", help="also trace 2 steps into this dir and report op time by kind")
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; valid: {', '.join(CONFIGS)}")
    if args.single:
        print(json.dumps(measure(names[0], args.steps, args.warmup, args.peak_reps, args.cache_dir, args.batch_size,
                                 args.profile, args.dtype)))
        return
    runs = []
    for name in names:  # one process per config: its own peak RSS, its own compile
        cmd = [sys.executable, os.path.abspath(__file__), "--single", "--configs", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--peak-reps", str(args.peak_reps), "--cache-dir", args.cache_dir,
               "--batch-size", str(args.batch_size), "--profile", args.profile, "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {runs[-1]['pairs_per_sec']:.1f} pairs/s, MFU {runs[-1]['mfu']:.1%}", file=sys.stderr)
    print_json({"machine": machine(), "runs": runs}, args.out)


if __name__ == "__main__":
    main()
