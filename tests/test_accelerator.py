"""Checks that matter on a GPU/TPU, at small sizes on CPU: `benchmarks/accelerator_check.py` runs them there.

Marked `accelerator`. On the CPU (the test suite) the shapes are small and the cuDNN
comparison is skipped; on an accelerator the shapes are ViT-B/16-like.

Tolerances:
* attention, cuDNN vs XLA, both bf16 in and out: max |difference| <= 2e-2 on outputs of
  magnitude <= ~1 (bf16 keeps 8 mantissa bits: one rounding of a value near 1 is 4e-3, and the
  two kernels round in different places); input gradients: relative L2 error <= 2e-2.
  XLA's attention vs a float64 numpy reference: 1e-5 in float32 (CPU: 1e-5; accelerators
  compute float32 matmuls at full precision inside `jax.default_matmul_precision("highest")`).
* bf16 compute vs float32, same params and batch: loss within 2% (relative), the whole
  gradient within 5% relative L2 error (cosine >= 0.998), the loss after 3 train steps within 2%.
* sharded over all local devices vs 1 device (float32, full-precision matmuls): as
  tests/test_parallel.py (loss and grad norm rtol 1e-5, gradients and params rtol 1e-4).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from multihost_worker import tiny_batch, tiny_config, tiny_model
from test_parallel import assert_same_training, one_device_mesh, run_steps

from prodclip import optim, parallel, train
from prodclip import config as config_lib, config_checks
from prodclip.models import factory, layers

pytestmark = pytest.mark.accelerator

ON_ACCELERATOR = jax.default_backend() in ("gpu", "tpu")
# [B, L, H, head dim]: ViT-B/16 image tokens and CLIP text tokens on an accelerator; small on CPU.
ATTENTION_SHAPES = ([(8, 197, 12, 64), (8, 77, 8, 64)] if ON_ACCELERATOR else [(2, 17, 2, 16), (2, 9, 2, 8)])


def numpy_attention(q, k, v, causal: bool) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v in float64 on [B, L, H, d] arrays."""
    q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
        length = q.shape[2]
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3)


def qkv(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_xla_attention_matches_numpy(shape, causal):
    q, k, v = qkv(shape, jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"))(
            q, k, v)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_cudnn_attention_matches_xla_in_bfloat16(shape, causal, record_property):
    if jax.default_backend() != "gpu":
        pytest.skip(f"cuDNN attention needs a GPU; this backend is {jax.default_backend()}")
    q, k, v = qkv(shape, jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(9), shape, jnp.float32).astype(jnp.bfloat16)

    def forward_and_grads(implementation):
        def f(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cotangent)

    cudnn_out, cudnn_grads = jax.jit(lambda q, k, v: forward_and_grads("cudnn"))(q, k, v)
    xla_out, xla_grads = jax.jit(lambda q, k, v: forward_and_grads("xla"))(q, k, v)
    diff = float(jnp.max(jnp.abs(cudnn_out.astype(jnp.float32) - xla_out.astype(jnp.float32))))
    grad_errors = [relative_error(a, b) for a, b in zip(cudnn_grads, xla_grads)]
    record_property("max_abs_output_difference", diff)
    record_property("grad_relative_errors_qkv", grad_errors)
    assert diff <= 2e-2
    assert max(grad_errors) <= 2e-2
    # Both against float64 on the same bf16 inputs: cuDNN is no further from it than XLA, give or take bf16 rounding.
    reference = numpy_attention(q, k, v, causal)
    assert relative_error(cudnn_out, reference) <= relative_error(xla_out, reference) + 1e-2


def test_model_attention_takes_cudnn_on_gpu_in_bfloat16(record_property):
    """The towers' attention (layers.Attention, no mask as in the ViT) compiles to cuDNN's fused kernel."""
    if jax.default_backend() != "gpu":
        pytest.skip(f"cuDNN attention needs a GPU; this backend is {jax.default_backend()}")
    attn = layers.Attention(768, 12, nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(attn)
    x = jnp.ones((8, 197, 768), jnp.bfloat16)
    hlo = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, x).compile().as_text()
    record_property("cudnn_custom_call", "cudnn" in hlo.lower())
    assert "cudnn" in hlo.lower(), "layers.Attention fell back to XLA attention on GPU in bfloat16"


# ----------------------------------------------------------------------------- bf16 vs f32


def step_config(dtype: str):
    """A small CLIP on CPU; a ViT-S-ish one (64 px, patch 8, 4x256) on an accelerator."""
    c = config_lib.base_config()
    if ON_ACCELERATOR:
        c.data.image_size, c.tokenizer.context_length, c.model.embed_dim, c.train.batch_size = 64, 32, 256, 128
        width, depth, heads = 256, 4, 4
    else:
        c.data.image_size, c.tokenizer.context_length, c.model.embed_dim, c.train.batch_size = 32, 8, 32, 16
        width, depth, heads = 32, 2, 2
    for tower in (c.model.image, c.model.text):
        tower.width, tower.depth, tower.num_heads = width, depth, heads
    c.model.image.patch_size = 8
    c.model.dtype = dtype
    c.optim.warmup_steps = 0
    config_checks.validate(c)
    return c


def test_bfloat16_step_matches_float32(record_property):
    f32, bf16 = step_config("float32"), step_config("bfloat16")
    tokenizer = types.SimpleNamespace(vocab_size=64, pad_id=0)
    graphdef32, params = factory.create_model(f32, tokenizer, seed=0)
    graphdef16, params16 = factory.create_model(bf16, tokenizer, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params16)))
    batch = jax.tree.map(jnp.asarray, tiny_batch(f32, seed=0))
    with jax.default_matmul_precision("highest"):
        loss32, grads32 = jax.jit(train.make_loss_and_grads(f32, graphdef32))(params, batch)
    loss16, grads16 = jax.jit(train.make_loss_and_grads(bf16, graphdef16))(params, batch)
    flat = lambda tree: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
    g32, g16 = flat(grads32), flat(grads16)
    grad_error = relative_error(g16, g32)
    cosine = float(g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32))
    record_property("loss_f32", float(loss32))
    record_property("loss_bf16", float(loss16))
    record_property("grad_relative_l2_error", grad_error)
    record_property("grad_cosine", cosine)
    assert {x.dtype for x in jax.tree.leaves(grads16)} == {np.dtype(np.float32)}
    assert abs(float(loss16) - float(loss32)) <= 2e-2 * abs(float(loss32))
    assert grad_error <= 5e-2 and cosine >= 0.998

    def losses_after_steps(config, graphdef, steps=3):
        tx = optim.make_optimizer(config, params)
        state = optim.init_train_state(config, params)
        compiled = parallel.compile_train_step(
            config, one_device_mesh(config), lambda loss, reduce: train.make_train_step(config, graphdef, tx, loss,
                                                                                       reduce),
            train.make_pair_loss(config), state)
        state, out = compiled.place_state(state), []
        for step in range(steps):
            state, metrics = compiled.step(state, compiled.place_batch(tiny_batch(config, seed=step)))
            out.append(float(metrics["loss"]))
        return out

    with jax.default_matmul_precision("highest"):
        ref = losses_after_steps(f32, graphdef32)
    got = losses_after_steps(bf16, graphdef16)
    record_property("losses_f32", ref)
    record_property("losses_bf16", got)
    assert ref[-1] < ref[0]  # the steps train
    np.testing.assert_allclose(got, ref, rtol=2e-2)


