"""Compiled per-device temp memory of the global-batch loss + gradient: ring vs all-gather.

    python benchmarks/loss_memory.py            # 8 fake CPU devices, B = 4k .. 32k, D = 256

For each global batch B the loss and its gradient w.r.t. both [B, D] f32
embedding arrays (batch-sharded over 8 devices) are compiled, never run, and
XLA's `memory_analysis().temp_size_in_bytes` is read: the scratch memory one
device needs. The all-gather loss holds [B/n, B] logit blocks (O(B^2/n)); the
ring holds one [B/n, B/n] block (O((B/n)^2)), so doubling B quadruples the ring's
block too, but it stays n times smaller.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from prodclip import losses  # noqa: E402


def temp_mib(fn, mesh, batch: int, dim: int) -> float:
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4096,8192,16384,32768")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--loss", default="sigmoid,softmax")
    args = parser.parse_args()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    n = mesh.devices.size
    plain = {"sigmoid": losses.sigmoid_contrastive_loss,
             "softmax": lambda x, y, scale, bias: losses.softmax_contrastive_loss(x, y, scale)}
    print(f"per-device compiled temp memory (MiB) of loss + grad, {n} devices, D={args.dim}, float32\n")
    print("| loss | global B | B/n | [B/n, B/n] f32 block | ring | all-gather | all-gather / ring |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.loss.split(","):
        ring = losses.make_ring_loss(mesh, name)
        for batch in (int(b) for b in args.batches.split(",")):
            block = (batch // n) ** 2 * 4 / 2**20
            r, g = temp_mib(ring, mesh, batch, args.dim), temp_mib(plain[name], mesh, batch, args.dim)
            print(f"| {name} | {batch} | {batch // n} | {block:.0f} | {r:.1f} | {g:.1f} | {g / r:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
