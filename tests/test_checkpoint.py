"""Checkpointing and fault tolerance: exact resume after SIGKILL, SIGTERM, damaged checkpoints,
device-count changes, NaN stops, refused workdirs, export.

The runs are tiny (16 pairs per step, 1-block towers) and share a persistent JAX compilation
cache, so that each run after the first costs a few seconds.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prodclip import checkpoint, cli, faults, train
from prodclip.config import base_config
from prodclip.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")
N = 4  # checkpoint interval; the reference run has 2N steps

TINY = [
    "--config.data.num_train=256", "--config.data.num_val=64", "--config.data.num_test=64",
    "--config.data.num_compositional=64", "--config.model.image.depth=1", "--config.model.text.depth=1",
    "--config.model.image.width=32", "--config.model.text.width=32", "--config.model.embed_dim=16",
    "--config.model.image.num_heads=2", "--config.model.text.num_heads=2", "--config.train.batch_size=16",
    "--config.optim.warmup_steps=2", "--config.train.log_every=2", "--config.train.eval_every=0",
    "--config.train.progress_bar=False", "--config.tokenizer.vocab_size=300", "--config.data.eval_splits=()",
    f"--config.checkpoint.every_steps={N}",
]

# Runs the real CLI; after saving step HANG_AFTER it waits for the write to commit, says so, and
# hangs until the test kills it. Batches are recorded the same way as in the in-process runs.
CHILD = """
import sys, time
from prodclip import checkpoint, cli
hang_after = int(sys.argv[1])
save = checkpoint.Checkpointer.save
def save_then_hang(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == hang_after:
        self.wait()
        print(f"SAVED {step}", flush=True)
        time.sleep(600)
checkpoint.Checkpointer.save = save_then_hang
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    """Environment for CLI subprocesses, and the in-process JAX config, sharing one compile cache."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture
def batch_log(monkeypatch):
    """Records the product ids of every train batch the in-process runs consume, in order."""
    seen: list[list[int]] = []
    make = pipeline.train_dataset

    def recording(*args, **kwargs):
        def record(batch):
            seen.append(batch["ids"].tolist())
            return batch
        return make(*args, **kwargs).map(record)
    monkeypatch.setattr(pipeline, "train_dataset", recording)
    return seen


def train_args(workdir, num_steps, *extra):
    return ["train", "--config", QUICKSTART, "--workdir", str(workdir), *TINY,
            f"--config.train.num_steps={num_steps}", *extra]


def workdir_with_tokenizer(tmp_path, ref_dir) -> pathlib.Path:
    """A fresh workdir holding the reference run's tokenizer.

    Tokenizer training (HF tokenizers) orders tied subword tokens differently from one process
    to the next, so runs compared bitwise share one tokenizer; a resumed run always reloads its own.
    """
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir / "tokenizer", workdir / "tokenizer")
    return workdir


def saved_state(workdir, step) -> dict:
    """The raw saved state of `step` as numpy arrays, read with orbax directly (no prodclip code)."""
    tree = ocp.PyTreeCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, tree)


def assert_bitwise_equal(a: dict, b: dict):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), jax.tree_util.keystr(path)


def train_metrics(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k not in ("time", "train/pairs_per_sec")} for l in lines]


@pytest.fixture(scope="module")
def reference_run(child_env, tmp_path_factory):
    """An uninterrupted 2N-step run: (workdir, ids of each batch in order)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    mp = pytest.MonkeyPatch()
    seen: list = []
    make = pipeline.train_dataset
    mp.setattr(pipeline, "train_dataset",
               lambda *a, **k: make(*a, **k).map(lambda b: (seen.append(b["ids"].tolist()), b)[1]))
    try:
        assert cli.main(train_args(workdir, 2 * N)) == 0
    finally:
        mp.undo()
    assert checkpoint.checkpoint_steps(workdir) == [N, 2 * N]
    return workdir, seen


def test_exact_resume_after_sigkill(reference_run, child_env, tmp_path, batch_log):
    ref_dir, ref_batches = reference_run
    workdir = workdir_with_tokenizer(tmp_path, ref_dir)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(N), *train_args(workdir, 2 * N)],
                             env=child_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = iter(child.stdout.readline, "")
        assert next((l for l in lines if l.strip()), "").strip() == f"SAVED {N}"
    finally:
        child.kill()  # SIGKILL: no handler, no clean-up
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert checkpoint.checkpoint_steps(workdir) == [N]

    assert cli.main(train_args(workdir, 2 * N)) == 0
    assert batch_log == ref_batches[N:]  # the resumed run reads batches N+1..2N of the reference
    assert_bitwise_equal(saved_state(workdir, 2 * N), saved_state(ref_dir, 2 * N))
    assert train_metrics(workdir) == train_metrics(ref_dir)
    data_state = "checkpoints/{}/data/process_0-of-1.json".format(2 * N)
    assert (workdir / data_state).read_text() == (ref_dir / data_state).read_text()


