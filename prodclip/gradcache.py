"""GradCache: the exact large-batch contrastive gradient at one micro-batch's activation memory.

A contrastive loss couples every pair of the batch, so plain gradient
accumulation (summing micro-batch losses) changes the objective. GradCache
(Gao et al., 2021) keeps it exact by splitting the gradient at the embeddings:

1. embed all k micro-batches without gradients (only [B, D] embeddings are kept);
2. take the full-batch loss and its gradient w.r.t. the embeddings (and w.r.t.
   the parameters the loss uses directly, e.g. the logit scale and bias);
3. re-run each micro-batch's towers under `jax.vjp` and pull the cached
   embedding gradient back to the parameters; sum over micro-batches.

The towers run twice (once in step 1, once in step 3), about 1.3x the compute.

Micro-batch i takes rows i, i + k, i + 2k, ... of the batch, so when the batch
is sharded over devices in contiguous blocks every micro-batch still spans all
devices (each device keeps its own rows).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Embed = Callable[[Any, dict], tuple[jax.Array, jax.Array]]
LossOnEmbeddings = Callable[[Any, jax.Array, jax.Array, dict], jax.Array]


def to_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]; micro-batch i holds rows i, i + k, ..."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def from_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of `to_micro_batches`: [k, B/k, ...] -> [B, ...] in the original row order."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def value_and_grad(embed: Embed, loss_on_embeddings: LossOnEmbeddings, params: Any, batch: dict,
                   num_micro_batches: int) -> tuple[jax.Array, Any]:
    """The loss and parameter gradient of ``loss_on_embeddings(params, *embed(params, batch), batch)``.

    Args:
      embed: ``(params, batch) -> (image_emb [b, D], text_emb [b, D])`` for any batch size b.
      loss_on_embeddings: ``(params, image_emb [B, D], text_emb [B, D], batch) -> scalar``,
        the full-batch loss; it may read params directly (logit scale, bias) and
        batch fields (ids for positives).
      params: the parameter pytree.
      batch: dict of ``[B, ...]`` arrays, B divisible by ``num_micro_batches``.
      num_micro_batches: k.

    Returns:
      (scalar loss, gradient pytree like ``params``), equal to `jax.value_and_grad`
      of the whole-batch function up to float summation order.
    """
    k = num_micro_batches
    micro = jax.tree.map(lambda x: to_micro_batches(x, k), batch)

    frozen = jax.lax.stop_gradient(params)
    image_emb, text_emb = jax.lax.map(lambda mb: embed(frozen, mb), micro)
    image_emb, text_emb = from_micro_batches(image_emb), from_micro_batches(text_emb)

    loss, (grads, d_image, d_text) = jax.value_and_grad(loss_on_embeddings, argnums=(0, 1, 2))(
        params, image_emb, text_emb, batch)

    def backprop_micro_batch(acc, inputs):
        mb, d_image_mb, d_text_mb = inputs
        _, pullback = jax.vjp(lambda p: embed(p, mb), params)
        (g,) = pullback((d_image_mb, d_text_mb))
        return jax.tree.map(jnp.add, acc, g), None

    cached = (micro, to_micro_batches(d_image, k), to_micro_batches(d_text, k))
    grads, _ = jax.lax.scan(backprop_micro_batch, grads, cached)
    return loss, grads
