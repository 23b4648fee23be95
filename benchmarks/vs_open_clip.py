"""prodclip vs open_clip: the same CLIP, batch and optimizer, trained side by side on random data.

    pip install --no-deps open_clip_torch==3.3.0 ftfy wcwidth     # beside torch==2.13.0 (CPU)
    python benchmarks/vs_open_clip.py           # tiny CLIP, batch 128, float32
    python benchmarks/vs_open_clip.py --rounds 4 --steps 5 --out vs.json

Two worker processes, one per framework, are started once (each imports only its own
framework, so each reports its own peak RSS) and then take turns: in each round one runs
`--steps` timed train steps while the other waits on its pipe, then the other does, the
order swapping every round. The ratio of the two pairs/s is printed per round, so a
machine that gets busier or quieter during the run moves both sides of each ratio.

The model is `train_throughput.tiny_clip_config()`, built in open_clip as `open_clip.CLIP`
with the same shapes (class token, learned positions, ln_pre, no patch bias, exact GELU,
causal text pooled at the largest id, no projection biases). Both take AdamW
(b1 0.9, b2 0.98, eps 1e-6, weight decay 0.1 on weight matrices, warmup + cosine lr),
clip the gradient norm at 1.0 and use the plain CLIP softmax loss, in float32. open_clip runs
eagerly, as its trainer does by default (no `--torchcompile`).

open_clip imports torchvision at import time for its image transforms and FrozenBatchNorm2d.
torchvision's PyPI wheel for torch 2.13.0 does not load beside the CPU torch
(`operator torchvision::nms does not exist`), so nothing is installed for it: the open_clip
worker puts a stub `torchvision` into `sys.modules` (see `install_torchvision_stub`) whose
names raise if ever called. The CLIP model and loss use no torchvision code, so nothing
measured changes.

The prodclip worker also measures JAX's float32 matmul peak each round; MFU is the median
step's model FLOP/s over the best peak of the run.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import math
import os
import subprocess
import sys
import time
import types

import numpy as np

import train_throughput as tt

# ----------------------------------------------------------------------------- open_clip side


def install_torchvision_stub() -> None:
    """A `torchvision` stand-in for open_clip's import-time names; any use raises RuntimeError."""

    class StubMeta(type):
        def __getattr__(cls, name):  # InterpolationMode.BICUBIC in default arguments
            if name.startswith("__"):
                raise AttributeError(name)
            return f"{cls.__name__}.{name}"

    def stub_class(name):
        def init(self, *args, **kwargs):
            raise RuntimeError(f"torchvision.{name} is a benchmark stub: torchvision is not installed")
        return StubMeta(name, (), {"__init__": init})

    def stub_module(name):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__getattr__ = lambda attr: stub_class(f"{name}.{attr}") if not attr.startswith("__") else None
        module.__path__ = []
        return module

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.ops", "torchvision.ops.misc"):
        sys.modules[name] = stub_module(name)


def warmup_cosine(step: int, peak: float, warmup: int, total: int, end: float) -> float:
    """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, end) at `step`."""
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


class OpenClipStep:
    """open_clip's CLIP + ClipLoss + torch AdamW on one config and a fixed random batch."""

    def __init__(self, config, seed: int = 0):
        install_torchvision_stub()
        import open_clip
        import torch
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        torch.manual_seed(seed)
        m = config.model
        assert m.image.pooling == "cls" and m.image.posemb == "learn" and m.image.pre_norm
        assert m.text.eot_rule == "argmax" and m.text.mask == "causal" and not config.loss.extra_positives
        vision = CLIPVisionCfg(layers=m.image.depth, width=m.image.width, head_width=m.image.width // m.image.num_heads,
                               mlp_ratio=m.image.mlp_ratio, patch_size=m.image.patch_size,
                               image_size=config.data.image_size)
        text = CLIPTextCfg(context_length=config.tokenizer.context_length, vocab_size=m.text.vocab_size,
                           width=m.text.width, heads=m.text.num_heads, layers=m.text.depth, mlp_ratio=m.text.mlp_ratio)
        self.model = open_clip.CLIP(embed_dim=m.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=False)
        self.model.train()
        self.loss_fn = open_clip.ClipLoss()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        o = config.optim
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
        self.schedule = lambda step: warmup_cosine(step, o.learning_rate, o.warmup_steps, config.train.num_steps,
                                                   o.learning_rate * o.end_learning_rate_ratio)
        self.clip_norm = o.clip_norm
        batch = tt.random_batch(config, seed)
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
        std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255
        self.uint8_images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
        self.normalize = lambda images: (images.float() - mean) / std
        self.token_ids = torch.from_numpy(batch["token_ids"]).long()
        self.step_count = 0
        self.torch = torch

    def run(self, steps: int) -> list[float]:
        torch = self.torch
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule(self.step_count)
            self.optimizer.zero_grad(set_to_none=True)
            image_features, text_features, logit_scale = self.model(
                self.normalize(self.uint8_images), self.token_ids)
            loss = self.loss_fn(image_features, text_features, logit_scale)
            loss.backward()
            if self.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            self.optimizer.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))
            times.append(time.perf_counter() - t)
            self.step_count += 1
            self.last_loss = float(loss.detach())
        return times


