"""Forward + backward time of the ViT conv stem and the ResNet tower: native XLA convolutions vs the explicit ones.

    python benchmarks/conv_towers.py --reps 10 --out conv_towers.json

Shapes are the ones they train at: the quickstart's conv stem (64 px, patch 16, width 128,
batch 256) and the ResNet baseline tower (configs/ablations/architectures.py resnet_transformer:
ResNet-18 at width 0.5, 8 GroupNorm groups, 48 px, batch 256). Each is timed as
jit(value_and_grad(sum(tower(x) * r))) with respect to its parameters and input, once with
every nnx.Conv calling `lax.conv_general_dilated` (native) and once through
`models/convolution.conv2d`'s explicit formulation (what 'auto' picks on CPU); the median of
`--reps` runs after one warm-up is reported, with the largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO:
    sys.path.insert(0, REPO)


def with_convolutions(module, conv_fn):
    """A copy of `module` whose every nnx.Conv computes with `conv_fn` (same parameters)."""
    from flax import nnx
    clone = copy.deepcopy(module)
    for _, sub in nnx.iter_graph(clone):
        if isinstance(sub, nnx.Conv):
            sub.conv_general_dilated = conv_fn
    return clone


def time_fwd_bwd(module, x, reps: int, output=lambda y: y) -> tuple[float, np.ndarray]:
    """Median seconds of one jitted forward + backward, and the forward output."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, params = nnx.split(module)

    def loss(params, x):
        y = output(nnx.merge(graphdef, params)(x))
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    jax.block_until_ready(step(params, x))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        (_, y), grads = step(params, x)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), np.asarray(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import jax
    from flax import nnx
    from jax import lax

    from prodclip.models import convolution, resnet, vit

    rng = np.random.default_rng(0)
    towers = {
        "vit_conv_stem (quickstart)": (vit.ConvStem(16, 128, nnx.Rngs(0), depth=2),
                                       rng.normal(size=(args.batch, 64, 64, 3)).astype(np.float32), lambda y: y),
        "resnet18_w0.5 tower (baseline)": (
            resnet.ResNet(depth=18, width_mult=0.5, embed_dim=256, norm_groups=8, rngs=nnx.Rngs(0)),
            rng.integers(0, 256, (args.batch, 48, 48, 3)).astype(np.float32), lambda out: out[0]),
    }
    results = {}
    for name, (module, x, output) in towers.items():
        native_s, native_y = time_fwd_bwd(with_convolutions(module, lax.conv_general_dilated), x, args.reps, output)
        explicit = with_convolutions(module, lambda *a, **k: convolution.lax_conv_general_dilated(*a, **k))
        explicit_s, explicit_y = time_fwd_bwd(explicit, x, args.reps, output)
        results[name] = {"native_s": native_s, "explicit_s": explicit_s, "speedup": native_s / explicit_s,
                         "max_abs_output_difference": float(np.max(np.abs(native_y - explicit_y))),
                         "batch": args.batch, "backend": jax.default_backend()}
        print(f"{name}: native {native_s * 1e3:.0f} ms, explicit {explicit_s * 1e3:.0f} ms "
              f"({native_s / explicit_s:.2f}x), max |diff| {results[name]['max_abs_output_difference']:.1e}",
              file=sys.stderr, flush=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
