"""One prepared accelerator check: the `accelerator` tests, bf16 train throughput, the quickstart end to end.

    python benchmarks/accelerator_check.py --out accel_report            # on a GPU/TPU machine, <= 8 min
    python benchmarks/accelerator_check.py --dry-run --out /tmp/accel    # every size shrunk: CPU, ~1-2 min

Writes OUT/accelerator_check.json and OUT/accelerator_check.md (and the pieces: the tests'
JUnit XML, the quickstart's workdir). Phases, each in its own process with a timeout taken
from what is left of `--budget-s`, so one hang or crash does not cost the others:

1. tests: `pytest -m accelerator tests/test_accelerator.py` (cuDNN vs XLA attention in bf16,
   bf16 step vs float32, sharded step on all local devices vs one, buffer donation and no
   host transfers in the step), each test's outcome, time and recorded numbers.
2. throughput, for tiny_clip and a ViT-B/16 CLIP (benchmarks/train_throughput.py's configs)
   in bfloat16 compute, one process each, on one device: the largest batch that fits
   (compile at a small batch, read XLA's memory analysis, extrapolate the per-pair scratch
   to 85% of the device's memory, round down; on an out-of-memory error retry at 3/4), then
   pairs/s, step time, MFU against the bf16 matmul peak measured in the same process
   (best of 3 runs of back-to-back [n, n] products) and peak device memory
   (`device.memory_stats()["peak_bytes_in_use"]`; CPU has none).
3. quickstart: `prodclip train --config configs/quickstart.py` end to end with its eval (training
   capped at 60% of the phase's time so the eval always runs; the report says how many of the
   800 steps were trained).

`--dry-run` shrinks every size (micro models, a pretend 512 MiB device, 20 quickstart
steps on 256 products) so the whole script runs on a CPU in a minute or two;
tests/test_accelerator_check.py runs it so the script cannot rot. The dry run's numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for path in (BENCH, REPO):  # this checkout's prodclip and train_throughput, not installed ones
    if path not in sys.path:
        sys.path.insert(0, path)

import train_throughput as tt  # noqa: E402

THROUGHPUT_CONFIGS = ("tiny_clip", "vit_b16")
QUICKSTART_DRY_RUN = (
    "--config.data.num_train=256", "--config.data.num_val=64", "--config.data.num_test=64",
    "--config.data.num_compositional=64", "--config.model.image.depth=1", "--config.model.text.depth=1",
    "--config.model.image.width=32", "--config.model.text.width=32", "--config.model.embed_dim=16",
    "--config.model.image.num_heads=2", "--config.model.text.num_heads=2", "--config.train.batch_size=32",
    "--config.train.num_steps=20", "--config.optim.warmup_steps=2", "--config.train.log_every=10",
    "--config.train.eval_every=0", "--config.eval.batch_size=32", "--config.tokenizer.vocab_size=300")


# ----------------------------------------------------------------------------- sizes


def throughput_plan(name: str, dry_run: bool) -> dict[str, Any]:
    """Config, start batch, batch cap, batch multiple, timed/warm-up steps and matmul size for one config."""
    if dry_run:
        config = tt.micro_config() if name == "tiny_clip" else tt.resized(
            tt.tiny_clip_config(), image_size=32, patch=16, context=8, vocab=64, embed=32,
            image=(64, 2, 2), text=(32, 1, 2), batch=8)
        return {"config": config, "start_batch": 8, "max_batch": 32, "multiple": 8, "steps": 2, "warmup": 1,
                "matmul_n": 256, "memory_limit_bytes": 512 * 2**20}
    config = tt.CONFIGS[name]()
    start = {"tiny_clip": 256, "vit_b16": 64}[name]
    return {"config": config, "start_batch": start, "max_batch": 16384, "multiple": 64, "steps": 20, "warmup": 3,
            "matmul_n": 8192, "memory_limit_bytes": 0}


# ----------------------------------------------------------------------------- measurements (worker side)


def matmul_peak_flops(dtype: str, n: int, reps: int = 10, trials: int = 3) -> float:
    """The best rate of `reps` back-to-back [n, n] @ [n, n] products in `dtype`, in FLOP/s.

    Back to back (one sync at the end) so launch overhead hides behind the previous product,
    as it does inside a train step.
    """
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        outs = [matmul(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n ** 3 / best


def device_memory() -> dict[str, Any]:
    """bytes_limit and peak_bytes_in_use of device 0 (None on backends that keep no statistics, like CPU)."""
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"bytes_limit": stats.get("bytes_limit"), "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def is_out_of_memory(error: Exception) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def step_memory_bytes(runner: tt.ProdclipStep) -> tuple[int, int]:
    """(fixed, batch-dependent) device bytes of a compiled step: arguments, and XLA's scratch + outputs not aliased."""
    m = runner.step.memory_analysis()
    fixed = int(m.argument_size_in_bytes)
    scratch = int(m.temp_size_in_bytes) + max(int(m.output_size_in_bytes) - int(m.alias_size_in_bytes), 0)
    return fixed, scratch