def torch_matmul_peak(n: int = 2048, reps: int = 10) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- workers


def worker(framework: str, config_name: str) -> None:
    """Serves commands on stdin, one JSON reply per line on stdout: run K | peak | info | quit."""
    config = tt.CONFIGS[config_name]()
    t = time.perf_counter()
    if framework == "prodclip":
        runner = tt.ProdclipStep(config)
        peak = tt.matmul_peak_flops
    else:
        runner = OpenClipStep(config)
        peak = torch_matmul_peak
    setup_s = time.perf_counter() - t
    reply = lambda obj: print(json.dumps(obj), flush=True)
    reply({"ready": True, "setup_s": setup_s})
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "run":
            reply({"times": runner.run(int(arg[0])), "loss": runner.last_loss})
        elif cmd == "peak":
            reply({"peak": peak()})
        elif cmd == "info":
            reply({"peak_rss_mb": tt.peak_rss_mb(), "num_params": runner.num_params})
        elif cmd == "quit":
            return


class Worker:
    def __init__(self, framework: str, config_name: str):
        self.framework = framework
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tt.REPO, os.path.dirname(os.path.abspath(__file__))]))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", framework, "--config", config_name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tt.REPO)
        self.ready = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.framework} worker exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def compare(config_name: str, rounds: int, steps: int, warmup: int) -> dict:
    config = tt.CONFIGS[config_name]()
    batch = config.train.batch_size
    workers = {}
    for name in ("open_clip", "prodclip"):  # set up one at a time: compiles and inits are not overlapped
        workers[name] = Worker(name, config_name)
        workers[name].ask(f"run {warmup}")
    times = {name: [] for name in workers}
    peaks, torch_peaks, per_round = [], [], []
    for r in range(rounds):
        order = ("open_clip", "prodclip") if r % 2 == 0 else ("prodclip", "open_clip")
        row = {}
        for name in order:
            t = workers[name].ask(f"run {steps}")["times"]
            times[name].extend(t)
            row[name] = batch / float(np.median(t))
        peaks.append(workers["prodclip"].ask("peak")["peak"])
        torch_peaks.append(workers["open_clip"].ask("peak")["peak"])
        row["ratio"] = row["prodclip"] / row["open_clip"]
        per_round.append(row)
        print(f"round {r + 1}: open_clip {row['open_clip']:.1f} pairs/s, prodclip {row['prodclip']:.1f} pairs/s, "
              f"ratio {row['ratio']:.2f}x, JAX matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", file=sys.stderr, flush=True)
    info = {name: w.ask("info") for name, w in workers.items()}
    for w in workers.values():
        w.close()
    peak = max(peaks)
    result = {"config": config_name, "batch_size": batch, "rounds": rounds, "steps_per_round": steps,
              "jax_matmul_peak_flops_per_sec": peak, "jax_matmul_peak_per_round": peaks,
              "torch_matmul_peak_flops_per_sec": max(torch_peaks), "per_round": per_round,
              "ratio_median": float(np.median([row["ratio"] for row in per_round])), "machine": tt.machine()}
    for name in workers:
        result[name] = {**tt.summarize(config, times[name], peak), **info[name],
                        "setup_s": workers[name].ready["setup_s"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny_clip", choices=sorted(tt.CONFIGS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="")
    parser.add_argument("--worker", choices=("prodclip", "open_clip"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.config)
        return
    result = compare(args.config, args.rounds, args.steps, args.warmup)
    p, o = result["prodclip"], result["open_clip"]
    print(f"{args.config}, batch {result['batch_size']}: prodclip {p['pairs_per_sec']:.1f} pairs/s "
          f"(MFU {p['mfu']:.1%}, peak RSS {p['peak_rss_mb']:.0f} MiB), open_clip {o['pairs_per_sec']:.1f} pairs/s "
          f"(MFU {o['mfu']:.1%}, peak RSS {o['peak_rss_mb']:.0f} MiB); ratio {result['ratio_median']:.2f}x "
          f"(median of rounds)", file=sys.stderr)
    tt.print_json(result, args.out)


if __name__ == "__main__":
    main()
