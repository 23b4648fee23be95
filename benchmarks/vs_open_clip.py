"""prodclip vs open_clip: the same CLIP, batch and optimizer, trained side by side on random data.

    pip install --no-deps "open_clip_torch==3.3.0" "ftfy>=6.1,<7" wcwidth   # beside torch==2.13.0 (CPU)
    python benchmarks/vs_open_clip.py                     # tiny CLIP, batch 128, float32, 3 rounds of 20 steps
    python benchmarks/vs_open_clip.py --batch-size 64 --rounds 3 --steps 20 --out vs.json

Two worker processes, one per framework, are started once (each imports only its own
framework, so each reports its own peak RSS). Each is first warmed up, alone, until its step
time is stable: it runs steps until the last `--stable-window` step times lie within
`--stable-tol` of their median (at most `--max-warmup` steps; open_clip's eager PyTorch needs a
few steps for its allocator and thread pool to settle, prodclip its compile). Warm-up steps
are not timed. Then the workers take turns: in each round one runs `--steps` (at least 20)
timed train steps while the other waits on its pipe, then the other does, the order swapping
every round. Reported per framework: the median of all its per-step times (and pairs/s from
it); per round: the ratio of the two frameworks' median step times; overall: the ratio of the
per-framework medians, with the spread (min-max) of the per-round ratios. The CPU model and
the load average before and after the run are printed too, to show whether other work shared
the machine.

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
import platform
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


def worker(framework: str, config_name: str, batch_size: int = 0) -> None:
    """Serves commands on stdin, one JSON reply per line on stdout: run K | peak | info | quit."""
    config = tt.CONFIGS[config_name]()
    if batch_size:
        config.train.batch_size = batch_size
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
    def __init__(self, framework: str, config_name: str, batch_size: int = 0):
        self.framework = framework
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tt.REPO, os.path.dirname(os.path.abspath(__file__))]))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", framework, "--config", config_name,
             "--batch-size", str(batch_size)],
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


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes); above the core count means contention."""
    return [round(x, 2) for x in os.getloadavg()]


def is_stable(times: list[float], window: int, tol: float) -> bool:
    """True when the last `window` step times all lie within `tol` (relative) of their median."""
    if len(times) < window:
        return False
    last = np.asarray(times[-window:])
    median = float(np.median(last))
    return bool(np.all(np.abs(last - median) <= tol * median))


def warm_up(worker: "Worker", window: int, tol: float, max_steps: int) -> dict:
    """Runs untimed steps one at a time until the step time is stable (see `is_stable`) or `max_steps`."""
    times: list[float] = []
    while len(times) < max_steps and not is_stable(times, window, tol):
        times.extend(worker.ask("run 1")["times"])
    return {"steps": len(times), "times": times, "stable": is_stable(times, window, tol)}