def fitting_batch(fixed: int, scratch: int, start_batch: int, limit: int, multiple: int, cap: int) -> int:
    """The largest multiple of `multiple` (<= cap) whose estimated need fits 85% of `limit` bytes.

    The estimate counts all of the scratch measured at `start_batch` as per-pair (an
    overestimate: part of it is the optimizer update's, which does not grow with the batch).
    """
    per_pair = max(scratch / start_batch, 1.0)
    batch = int((0.85 * limit - fixed) / per_pair) // multiple * multiple
    return max(min(batch, cap), multiple)


def measure_throughput(name: str, dry_run: bool) -> dict[str, Any]:
    """Everything phase 2 reports for one config, measured in this process (see the module doc)."""
    import jax
    plan = throughput_plan(name, dry_run)
    config = plan["config"]
    config.model.dtype = "bfloat16"
    peak = matmul_peak_flops("bfloat16", plan["matmul_n"])
    limit = plan["memory_limit_bytes"] or device_memory()["bytes_limit"] or 0
    tries: list[dict[str, Any]] = []
    config.train.batch_size = plan["start_batch"]
    probe = tt.ProdclipStep(config)
    fixed, scratch = step_memory_bytes(probe)
    del probe
    batch = (fitting_batch(fixed, scratch, plan["start_batch"], limit, plan["multiple"], plan["max_batch"])
             if limit else plan["start_batch"])
    runner = None
    for _ in range(4):
        config.train.batch_size = batch
        try:
            runner = tt.ProdclipStep(config)
            runner.run(1 + plan["warmup"])
            times = runner.run(plan["steps"])
            tries.append({"batch_size": batch, "fits": True})
            break
        except Exception as error:  # an accelerator's out-of-memory error is an XlaRuntimeError
            if not is_out_of_memory(error):
                raise
            tries.append({"batch_size": batch, "fits": False, "error": str(error).splitlines()[0][:200]})
            runner = None
            batch = max(batch * 3 // 4 // plan["multiple"] * plan["multiple"], plan["multiple"])
    if runner is None:
        raise RuntimeError(f"{name}: no batch fitted: {tries}")
    return {"config": name, "dry_run": dry_run, "dtype": config.model.dtype, "num_params": runner.num_params,
            "device": jax.local_devices()[0].device_kind, "backend": jax.default_backend(),
            "memory_limit_bytes": limit or None, "step_bytes_at_start_batch": {"fixed": fixed, "scratch": scratch},
            "batch_tries": tries, "compile_s": runner.compile_s, "trace_and_lower_s": runner.lower_s,
            "xla_flops_per_step": runner.xla_flops, "loss_after": runner.last_loss,
            "bf16_matmul_peak_n": plan["matmul_n"], **tt.summarize(config, times, peak),
            "device_memory": device_memory(), "peak_rss_mb": tt.peak_rss_mb()}


# ----------------------------------------------------------------------------- phases (driver side)


def child_env(dry_run: bool) -> dict[str, str]:
    """The environment of every phase: this checkout first on the path; on CPU (dry run) 8 fake devices.

    tests/conftest.py defaults JAX_PLATFORMS to cpu and adds CPU-only XLA flags unless they are
    set, so a real run sets both explicitly (to the caller's values, empty = JAX's own choice).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, BENCH, os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    else:
        env["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "")
        env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return env


def run_phase(cmd: list[str], timeout_s: float, env: dict[str, str], log_path: str) -> dict[str, Any]:
    """Runs `cmd` with a timeout; stdout+stderr go to log_path. Returns rc, wall time, timed_out, stdout."""
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=max(timeout_s, 1))
        rc, text, timed_out = out.returncode, out.stdout, False
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, timed_out = None, True
    with open(log_path, "w") as f:
        f.write(text)
    return {"rc": rc, "timed_out": timed_out, "wall_s": time.perf_counter() - t, "stdout": text,
            "log": os.path.basename(log_path)}


def parse_junit(path: str) -> list[dict[str, Any]]:
    """One dict per test case of a pytest JUnit XML file: name, outcome, time, message, recorded properties."""
    if not os.path.exists(path):
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if (
                    node.get("message") or node.text) else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"name": case.get("name"), "outcome": outcome, "time_s": float(case.get("time", 0)),
                      "message": message, "properties": props})
    return cases


def tests_phase(out: str, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    junit = os.path.join(out, "accelerator_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "accelerator", "-p", "no:cacheprovider",
           os.path.join("tests", "test_accelerator.py"), f"--junitxml={junit}"]
    run = run_phase(cmd, timeout_s, env, os.path.join(out, "tests.log"))
    cases = parse_junit(junit)
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    ok = run["rc"] == 0 and counts["passed"] > 0
    return {"ok": ok, "rc": run["rc"], "timed_out": run["timed_out"], "wall_s": run["wall_s"], "counts": counts,
            "cases": cases, "log": run["log"]}


def throughput_phase(name: str, out: str, env: dict[str, str], timeout_s: float, dry_run: bool) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name] + (["--dry-run"] if dry_run else [])
    run = run_phase(cmd, timeout_s, env, os.path.join(out, f"throughput_{name}.log"))
    lines = [line for line in run["stdout"].splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if run["rc"] == 0 and lines else {}
    return {"ok": bool(result), "rc": run["rc"], "timed_out": run["timed_out"], "wall_s": run["wall_s"],
            "log": run["log"], **result}


def flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keyed by their '/'-joined path."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def quickstart_phase(out: str, env: dict[str, str], timeout_s: float, dry_run: bool) -> dict[str, Any]:
    workdir = os.path.join(out, "quickstart")
    # Training stops at 60% of the phase's time if the 800 steps are not done by then, so the
    # eval still runs inside the budget; the report gives the steps trained.
    overrides = list(QUICKSTART_DRY_RUN) if dry_run else [f"--config.data.num_workers={min(8, os.cpu_count() or 1)}",
                                                          f"--config.train.max_train_seconds={0.6 * timeout_s:.0f}"]
    overrides += ["--config.train.progress_bar=False", f"--config.train.compilation_cache_dir={out}/jax_cache"]
    cmd = [sys.executable, "-m", "prodclip.cli", "train", "--config", os.path.join("configs", "quickstart.py"),
           "--workdir", workdir, *overrides]
    run = run_phase(cmd, timeout_s, env, os.path.join(out, "quickstart.log"))
    eval_path = os.path.join(workdir, "eval.json")
    results = json.load(open(eval_path)) if os.path.exists(eval_path) else {}
    numbers = flat_numbers(results)
    return {"ok": run["rc"] == 0 and bool(results), "rc": run["rc"], "timed_out": run["timed_out"],
            "wall_s": run["wall_s"], "log": run["log"], "overrides": overrides, "eval": numbers,
            "eval_file": os.path.relpath(eval_path, out) if results else None}


def environment(env: dict[str, str]) -> dict[str, Any]:
    """Device, versions and host, read in a child process with the phases' environment."""
    code = ("import json, jax, jaxlib, flax, optax; d = jax.local_devices(); print(json.dumps({"
            "'backend': jax.default_backend(), 'device_kind': d[0].device_kind, 'local_devices': len(d), "
            "'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__, "
            "'optax': optax.__version__}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                         timeout=120)
    info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.returncode}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return {**info, "host": tt.machine(), "python": platform.python_version()}


# ----------------------------------------------------------------------------- report


def fmt_bytes(n) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    env, tests, quick = report["environment"], report["tests"], report["quickstart"]
    lines = [f"# Accelerator check{' (DRY RUN on CPU: the numbers mean nothing)' if report['dry_run'] else ''}", "",
             "```bash", report["command"], "```", "",
             f"{report['date']}; device **{env.get('device_kind')}** ({env.get('backend')}, "
             f"{env.get('local_devices')} local), nvidia-smi: {env.get('nvidia_smi') or '–'}; jax {env.get('jax')}, "
             f"jaxlib {env.get('jaxlib')}; host {env['host']['cpu']} ({env['host']['cores']} cores); "
             f"total {report['wall_s']:.0f} s. **Overall: {'PASS' if report['ok'] else 'FAIL'}**", "",
             f"## Tests marked `accelerator`: {tests['counts']} in {tests['wall_s']:.0f} s"
             f"{' (TIMED OUT)' if tests['timed_out'] else ''}", "",
             "| test | outcome | time | recorded | message |", "|---|---|---:|---|---|"]
    for c in tests["cases"]:
        props = "; ".join(f"{k}={v}" for k, v in c["properties"].items())
        lines.append(f"| `{c['name']}` | {c['outcome']} | {c['time_s']:.1f} s | {props} | {c['message']} |")
    lines += ["", "## Train throughput, bfloat16 compute, one device", "",
              "| config | batch (largest that fits) | pairs/s | step median (p10–p90) | MFU (bf16 matmul peak) "
              "| peak device memory (limit) | compile |", "|---|---:|---:|---|---:|---|---:|"]
    for name, r in report["throughput"].items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed (rc {r.get('rc')}{', timed out' if r.get('timed_out') else ''}; "
                         f"see {r.get('log')}) | | | | | |")
            continue
        s = r["step_time_s"]
        mem = r["device_memory"]
        lines.append(f"| {name} | {r['batch_size']} (tries: {', '.join(str(t['batch_size']) + ('' if t['fits'] else ' OOM') for t in r['batch_tries'])}) "
                     f"| {r['pairs_per_sec']:.1f} | {s['median'] * 1e3:.1f} ms ({s['p10'] * 1e3:.1f}–{s['p90'] * 1e3:.1f}) "
                     f"| {r['mfu']:.1%} ({r['matmul_peak_flops_per_sec'] / 1e12:.1f} TFLOP/s) "
                     f"| {fmt_bytes(mem['peak_bytes_in_use'])} ({fmt_bytes(mem['bytes_limit'])}) | {r['compile_s']:.1f} s |")
    lines += ["", f"## Quickstart end to end: {'ok' if quick['ok'] else 'FAILED'} in {quick['wall_s']:.0f} s"
              f"{' (TIMED OUT)' if quick['timed_out'] else ''}", "", f"overrides: `{' '.join(quick['overrides'])}`", ""]
    if quick["eval"]:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(quick["eval"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for accelerator_check.json / .md and the phases' logs")
    parser.add_argument("--dry-run", action="store_true", help="shrink every size: runs on CPU in a minute or two")
    parser.add_argument("--budget-s", type=float, default=470, help="wall-clock budget for all phases together")
    parser.add_argument("--worker", choices=THROUGHPUT_CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_throughput(args.worker, args.dry_run)))
        return
    if not args.out:
        parser.error("--out DIR is required")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    left = lambda share: max(share * (args.budget_s - (time.perf_counter() - t0)), 10)
    env = child_env(args.dry_run)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": args.dry_run,
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), REPO), *sys.argv[1:]]),
        "environment": environment(env)}
    # Shares of the time left: the tests first, then each throughput config, the quickstart last.
    report["tests"] = tests_phase(args.out, env, left(0.3))
    report["throughput"] = {}
    for i, name in enumerate(THROUGHPUT_CONFIGS):
        report["throughput"][name] = throughput_phase(name, args.out, env, left(0.3 if i == 0 else 0.45), args.dry_run)
        print(f"throughput {name}: {'ok' if report['throughput'][name]['ok'] else 'FAILED'}", file=sys.stderr)
    report["quickstart"] = quickstart_phase(args.out, env, left(1.0), args.dry_run)
    report["wall_s"] = time.perf_counter() - t0
    report["ok"] = bool(report["tests"]["ok"] and all(r["ok"] for r in report["throughput"].values())
                        and report["quickstart"]["ok"])
    with open(os.path.join(args.out, "accelerator_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
    with open(os.path.join(args.out, "accelerator_check.md"), "w") as f:
        f.write(markdown(report))
    print(f"accelerator check: {'PASS' if report['ok'] else 'FAIL'} in {report['wall_s']:.0f} s; "
          f"report in {args.out}/accelerator_check.md", file=sys.stderr)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
