"""Sharded, pmap, GradCache and multi-process train steps against the 1-device step (8 fake CPU devices).

Tolerances (float32 everywhere, only reduction orders differ between layouts):
* loss and grad norm: rtol 1e-5;
* gradients: rtol 1e-4, atol 1e-6 * max(1, max|reference|) per tensor;
* params after the steps: rtol 1e-4, atol 1e-5 (tiny_config uses Adam eps 1e-3 so that
  key biases, whose true gradient is 0, stay at float noise); optimizer state
  (Adam moments, |mu| up to ~0.5): rtol 1e-4, atol 1e-5. The updates are ~1e-2, so a wrong
  layout or a missing gradient term shows.
"""

import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from multihost_worker import NUM_STEPS, run_processes, tiny_batch, tiny_config, tiny_model

from prodclip import parallel, train
from prodclip.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_trees_close(actual, expected, rtol, atol_scale, what):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        atol = atol_scale * max(1.0, float(np.max(np.abs(e)))) if e.size else 0.0
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def one_device_mesh(config):
    return parallel.make_mesh(config, devices=jax.devices()[:1])


def run_steps(config, mesh, num_steps=2, batch_fn=tiny_batch):
    """Trains `num_steps` on batches batch_fn(config, 0), batch_fn(config, 1), ... through compile_train_step.

    Returns (host state after each step, metrics of each step).
    """
    graphdef, _, tx, state = tiny_model(config)
    compiled = parallel.compile_train_step(
        config, mesh, lambda loss, reduce: train.make_train_step(config, graphdef, tx, loss, reduce),
        train.make_pair_loss(config), state)
    state = compiled.place_state(state)
    states, history = [], []
    for step in range(num_steps):
        state, metrics = compiled.step(state, compiled.place_batch(batch_fn(config, seed=step)))
        history.append({k: float(np.mean(jax.device_get(v))) for k, v in metrics.items()})
        states.append(jax.device_get(compiled.global_state(state)))
    return states, history


def first_gradients(config, state_after_one_step):
    """The first step's gradients, by parameter path, read from AdamW's first moment.

    From zero moments and without clipping (tiny_config), mu = (1 - b1) * gradient.
    """
    grads = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state_after_one_step["opt_state"]):
        name = parallel.path_name(path)
        if "/mu/" in name:
            grads[name.split("/mu/", 1)[1]] = np.asarray(x) / (1 - config.optim.b1)
    locked = [t for t, on in (("image_tower/", config.optim.lock_image), ("text_tower/", config.optim.lock_text)) if on]
    trained = [parallel.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state_after_one_step["params"])]
    assert len(grads) == len([n for n in trained if not any(n.startswith(t) for t in locked)])
    return grads


def assert_same_training(config, states, history, ref_states, ref_history, what, state_rtol=1e-4):
    """Loss and grad norm of every step, first gradients, params and optimizer state after the last step
    (the last two within `state_rtol`)."""
    for step, (got, want) in enumerate(zip(history, ref_history)):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (what, step, key)
    assert_trees_close(first_gradients(config, states[0]), first_gradients(config, ref_states[0]),
                       1e-4, 1e-6, f"{what} gradients")
    last = len(history) - 1
    assert_trees_close(states[last]["params"], ref_states[last]["params"], state_rtol, 1e-5, f"{what} params")
    assert_trees_close(states[last]["opt_state"], ref_states[last]["opt_state"], state_rtol, 1e-5,
                       f"{what} opt_state")


@pytest.fixture(scope="module")
def reference():
    """The 1-device step: host states after each of 3 steps, and their metrics."""
    config = tiny_config()
    return run_steps(config, one_device_mesh(config), num_steps=NUM_STEPS)


# ----------------------------------------------------------------------------- rules and config