def compare(config_name: str, rounds: int, steps: int, window: int = 3, tol: float = 0.1, max_warmup: int = 15,
            batch_size: int = 0) -> dict:
    """Warms both frameworks up, then alternates `rounds` rounds of `steps` timed steps each; see the module doc."""
    config = tt.CONFIGS[config_name]()
    batch = batch_size or config.train.batch_size
    load_before = load_average()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average before: {load_before}", file=sys.stderr)
    workers, warmups = {}, {}
    for name in ("open_clip", "prodclip"):  # set up one at a time: compiles and inits are not overlapped
        workers[name] = Worker(name, config_name, batch)
        warmups[name] = warm_up(workers[name], window, tol, max_warmup)
        print(f"{name}: warmed up in {warmups[name]['steps']} steps "
              f"({'stable' if warmups[name]['stable'] else 'NOT stable'}: last "
              f"{', '.join(f'{t:.2f}' for t in warmups[name]['times'][-window:])} s)", file=sys.stderr, flush=True)
    times = {name: [] for name in workers}
    peaks, torch_peaks, per_round = [], [], []
    for r in range(rounds):
        order = ("open_clip", "prodclip") if r % 2 == 0 else ("prodclip", "open_clip")
        row = {}
        for name in order:
            t = workers[name].ask(f"run {steps}")["times"]
            times[name].extend(t)
            row[f"{name}_median_step_s"] = float(np.median(t))
        peaks.append(workers["prodclip"].ask("peak")["peak"])
        torch_peaks.append(workers["open_clip"].ask("peak")["peak"])
        # prodclip's speed relative to open_clip's: > 1 means prodclip is faster.
        row["ratio"] = row["open_clip_median_step_s"] / row["prodclip_median_step_s"]
        per_round.append(row)
        print(f"round {r + 1}: median step open_clip {row['open_clip_median_step_s']:.3f} s, prodclip "
              f"{row['prodclip_median_step_s']:.3f} s, prodclip speed / open_clip speed {row['ratio']:.2f}x, "
              f"JAX matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", file=sys.stderr, flush=True)
    info = {name: w.ask("info") for name, w in workers.items()}
    for w in workers.values():
        w.close()
    load_after = load_average()
    print(f"load average after: {load_after}", file=sys.stderr)
    config.train.batch_size = batch
    peak = max(peaks)
    ratios = [row["ratio"] for row in per_round]
    medians = {name: float(np.median(times[name])) for name in workers}
    result = {"config": config_name, "batch_size": batch, "rounds": rounds, "steps_per_round": steps,
              "warmup": {name: {k: v for k, v in w.items()} for name, w in warmups.items()},
              "median_step_s": medians,
              "ratio_of_medians": medians["open_clip"] / medians["prodclip"],
              "ratio_per_round_min": min(ratios), "ratio_per_round_max": max(ratios),
              "jax_matmul_peak_flops_per_sec": peak, "jax_matmul_peak_per_round": peaks,
              "torch_matmul_peak_flops_per_sec": max(torch_peaks), "per_round": per_round,
              "cpu_model": cpu_model(), "load_average_before": load_before, "load_average_after": load_after,
              "machine": tt.machine()}
    for name in workers:
        result[name] = {**tt.summarize(config, times[name], peak), **info[name],
                        "setup_s": workers[name].ready["setup_s"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny_clip", choices=sorted(tt.CONFIGS))
    parser.add_argument("--batch-size", type=int, default=0, help="override the config's batch size (0 = its own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per framework per round (>= 20)")
    parser.add_argument("--stable-window", type=int, default=3, help="warm-up ends when this many step times ...")
    parser.add_argument("--stable-tol", type=float, default=0.1, help="... lie within this fraction of their median")
    parser.add_argument("--max-warmup", type=int, default=15, help="untimed warm-up steps at most")
    parser.add_argument("--out", default="")
    parser.add_argument("--allow-few-steps", action="store_true", help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--worker", choices=("prodclip", "open_clip"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.batch_size)
        return
    if args.steps < 20 and not args.allow_few_steps:
        parser.error(f"--steps {args.steps}: time at least 20 steps per round, or a round's median is noise")
    result = compare(args.config, args.rounds, args.steps, args.stable_window, args.stable_tol, args.max_warmup,
                     args.batch_size)
    p, o = result["prodclip"], result["open_clip"]
    print(f"{args.config}, batch {result['batch_size']}: median step prodclip {result['median_step_s']['prodclip']:.3f} s "
          f"({p['pairs_per_sec']:.1f} pairs/s, MFU {p['mfu']:.1%}, peak RSS {p['peak_rss_mb']:.0f} MiB), open_clip "
          f"{result['median_step_s']['open_clip']:.3f} s ({o['pairs_per_sec']:.1f} pairs/s, MFU {o['mfu']:.1%}, "
          f"peak RSS {o['peak_rss_mb']:.0f} MiB); prodclip / open_clip speed {result['ratio_of_medians']:.2f}x "
          f"(ratio of median step times; per round {result['ratio_per_round_min']:.2f}-"
          f"{result['ratio_per_round_max']:.2f}x)", file=sys.stderr)
    tt.print_json(result, args.out)


if __name__ == "__main__":
    main()