# ----------------------------------------------------------------------------- sharding


def test_sharded_step_on_all_local_devices_matches_one_device(record_property):
    devices = jax.local_devices()
    record_property("local_devices", len(devices))
    if len(devices) < 2:
        pytest.skip(f"one local device ({devices[0].device_kind}): nothing to shard over")
    n = len(devices)
    with jax.default_matmul_precision("highest"):
        ref_config = tiny_config(**{"train.batch_size": 4 * n})
        reference = run_steps(ref_config, one_device_mesh(ref_config), num_steps=2)
        config = tiny_config(**{"train.batch_size": 4 * n, "parallel.mesh_shape": (-1, 1)})
        mesh = parallel.make_mesh(config, devices)
        states, history = run_steps(config, mesh, num_steps=2)
    assert_same_training(config, states, history, *reference, what=f"{n} devices")


# ----------------------------------------------------------------------------- donation, host syncs


HOST_TRANSFER_OPS = ("outfeed", "infeed", "host_callback", "python_cpu_callback", "python_gpu_callback",
                     "sendtohost", "recvfromhost")


def test_step_donates_state_and_runs_without_host_transfers():
    """The old state's buffers are donated (deleted), and two steps run under jax.transfer_guard('disallow')."""
    config = tiny_config()
    graphdef, _, tx, state = tiny_model(config)
    mesh = parallel.make_mesh(config, jax.local_devices()[:1])
    compiled = parallel.compile_train_step(
        config, mesh, lambda loss, reduce: train.make_train_step(config, graphdef, tx, loss, reduce),
        train.make_pair_loss(config), state)
    state = compiled.place_state(state)
    batches = [compiled.place_batch(tiny_batch(config, seed=s)) for s in range(2)]
    hlo = compiled.step.lower(state, batches[0]).compile().as_text().lower()
    assert not [op for op in HOST_TRANSFER_OPS if op in hlo]
    first = state
    with jax.transfer_guard("disallow"):
        state, metrics = compiled.step(state, batches[0])
        state, metrics = compiled.step(state, batches[1])
    assert all(x.is_deleted() for x in jax.tree.leaves(first))
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 2