def test_partition_rules():
    spec = parallel.partition_spec
    assert spec("image_tower/encoder/blocks/0/mlp/fc1/kernel", (16, 64), 2, 64) == P(None, "fsdp")
    assert spec("text_tower/token_embed/embedding", (64, 16), 4, 64) == P("fsdp", None)
    assert spec("a/kernel", (6, 4), 4, 1) == P(None, "fsdp")  # 6 is not divisible by 4, 4 is
    assert spec("a/kernel", (6, 3), 4, 1) == P()  # nothing divisible: replicated
    assert spec("a/bias", (16,), 2, 64) == P()  # small: replicated
    assert spec("log_logit_scale", (), 2, 1) == P()
    assert spec("0/mu/logit_bias", (), 2, 1) == P()
    assert spec("a/kernel", (16, 64), 1, 1) == P()  # no fsdp axis


def test_optimizer_state_follows_params():
    config = tiny_config(**{"parallel.mesh_shape": (2, 4)})
    mesh = parallel.make_mesh(config)
    _, params, _, state = tiny_model(config)
    shardings = parallel.tree_shardings(state, mesh, config.parallel.fsdp_min_size)
    param_specs = {parallel.path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings["params"])}
    assert any("fsdp" in s for s in param_specs.values()), "nothing is FSDP-sharded: the mesh tests would be vacuous"
    moments = 0
    for path, sharding in jax.tree_util.tree_leaves_with_path(shardings["opt_state"]):
        name = parallel.path_name(path)
        owner = [p for p in param_specs if name.endswith("/" + p)]
        if owner and ("/mu/" in name or "/nu/" in name):
            assert sharding.spec == param_specs[owner[0]], name
            moments += 1
    assert moments >= len(param_specs)  # an Adam mu and nu for every trained parameter