def test_sigterm_saves_current_step_and_resumes(child_env, tmp_path, caplog):
    workdir = tmp_path / "run"
    args = train_args(workdir, 100_000, "--config.checkpoint.every_steps=0")
    child = subprocess.Popen([sys.executable, "-c", CHILD, "-1", *args], env=child_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().strip()) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == faults.EXIT_PREEMPTED, err
    steps = checkpoint.checkpoint_steps(workdir)
    assert len(steps) == 1 and steps[0] >= 2, steps  # only the step it was on when the signal came
    stopped_at = steps[0]
    assert f"after saving step {stopped_at}" in err

    caplog.set_level("INFO", logger="prodclip")
    resumed = train_args(workdir, stopped_at + 3, "--config.checkpoint.every_steps=0")
    assert cli.main(resumed) == 0
    assert f"resumed from the checkpoint of step {stopped_at}" in caplog.text
    assert checkpoint.checkpoint_steps(workdir)[-1] == stopped_at + 3
    logged = [l["step"] for l in train_metrics(workdir) if "train/loss" in l]
    assert logged == sorted(set(logged)) and logged[-1] == stopped_at + 3


def _delete_state_data(step_dir: pathlib.Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.unlink()


def _flip_state_bytes(step_dir: pathlib.Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f) and f.stat().st_size > 64:
            data = bytearray(f.read_bytes())
            for i in range(len(data) // 2, len(data) // 2 + 16):
                data[i] ^= 0x5A
            f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_delete_state_data, _flip_state_bytes], ids=["deleted", "flipped"])
def test_damaged_latest_checkpoint_falls_back_to_previous(reference_run, tmp_path, caplog, damage):
    ref_dir, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    damage(workdir / "checkpoints" / str(2 * N))

    caplog.set_level("INFO", logger="prodclip")
    assert cli.main(train_args(workdir, 2 * N)) == 0
    assert f"checkpoint at step {2 * N} is damaged" in caplog.text
    assert f"resumed from the checkpoint of step {N}" in caplog.text
    assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir()) == [f"step_{2 * N}"]
    assert (workdir / "damaged_checkpoints" / f"step_{2 * N}" / "state").is_dir()  # one copy, not nested
    # Retrained from N, step 2N is again exactly the reference's.
    assert_bitwise_equal(saved_state(workdir, 2 * N), saved_state(ref_dir, 2 * N))


def test_all_checkpoints_damaged_is_an_error(tmp_path):
    config = base_config()
    config.checkpoint.async_save = False
    state = {"step": jnp.int32(1), "params": {"w": jnp.arange(64.0)}}
    with checkpoint.Checkpointer(tmp_path, config) as ckpt:
        ckpt.save(1, state, None)
    _flip_state_bytes(tmp_path / "checkpoints" / "1")
    with pytest.raises(checkpoint.NoValidCheckpoint, match="step 1.*--allow-fresh-start"):
        checkpoint.Checkpointer(tmp_path, config).restore(state)
    assert checkpoint.checkpoint_steps(tmp_path) == [1]  # refused: nothing moved
    assert not (tmp_path / "damaged_checkpoints").exists()
    assert checkpoint.Checkpointer(tmp_path, config).restore(state, allow_fresh_start=True) is None
    assert checkpoint.checkpoint_steps(tmp_path) == []
    assert checkpoint.damaged_steps(tmp_path) == ["step_1"]
    # The workdir now has no checkpoint: a plain rerun must still refuse to start over.
    with pytest.raises(checkpoint.NoValidCheckpoint, match="step_1.*--allow-fresh-start"):
        checkpoint.check_workdir(tmp_path, config)
    checkpoint.check_workdir(tmp_path, config, allow_fresh_start=True)


