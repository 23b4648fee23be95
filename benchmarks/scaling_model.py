"""Scaling on paper: ViT-B/16 CLIP at a global batch of 32k over 8, 64 and 256 chips.

    python benchmarks/scaling_model.py                          # H100-class defaults, markdown tables
    python benchmarks/scaling_model.py --peak-tflops 459 --mfu 0.5 --link-gbs 100 --node-chips 4   # TPU v5p-like

Nothing here is measured: pairs/s per chip is MFU x peak / (analytic train FLOPs per pair,
`train_throughput.model_flops_per_pair`), and communication volumes are the standard ring
collective volumes per chip per step:

* data parallel: all-reduce of the f32 gradient, 2 (n-1)/n P x 4 bytes;
* FSDP (ZeRO-3): all-gather of the parameters for the forward and again for the backward,
  reduce-scatter of the f32 gradient: (n-1)/n P x (2 g + 4) bytes, g = 4 as prodclip keeps
  f32 parameters and XLA gathers them before the bf16 cast (`--gather-bytes 2` if cast first);
* all-gather loss: gather both [B, D] f32 embedding arrays, and reduce-scatter their
  gradients back: 4 (n-1)/n B D x 4 bytes; one [B/n, B] f32 logit block per chip;
* ring loss (prodclip.losses): each text chunk makes n-1 hops forward, and again with its
  gradient on the backward ring: 3 (n-1)/n B D x 4 bytes; one [B/n, B/n] block per chip.

Time on the wire uses one bandwidth per chip inside a node (`--nvlink-gbs`) and another
across nodes (`--link-gbs`), whichever the slowest hop of the ring needs.
"""

from __future__ import annotations

import argparse

import train_throughput as tt


def param_count(config) -> int:
    import jax
    from flax import nnx

    from prodclip.models import two_tower
    model = nnx.eval_shape(lambda: two_tower.build_model(config, vocab_size=config.model.text.vocab_size, pad_id=0,
                                                         rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(params)))


def collectives(n: int, params: int, batch: int, dim: int, gather_bytes: int = 4) -> dict[str, float]:
    """Bytes each chip sends (= receives) per step, by scheme."""
    share = (n - 1) / n
    return {"dp_grads": 2 * share * params * 4, "fsdp": share * params * (2 * gather_bytes + 4),
            "loss_all_gather": 4 * share * batch * dim * 4, "loss_ring": 3 * share * batch * dim * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--chips", default="8,64,256")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per chip (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation")
    parser.add_argument("--node-chips", type=int, default=8, help="chips per node (fast links inside)")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="per-chip bandwidth inside a node, GB/s")
    parser.add_argument("--gather-bytes", type=int, default=4, help="bytes per parameter in FSDP all-gathers")
    parser.add_argument("--link-gbs", type=float, default=50.0, help="per-chip bandwidth across nodes, GB/s")
    args = parser.parse_args()

    config = tt.vit_b16_config()
    config.train.batch_size = args.batch
    flops = tt.model_flops_per_pair(config)
    params = param_count(config)
    dim = config.model.embed_dim
    per_chip = args.mfu * args.peak_tflops * 1e12 / flops["train"]
    print(f"ViT-B/16 CLIP: {params / 1e6:.1f}M parameters, {flops['train'] / 1e9:.1f} GFLOP per pair per train step "
          f"(forward: image {flops['image_forward'] / 1e9:.1f}, text {flops['text_forward'] / 1e9:.2f}, "
          f"logits {flops['logits_forward'] / 1e9:.3f}); global batch {args.batch}, D={dim}")
    print(f"assumed: {args.peak_tflops:.0f} TFLOP/s bf16 peak per chip at {args.mfu:.0%} MFU -> "
          f"{per_chip:.0f} pairs/s per chip; {args.node_chips} chips per node, "
          f"{args.nvlink_gbs:.0f} GB/s inside, {args.link_gbs:.0f} GB/s across nodes\n")
    print("| chips | pairs/chip/step | compute s/step | DP grads GB | FSDP GB | loss all-gather GB | loss ring GB "
          "| all-gather logits MiB/chip | ring logits MiB/chip | DP comm s | FSDP comm s | global pairs/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(c) for c in args.chips.split(",")):
        local = args.batch // n
        compute = local / per_chip
        c = collectives(n, params, args.batch, dim, args.gather_bytes)
        bandwidth = (args.nvlink_gbs if n <= args.node_chips else args.link_gbs) * 1e9
        dp_s = (c["dp_grads"] + c["loss_all_gather"]) / bandwidth
        fsdp_s = (c["fsdp"] + c["loss_all_gather"]) / bandwidth
        step = max(compute, dp_s)  # gradient all-reduce overlapped with the backward pass at best
        print(f"| {n} | {local} | {compute:.3f} | {c['dp_grads'] / 1e9:.2f} | {c['fsdp'] / 1e9:.2f} "
              f"| {c['loss_all_gather'] / 1e9:.3f} | {c['loss_ring'] / 1e9:.3f} | {local * args.batch * 4 / 2**20:.0f} "
              f"| {local * local * 4 / 2**20:.2f} | {dp_s:.3f} | {fsdp_s:.3f} | {args.batch / step:.0f} |")


if __name__ == "__main__":
    main()
