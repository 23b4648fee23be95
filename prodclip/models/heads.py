"""Trainable projection heads that sit after a tower, outside it.

A head maps a tower's output features to the shared embedding space. Keeping it outside the
tower means a locked tower (optim.lock_image / lock_text) stays whole and frozen while its
head trains, and the tower's features can be computed once and cached (image_cache.py,
text_cache.py): a training step then runs only the heads.

    linear: [B, F] -> [B, D]                         (no bias)
    mlp:    [B, F] -> Dense(F, H) -> GELU -> Dense(H, D), plus a linear skip [B, F] -> [B, D]

The skip makes the MLP start as (and never be worse than) a linear head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prodclip.models import layers

HEAD_KINDS = ("none", "linear", "mlp")


class ProjectionHead(nnx.Module):
    """features [B, in_features] -> [B, out_features] (not normalised)."""

    def __init__(self, kind: str, in_features: int, out_features: int, hidden: int, rngs: nnx.Rngs, *,
                 dtype=jnp.float32):
        if kind not in ("linear", "mlp"):
            raise ValueError(f"head kind {kind!r} is not one of 'linear', 'mlp'")
        self.kind = kind
        self.dtype = dtype
        self.linear = layers.dense(in_features, out_features, rngs, dtype=dtype, use_bias=False)
        if kind == "mlp":
            self.fc1 = layers.dense(in_features, hidden, rngs, dtype=dtype)
            self.fc2 = nnx.Linear(hidden, out_features, dtype=dtype, kernel_init=nnx.initializers.zeros,
                                  rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        x = features.astype(self.dtype)
        out = self.linear(x)
        if self.kind == "mlp":
            out = out + self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
        return out


def build_head(kind: str, in_features: int, out_features: int, hidden: int, rngs: nnx.Rngs,
               dtype=jnp.float32) -> ProjectionHead | None:
    """None for kind 'none' (the tower's output is the embedding), else a ProjectionHead."""
    if kind == "none":
        return None
    return ProjectionHead(kind, in_features, out_features, hidden, rngs, dtype=dtype)
