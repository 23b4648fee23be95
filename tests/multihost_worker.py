"""Tiny train set-up shared by tests/test_parallel.py and its multi-process worker.

As a script, one process of a jax.distributed run on 127.0.0.1:

    python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT.npz

It trains NUM_STEPS steps on the global (data=2, fsdp=2) mesh, feeding only its
own rows of each global batch, and process 0 writes the gathered params to OUT.npz.
"""

import os
import pathlib
import socket
import subprocess
import sys
import types

import numpy as np

NUM_STEPS = 3
VOCAB = 64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(script: str, args_of, count: int, timeout: float) -> None:
    """Runs `count` processes of tests/`script` (jax.distributed on 127.0.0.1, 2 CPU devices each).

    args_of(i, port) -> the command-line arguments of process i. Fails with the processes' last
    output when any exits non-zero; kills any still running at the end.
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / script), *map(str, args_of(i, port))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(count)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(log[-3000:] for log in logs)


def tiny_config(**overrides):
    from prodclip import config as config_lib, config_checks, config_loading

    c = config_lib.base_config()
    c.data.image_size = 16
    c.tokenizer.context_length = 8
    c.model.embed_dim = 16
    for tower in (c.model.image, c.model.text):
        tower.width, tower.depth, tower.num_heads = 16, 1, 2
    c.model.image.patch_size = 8
    c.train.batch_size = 32
    c.train.num_steps = 10
    c.optim.warmup_steps = 0
    c.optim.learning_rate = 1e-2
    # Attention key biases have an exactly-zero true gradient; Adam with a tiny eps would
    # turn their float noise (~1e-9) into full-size updates. eps = 1e-3 keeps noise ~1e-8.
    c.optim.eps = 1e-3
    c.optim.clip_norm = 0.0  # no clipping: after one step Adam's mu is exactly (1 - b1) * gradient
    c.parallel.fsdp_min_size = 64  # small enough that the tiny model's kernels are FSDP-sharded
    for key, value in overrides.items():
        config_loading.set_field(c, key, value)
    config_checks.validate(c)
    return c


_MODELS = {}


def tiny_model(config):
    """(graphdef, params, tx, state) with f32 params; models are built once per model config."""
    from prodclip import optim
    from prodclip.models import factory

    key = config.model.to_json()
    if key not in _MODELS:
        _MODELS[key] = factory.create_model(config, types.SimpleNamespace(vocab_size=VOCAB, pad_id=0), seed=0)
    graphdef, params = _MODELS[key]
    tx = optim.make_optimizer(config, params)
    state = optim.init_train_state(config, params)
    return graphdef, params, tx, state


def tiny_batch(config, seed):
    """A global batch of numpy arrays; ids repeat, so there are extra positives."""
    rng = np.random.default_rng(seed)
    b, s, length = config.train.batch_size, config.data.image_size, config.tokenizer.context_length
    token_ids = rng.integers(1, VOCAB, (b, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, b)
    token_ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return {"images": rng.integers(0, 256, (b, s, s, 3)).astype(np.uint8), "token_ids": token_ids,
            "ids": rng.integers(0, b // 2, b).astype(np.int64)}


def main(port: str, num_processes: str, process_id: str, out_path: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    from prodclip import parallel, train

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id), timeout_s=60)
    config = tiny_config(**{"parallel.mesh_shape": (2, 2)})
    graphdef, _, tx, state = tiny_model(config)
    mesh = parallel.make_mesh(config)
    compiled = parallel.compile_train_step(config, mesh, lambda loss, reduce: train.make_train_step(
        config, graphdef, tx, loss, reduce), train.make_pair_loss(config), state)
    state = compiled.place_state(state)
    rows = config.train.batch_size // jax.process_count()
    for step in range(NUM_STEPS):
        global_batch = tiny_batch(config, seed=step)
        local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in global_batch.items()}
        state, _ = compiled.step(state, compiled.place_batch(local))
    params = multihost_utils.process_allgather(compiled.global_state(state)["params"], tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out_path, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(*sys.argv[1:])
