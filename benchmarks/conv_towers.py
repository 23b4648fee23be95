"""Forward + backward time of the ViT conv stem and the ResNet tower: native XLA convolutions vs the explicit ones.

    python benchmarks/conv_towers.py --reps 10 --out conv_towers.json

Shapes are the ones they train at: the quickstart's conv stem (64 px, patch 16, width 128,
batch 256) and the ResNet baseline tower (configs/ablations/architectures.py resnet_transformer:
ResNet-18 at width 0.5, 8 GroupNorm groups, 48 px, batch 256). Each is timed as
jit(value_and_grad(sum(tower(x) * r))) with respect to its parameters and input, once with
every nnx.Conv calling `lax.conv_general_dilated` (native) and once through
`models/convolution.conv2d`'s explicit formulation (what 'auto' picks on CPU). After compiling
both, `--reps` runs of each alternate (so that other load on the machine hits both alike); the
median and best run of each are reported, with the largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO:
    sys.path.insert(0, REPO)


def fwd_bwd(module, output=lambda y: y):
    """jit(value_and_grad) of sum(output(module(x)) * fixed weights) w.r.t. (params, x); returns (fn, params)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, params = nnx.split(module)

    def loss(params, x):
        y = output(nnx.merge(graphdef, params)(x))
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), params


def time_alternating(fns: dict, x, reps: int) -> tuple[dict, dict]:
    """Per-run seconds of each (fn, params) in `fns`, the runs alternating so that load hits both alike; outputs."""
    import jax
    outputs = {name: np.asarray(fn(params, x)[0][1]) for name, (fn, params) in fns.items()}  # compiles
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, (fn, params) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times[name].append(time.perf_counter() - t)
    return times, outputs


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
        fns = {"native": fwd_bwd(convolution.with_convolutions(module, lax.conv_general_dilated), output),
               "explicit": fwd_bwd(convolution.with_convolutions(module, convolution.lax_conv_general_dilated), output)}
        times, outputs = time_alternating(fns, x, args.reps)
        med = {k: float(np.median(v)) for k, v in times.items()}
        best = {k: float(np.min(v)) for k, v in times.items()}
        results[name] = {"median_s": med, "min_s": best, "speedup_of_medians": med["native"] / med["explicit"],
                         "max_abs_output_difference": float(np.max(np.abs(outputs["native"] - outputs["explicit"]))),
                         "batch": args.batch, "reps": args.reps, "backend": jax.default_backend()}
        print(f"{name}: native {med['native'] * 1e3:.0f} ms (min {best['native'] * 1e3:.0f}), explicit "
              f"{med['explicit'] * 1e3:.0f} ms (min {best['explicit'] * 1e3:.0f}): "
              f"{med['native'] / med['explicit']:.2f}x; max |diff| {results[name]['max_abs_output_difference']:.1e}",
              file=sys.stderr, flush=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
