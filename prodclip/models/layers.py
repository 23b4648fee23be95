"""Transformer pieces shared by the towers and the fusion encoder.

Shapes: B batch, L tokens, W width, H heads. All modules keep float32 parameters
and compute in `dtype` (float32 or bfloat16).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
}

DENSE_INIT = nnx.initializers.xavier_uniform()


def dense(in_features: int, out_features: int, rngs: nnx.Rngs, *, dtype, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_init=DENSE_INIT, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head attention: queries from `x`, keys/values from `context` (self-attention if None)."""

    def __init__(self, width: int, num_heads: int, rngs: nnx.Rngs, *, context_width: int | None = None, dtype=jnp.float32):
        self.num_heads = num_heads
        self.query = dense(width, width, rngs, dtype=dtype)
        self.key = dense(context_width or width, width, rngs, dtype=dtype)
        self.value = dense(context_width or width, width, rngs, dtype=dtype)
        self.out = dense(width, width, rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, W]; context: [B, S, Wc] or None; mask: bool, broadcastable to [B, H, L, S]. Returns [B, L, W]."""
        b, l, w = x.shape
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, w // self.num_heads)
        if context is None:
            q, k, v = (heads(t) for t in self._fused_qkv(x))
        else:
            q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        y = self._dot_product_attention(q, k, v, mask)  # [B, L, H, W/H]
        return self.out(y.reshape(b, l, w))

    def _fused_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention q, k, v [B, L, W] from one [W, 3W] matmul instead of three [W, W] ones.

        The same products and sums as the three Linear layers (each output column is the
        same dot product); one larger matmul and one pass over x (forward and backward) are
        faster. The parameters stay three Linear layers, so checkpoints do not change.
        """
        projections = (self.query, self.key, self.value)
        kernel = jnp.concatenate([layer.kernel[...] for layer in projections], axis=1)
        bias = jnp.concatenate([layer.bias[...] for layer in projections]) if self.query.use_bias else None
        x, kernel, bias = self.query.promote_dtype((x, kernel, bias), dtype=self.query.dtype)
        qkv = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if bias is not None:
            qkv = qkv + bias
        return tuple(jnp.split(qkv, 3, axis=-1))

    @staticmethod
    def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """softmax(q k^T / sqrt(d)) v on [B, L, H, d] arrays: cuDNN's fused kernel on GPU in bf16/fp16, else XLA's.

        cuDNN refuses some shapes and masks when the step is traced; those fall back to XLA's
        implementation, which computes the same function.
        """
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                pass
        return jax.nn.dot_product_attention(q, k, v, mask=mask)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs, *, activation: str = "gelu", dtype=jnp.float32):
        self.fc1 = dense(width, hidden, rngs, dtype=dtype)
        self.fc2 = dense(hidden, width, rngs, dtype=dtype)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


def append_scaled(pooled: jax.Array, parts: list[jax.Array]) -> jax.Array:
    """pooled [B, F], parts [[B, F_i], ...] -> [B, F + sum F_i]: pooled, then the parts L2-normalised
    together (float32) and scaled to pooled's norm, so all the parts together weigh as much as pooled."""
    if not parts:
        return pooled
    extra = scaled_to_norm(jnp.concatenate(parts, axis=-1), pooled)
    return jnp.concatenate([pooled, extra.astype(pooled.dtype)], axis=-1)


def scaled_to_norm(x: jax.Array, reference: jax.Array) -> jax.Array:
    """x [B, F] L2-normalised per row (float32) and scaled to the norm of reference's row ([B, F'])."""
    scale = jnp.linalg.norm(reference.astype(jnp.float32), axis=-1, keepdims=True)
    return x * scale / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def layer_norm(width: int, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, rngs: nnx.Rngs, *, activation="gelu", dtype=jnp.float32):
        self.norm1 = layer_norm(width, rngs, dtype)
        self.attn = Attention(width, num_heads, rngs, dtype=dtype)
        self.norm2 = layer_norm(width, rngs, dtype)
        self.mlp = Mlp(width, int(width * mlp_ratio), rngs, activation=activation, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """A stack of pre-LN blocks followed by a final LayerNorm. Optional remat per block."""

    def __init__(self, width, depth, num_heads, mlp_ratio, rngs, *, activation="gelu", dtype=jnp.float32, remat=False):
        self.blocks = nnx.List(
            [Block(width, num_heads, mlp_ratio, rngs, activation=activation, dtype=dtype) for _ in range(depth)]
        )
        self.norm = layer_norm(width, rngs, dtype)
        self.remat = remat

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda blk, h, m: blk(h, m))(block, x, mask)
            else:
                x = block(x, mask)
        return self.norm(x)


class AttentionPool(nnx.Module):
    """Multihead attention pooling (MAP): a learned probe attends over the tokens."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, rngs: nnx.Rngs, *, activation="gelu", dtype=jnp.float32):
        self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, width)))
        self.attn = Attention(width, num_heads, rngs, dtype=dtype)
        self.norm = layer_norm(width, rngs, dtype)
        self.mlp = Mlp(width, int(width * mlp_ratio), rngs, activation=activation, dtype=dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, L, W] -> [B, W]."""
        probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        x = self.attn(probe, context=tokens)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]
