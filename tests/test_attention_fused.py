"""Self-attention's fused q/k/v matmul equals the three separate projections and a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prodclip.models import layers


def numpy_attention(attn: layers.Attention, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Multi-head attention in float64 numpy from the module's parameters."""
    p = lambda lin: (np.asarray(lin.kernel[...], np.float64), np.asarray(lin.bias[...], np.float64))
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = p(attn.query), p(attn.key), p(attn.value), p(attn.out)
    b, l, w = x.shape
    h = attn.num_heads
    split = lambda t: t.reshape(b, l, h, w // h).transpose(0, 2, 1, 3)
    q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(w // h)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(b, l, w)
    return y @ wo + bo


@pytest.mark.parametrize("causal", [False, True])
def test_fused_self_attention_matches_numpy(causal):
    attn = layers.Attention(32, 4, nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 7, 32)).astype(np.float32)
    mask = np.tril(np.ones((7, 7), bool))[None, None] if causal else None
    got = attn(jnp.asarray(x), mask=None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), numpy_attention(attn, x.astype(np.float64), mask), atol=2e-5, rtol=1e-5)


def test_fused_gradients_match_separate_projections():
    """attn(x) takes the fused path; attn(x, context=x) the three separate Linear layers."""
    attn = layers.Attention(32, 4, nnx.Rngs(1))
    graphdef, params = nnx.split(attn, nnx.Param)
    x = jax.random.normal(jax.random.key(2), (2, 5, 32))
    target = jax.random.normal(jax.random.key(3), (2, 5, 32))

    def loss(params, x, fused):
        module = nnx.merge(graphdef, params)
        y = module(x) if fused else module(x, context=x)
        return jnp.sum((y - target) ** 2)

    fused = jax.grad(loss, argnums=(0, 1))(params, x, True)
    separate = jax.grad(loss, argnums=(0, 1))(params, x, False)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(separate)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_fused_bfloat16_computes_in_bfloat16():
    attn = layers.Attention(32, 4, nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    fused, separate = attn(x), attn(x, context=x)
    assert fused.dtype == separate.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(separate, np.float32), atol=3e-2)
