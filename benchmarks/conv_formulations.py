"""Images/s of an EfficientNet-Lite forward (and forward+backward) pass, per convolution formulation.

    python benchmarks/conv_formulations.py [--variant efficientnet_lite0] [--size 128] [--batch 128]
        [--reps 3] [--torch] [--out conv.json]

Random weights, NHWC float32, jit; 'explicit' is models/convolution.py's CPU formulation (depthwise
as shifted multiply-adds, 1x1 as einsum, the stem as im2col + einsum), 'native' is
lax.conv_general_dilated for every conv (depthwise via feature_group_count). 'train' times
jax.value_and_grad of a scalar of the final feature map, with respect to the backbone's params (what
fine-tuning pays). The first call of each is compilation and is not timed; the median of --reps
timed calls is reported. --torch adds efficientnet_lite_pytorch in eval mode (channels_last,
torch.get_num_threads() threads) for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prodclip.models import efficientnet


def time_call(fn, reps: int) -> float:
    """Median seconds of `reps` calls of fn() after one untimed (compiling) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_rates(variant: str, formulation: str, images: np.ndarray, reps: int) -> dict[str, float]:
    model = efficientnet.EfficientNetLite(variant, nnx.Rngs(0), formulation=formulation)
    graphdef, params = nnx.split(model, nnx.Param)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])

    def loss(p, x):
        pooled, tokens = nnx.merge(graphdef, p)(x)
        return jnp.mean(pooled ** 2) + jnp.mean(tokens)
    train = jax.jit(jax.value_and_grad(loss))
    x = jnp.asarray(images)
    batch = images.shape[0]
    return {"forward": batch / time_call(lambda: forward(params, x), reps),
            "train": batch / time_call(lambda: train(params, x), reps)}


def torch_rate(variant: str, images: np.ndarray, reps: int) -> float:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(variant.replace("_", "-"), image_size=images.shape[1]).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net.extract_features(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            net.extract_features(x)
            times.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="efficientnet_lite0", choices=sorted(efficientnet.VARIANTS))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--formulations", default="explicit,native")
    p.add_argument("--torch", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    result = {"variant": args.variant, "size": args.size, "batch": args.batch, "backend": jax.default_backend(),
              "images_per_s": {}}
    for formulation in args.formulations.split(","):
        rates = jax_rates(args.variant, formulation, images, args.reps)
        result["images_per_s"][formulation] = rates
        print(f"{formulation:>9}: forward {rates['forward']:7.1f} img/s   forward+backward {rates['train']:7.1f} img/s",
              flush=True)
    if args.torch:
        rate = torch_rate(args.variant, images, args.reps)
        result["images_per_s"]["torch"] = {"forward": rate}
        print(f"    torch: forward {rate:7.1f} img/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