@pytest.mark.parametrize("overrides,message", [
    ({"parallel.loss": "ring"}, "extra_positives"),
    ({"parallel.strategy": "pmap", "parallel.loss": "ring", "loss.extra_positives": False}, "pmap"),
    ({"parallel.mesh_shape": (-1, -1)}, "mesh_shape"),
    ({"train.grad_accum_steps": 3}, "grad_accum_steps"),
    ({"parallel.strategy": "spmd"}, "parallel.strategy"),
])
def test_config_rejects_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_mesh_shape_and_batch_errors():
    assert parallel.resolve_mesh_shape((-1, 2), 8) == (4, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.resolve_mesh_shape((3, 2), 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        parallel.resolve_mesh_shape((-1, 3), 8)
    config = tiny_config(**{"train.batch_size": 36, "train.grad_accum_steps": 4})
    with pytest.raises(ValueError, match="divisible by 8 devices"):
        parallel.check_batch_size(config, parallel.make_mesh(config))


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
def test_meshes_match_one_device(mesh_shape, reference):
    config = tiny_config(**{"parallel.mesh_shape": mesh_shape})
    mesh = parallel.make_mesh(config)
    assert mesh.devices.size == 8
    states, history = run_steps(config, mesh, num_steps=2)
    assert_same_training(config, states, history, *reference, what=f"mesh {mesh_shape}")
    # The two steps moved the params by much more than the tolerance.
    _, init_params, _, _ = tiny_model(config)
    moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
                zip(jax.tree.leaves(states[-1]["params"]), jax.tree.leaves(init_params)))
    assert moved > 1e-3


@pytest.mark.parametrize("loss_name", ["sigmoid", "softmax"])
def test_ring_equals_all_gather_in_train_step(loss_name):
    """parallel.loss='ring' on a 4x2 mesh equals the all-gather step on one device."""
    plain = {"loss.name": loss_name, "loss.extra_positives": False}
    ref_config = tiny_config(**plain)
    ref = run_steps(ref_config, one_device_mesh(ref_config))
    config = tiny_config(**plain, **{"parallel.mesh_shape": (4, 2), "parallel.loss": "ring"})
    states, history = run_steps(config, parallel.make_mesh(config))
    assert_same_training(config, states, history, *ref, what=f"ring {loss_name}")
    if loss_name == "sigmoid":  # the bias is trained by the sigmoid loss, and the ring passes its gradient
        assert abs(first_gradients(config, states[0])["logit_bias"]) > 1e-3


def test_pmap_equals_sharded(reference):
    config = tiny_config(**{"parallel.strategy": "pmap"})
    states, history = run_steps(config, parallel.make_mesh(config))
    assert_same_training(config, states, history, *reference, what="pmap")


def batch_with_negatives(config, seed):
    """tiny_batch plus a hard-negative title per row (another row's title), a third of rows without one."""
    batch = tiny_batch(config, seed)
    rng = np.random.default_rng(seed + 100)
    b = len(batch["ids"])
    return {**batch, "negative_token_ids": batch["token_ids"][rng.permutation(b)],
            "negative_mask": rng.random(b) > 0.33}


@pytest.mark.parametrize("layout", [{"parallel.mesh_shape": (4, 2)}, {"parallel.strategy": "pmap"}])
def test_hard_negative_step_on_8_devices_equals_one_device(layout):
    """loss.hard_negatives: the extra per-row term under FSDP and pmap equals the 1-device step, and moves it."""
    on = {"loss.hard_negatives": 1, "loss.hard_negative_weight": 2.0, "optim.lock_image": True,
          "data.augment": False}
    ref_config = tiny_config(**on)
    ref = run_steps(ref_config, one_device_mesh(ref_config), batch_fn=batch_with_negatives)
    config = tiny_config(**on, **layout)
    states, history = run_steps(config, parallel.make_mesh(config), batch_fn=batch_with_negatives)
    assert_same_training(config, states, history, *ref, what=f"hard negatives {layout}")
    plain = run_steps(ref_config, one_device_mesh(ref_config))
    assert abs(history[0]["loss"] - plain[1][0]["loss"]) > 1e-3  # the term is in the loss


def test_gradcache_with_remat_equals_full_batch_gradient(reference):
    """GradCache over 4 micro-batches, with remat'd blocks, on a 4x2 mesh: the full-batch 1-device gradient."""
    config = tiny_config(**{"parallel.mesh_shape": (4, 2), "train.grad_accum_steps": 4, "model.remat": True})
    states, history = run_steps(config, parallel.make_mesh(config), num_steps=1)
    assert_same_training(config, states, history, *reference, what="gradcache + remat")


def dot_input_dtypes(fn, *args) -> set[str]:
    """Dtypes of the left operands of every dot_general in fn's jaxpr, nested jaxprs included."""
    found = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.add(str(eqn.invars[0].aval.dtype))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    visit(inner)
    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_keeps_float32_state(dtype):
    """model.dtype=bfloat16: the matmuls run in bf16; the step's params and optimizer state stay f32.

    Checked on the traced step (jaxpr and output shapes/dtypes), without compiling it.
    """
    config = tiny_config(**{"model.dtype": dtype})
    graphdef, _, tx, state = tiny_model(config)
    step = train.make_train_step(config, graphdef, tx)
    batch = tiny_batch(config, seed=0)
    assert ("bfloat16" in dot_input_dtypes(step, state, batch)) == (dtype == "bfloat16")
    new_state, metrics = jax.eval_shape(step, state, batch)
    dtypes = {x.dtype for x in jax.tree.leaves((new_state["params"], new_state["opt_state"]))}
    assert dtypes <= {np.dtype(np.float32), np.dtype(np.int32)}, dtypes
    assert metrics["loss"].dtype == np.float32


# ----------------------------------------------------------------------------- two processes


def test_two_processes_match_one_process(tmp_path, reference):
    out = tmp_path / "params.npz"
    run_processes("multihost_worker.py", lambda i, port: (port, 2, i, out), 2, timeout=120)

    ref_states, _ = reference
    got = np.load(out)
    want = {parallel.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(ref_states[-1]["params"])}
    assert set(got.files) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_multihost_flags_need_all_three_or_none():
    env = {"PRODCLIP_COORDINATOR_ADDRESS": "10.0.0.1:1234", "PRODCLIP_NUM_PROCESSES": "4", "PRODCLIP_PROCESS_ID": "2"}
    assert parallel.distributed_flags_from_env(env) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
    assert parallel.distributed_flags_from_env({}) == dict(coordinator_address="", num_processes=0, process_id=-1)
    with pytest.raises(ValueError, match="give all of coordinator address"):
        parallel.initialize_distributed("10.0.0.1:1234", num_processes=0, process_id=-1)