def _sharded(tree, mesh):
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    return jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec if x.ndim else
                                                                               jax.sharding.PartitionSpec())), tree)


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, save_devices, restore_devices):
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    host = {"step": np.int32(7), "params": {"kernel": rng.normal(size=(16, 24)).astype(np.float32),
                                            "bias": rng.normal(size=(8,)).astype(np.float32)},
            "opt_state": {"mu": rng.normal(size=(16, 24)).astype(np.float32)}}
    save_mesh = jax.sharding.Mesh(np.array(jax.devices()[:save_devices]), ("data",))
    restore_mesh = jax.sharding.Mesh(np.array(jax.devices()[:restore_devices]), ("data",))
    config = base_config()
    with checkpoint.Checkpointer(tmp_path, config) as ckpt:
        ckpt.save(7, _sharded(host, save_mesh), None)
    target = _sharded(jax.tree.map(np.zeros_like, host), restore_mesh)
    state, meta = checkpoint.Checkpointer(tmp_path, config).restore(target)
    assert meta["step"] == 7
    for (path, got), want, tgt in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(host),
                                      jax.tree.leaves(target)):
        assert got.sharding == tgt.sharding, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_keeps_last_k_plus_best(tmp_path):
    config = base_config()
    config.checkpoint.keep = 1
    config.checkpoint.best_metric = "val/t2i/R@1"
    state = {"step": jnp.int32(0), "params": {"w": jnp.ones(4)}}
    r_at_1 = {1: 0.5, 2: 0.9, 3: 0.2, 4: 0.1}
    with checkpoint.Checkpointer(tmp_path, config) as ckpt:
        for step, value in r_at_1.items():
            ckpt.save(step, state, None, val_metrics={"t2i/R@1": value})
            ckpt.wait()
        assert ckpt.best_step() == 2
    assert checkpoint.checkpoint_steps(tmp_path) == [2, 4]


def _poisoning(make_step, *, at_step: int, what: str):
    """make_train_step, but the step that produces `at_step` returns a NaN loss or NaN params."""
    def make(*args, **kwargs):
        step_fn = make_step(*args, **kwargs)

        def step(state, batch):
            new, metrics = step_fn(state, batch)
            bad = new["step"] == at_step
            if what == "loss":
                metrics = {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}
            else:
                new = {**new, "params": jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new["params"])}
            return new, metrics
        return step
    return make


@pytest.mark.parametrize("what,at_step,message", [
    ("loss", N + 1, f"loss = nan at step {N + 1}"),  # caught at the next log point
    ("params", 2 * N, f"state at step {2 * N} has NaN/Inf in ['params']"),  # caught by the check before saving
])
def test_nan_stops_run_and_keeps_last_good_checkpoint(reference_run, tmp_path, monkeypatch, capsys,
                                                      what, at_step, message):
    ref_dir, _ = reference_run
    monkeypatch.setattr(train, "make_train_step", _poisoning(train.make_train_step, at_step=at_step, what=what))
    workdir = workdir_with_tokenizer(tmp_path, ref_dir)
    code = cli.main(train_args(workdir, 2 * N))
    assert code == faults.EXIT_NONFINITE
    assert message in capsys.readouterr().err
    assert checkpoint.checkpoint_steps(workdir) == [N]
    assert_bitwise_equal(saved_state(workdir, N), saved_state(ref_dir, N))


def test_incompatible_workdir_is_refused_naming_the_fields(reference_run, capsys):
    ref_dir, _ = reference_run
    before = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
    code = cli.main(train_args(ref_dir, 3 * N, "--config.model.embed_dim=32", "--config.loss.name=sigmoid"))
    assert code == 2
    err = capsys.readouterr().err
    assert "model.embed_dim: 16 -> 32" in err and "loss.name: 'softmax' -> 'sigmoid'" in err
    differing = err.split("that change the model or the data:")[1].split(". Use a new")[0]
    assert "train.num_steps" not in differing and "--allow-config-change" in err
    assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == before


def test_changed_fields_ignores_free_fields():
    saved = {"train": {"num_steps": 10, "log_every": 2, "batch_size": 16}, "eval": {"ks": [1]},
             "model": {"embed_dim": 16}, "checkpoint": {"keep": 3}}
    now = {"train": {"num_steps": 99, "log_every": 5, "batch_size": 32}, "eval": {"ks": [1, 5]},
           "model": {"embed_dim": 16, "remat": True}, "checkpoint": {"keep": 1}}
    assert checkpoint.changed_fields(saved, now) == [("model.remat", "<absent>", True),
                                                     ("train.batch_size", 16, 32)]


def test_export_is_params_only_and_evaluates(reference_run, tmp_path, capsys):
    ref_dir, _ = reference_run
    out = tmp_path / "export"
    assert cli.main(["export", "--workdir", str(ref_dir), "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer" / "tokenizer_config.json").exists()
    saved = ocp.PyTreeCheckpointer().restore(out / "params")
    assert "opt_state" not in saved and "image_tower" in saved
    assert_bitwise_equal(jax.tree.map(np.asarray, saved), saved_state(ref_dir, 2 * N)["params"])
    assert cli.main(["eval", "--workdir", str(out), "--config.data.eval_splits=test"]) == 0
    results = json.loads((out / "reeval.json").read_text())
    assert results["step"] == 2 * N and 0.0 <= results["test"]["t2i/R@1"] <= 1.0
