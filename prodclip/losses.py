"""Contrastive losses for two-tower (image/text) pretraining: CLIP softmax and SigLIP sigmoid.

Conventions shared by every function here:

* ``image_emb``, ``text_emb``: ``[B, D]`` float (float32 or bfloat16), rows
  L2-normalised by the model. Row ``i`` of both is a matching pair. The losses do
  not normalise themselves; gradients are w.r.t. the raw arguments.
* ``logit_scale``: scalar float, the *multiplier* (already ``exp``-ed and clamped,
  see `clip_logit_scale`), i.e. an inverse temperature, e.g. ~14.3 = 1/0.07.
* ``logit_bias``: scalar float added to every logit (SigLIP only).
* Logits, log-sum-exps and the returned loss are float32 whatever the input
  dtype: the matmul accumulates in float32 (``preferred_element_type``) so bf16
  embeddings still use the fast bf16 matmul path. Losses are in nats.

Three ways to get a loss over a global batch that is sharded over devices:

1. **All-gather** (the default in `prodclip.train`): call the plain
   `softmax_contrastive_loss` / `sigmoid_contrastive_loss` inside ``jax.jit`` on
   globally sharded ``[B, D]`` arrays. XLA's SPMD partitioner inserts the
   all-gather of the embeddings, and autodiff sends each gradient back to the
   device that owns the row (reduce-scatter). Nothing to write, but each device
   materialises a ``[B/n, B]`` (or larger) logit block and its gradient.
2. **Ring** (`ring_sigmoid_loss`, `ring_softmax_loss`, called inside
   ``jax.shard_map``): text chunks travel round the devices with
   ``jax.lax.ppermute`` and each device only ever holds one ``[B/n, B/n]`` logit
   block, so logit memory per device is O((B/n)^2) instead of O(B^2/n). The
   backward pass is a custom VJP that runs the ring again and carries each text
   chunk's gradient along with it, so no per-step residuals are stored either.
3. `make_ring_loss` wraps 2. in ``jax.shard_map`` so it can be called, like 1.,
   from an ordinary jitted function on globally sharded arrays.

The ring variants only know the diagonal positives (row ``i`` with row ``i``);
they do not take a ``positives`` mask, because extra positives can sit in other
devices' chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

AxisName = str | tuple[str, ...]


# ----------------------------------------------------------------------------- helpers


def clip_logit_scale(log_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
    """The CLIP logit scale ``min(exp(log_scale), max_scale)``.

    Args:
      log_scale: scalar float, the learned log of the inverse temperature.
      max_scale: upper clamp (CLIP uses 100).

    Returns:
      Scalar, same dtype as ``log_scale``. Above the clamp the gradient w.r.t.
      ``log_scale`` is exactly 0 (``jnp.minimum`` routes it to the constant), so
      the temperature stops moving instead of growing without bound.
    """
    return jnp.minimum(jnp.exp(log_scale), max_scale)


def trained_logit_scale(params, max_scale: float = 100.0) -> float:
    """The logit scale of a trained two-tower model's `params` (its `log_logit_scale`), as a python float."""
    return float(clip_logit_scale(jnp.asarray(params["log_logit_scale"]), max_scale))


def _logits(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """``[Bi, Bt]`` float32 ``scale * image_emb @ text_emb.T``."""
    dots = jnp.einsum("id,td->it", image_emb, text_emb, preferred_element_type=jnp.float32)
    return jnp.asarray(logit_scale, jnp.float32) * dots


def _positive_mask(batch: int, positives: jax.Array | None) -> jax.Array:
    """``[B, B]`` bool; the diagonal is always positive so no row/column is empty."""
    eye = jnp.eye(batch, dtype=bool)
    return eye if positives is None else (eye | positives.astype(bool))


# ----------------------------------------------------------------------------- plain losses


def softmax_contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    label_smoothing: float = 0.0,
    positives: jax.Array | None = None,
) -> jax.Array:
    """CLIP's symmetric InfoNCE loss.

    ``logits = scale * image_emb @ text_emb.T``; the loss is the mean of the
    image->text cross entropy (softmax over each row) and the text->image one
    (softmax over each column), each averaged over the ``B`` rows/columns.

    Args:
      image_emb, text_emb: ``[B, D]`` float, L2-normalised.
      logit_scale: scalar, inverse temperature (see `clip_logit_scale`).
      label_smoothing: ``alpha`` in ``[0, 1)``; targets become
        ``(1 - alpha) * target + alpha / B``.
      positives: optional ``[B, B]`` bool, ``positives[i, j]`` marks text ``j`` as
        a correct match for image ``i`` (e.g. same product id). The diagonal is
        always added. Row ``i``'s target is uniform over its positives, and
        column ``j``'s target uniform over its positives. ``None``: identity.

    Returns:
      Scalar float32 loss in nats.
    """
    batch = image_emb.shape[0]
    logits = _logits(image_emb, text_emb, logit_scale)
    pos = _positive_mask(batch, positives).astype(jnp.float32)
    row_targets = pos / jnp.sum(pos, axis=1, keepdims=True)
    col_targets = (pos / jnp.sum(pos, axis=0, keepdims=True)).T
    if label_smoothing:
        row_targets = optax.smooth_labels(row_targets, label_smoothing)
        col_targets = optax.smooth_labels(col_targets, label_smoothing)
    image_to_text = optax.softmax_cross_entropy(logits, row_targets)
    text_to_image = optax.softmax_cross_entropy(logits.T, col_targets)
    return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def sigmoid_contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    positives: jax.Array | None = None,
) -> jax.Array:
    """SigLIP's pairwise sigmoid loss.

    Every (image ``i``, text ``j``) pair is an independent binary problem with
    label ``+1`` for positives and ``-1`` otherwise:
    ``loss = -sum_ij log_sigmoid(label_ij * (scale * <x_i, y_j> + bias)) / B``.
    Dividing the sum over all ``B^2`` pairs by ``B`` (not ``B^2``) follows the
    SigLIP paper, so the loss is per image.

    Args:
      image_emb, text_emb: ``[B, D]`` float, L2-normalised.
      logit_scale: scalar multiplier.
      logit_bias: scalar bias (SigLIP initialises it at -10).
      positives: optional ``[B, B]`` bool of extra positives; the diagonal is
        always positive. ``None``: identity.

    Returns:
      Scalar float32 loss in nats per image.
    """
    batch = image_emb.shape[0]
    logits = _logits(image_emb, text_emb, logit_scale) + jnp.asarray(logit_bias, jnp.float32)
    labels = jnp.where(_positive_mask(batch, positives), 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / batch


# ----------------------------------------------------------------------------- ring losses
#
# Ring layout, shared by both losses. Device k starts with its own text chunk.
# At step s (0 <= s < n) it holds the chunk that started on device k - s and
# then passes it to k + 1, so after n steps every image chunk has met every text
# chunk once. Only step 0 contains positives (the local diagonal).
#
# The backward passes are written by hand (custom_vjp) rather than left to
# autodiff: differentiating the loop would store one [B/n, B/n] block (or one
# [B/n, D] text chunk with rematerialisation) per step, i.e. O(B^2/n) or
# O(B*D) per device, which is what the ring is meant to avoid. The hand-written
# backward recomputes each block and sends each text chunk's gradient around
# the ring together with the chunk, so it arrives home after n hops.


def _names(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _as_varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Marks ``x`` as device-varying over ``axis_name`` inside shard_map.

    Replicated (``P()``) scale/bias enter shard_map as invariant values; the
    custom VJPs below return per-device partial gradients, which are only legal
    for varying inputs. Casting first makes the cast's transpose (a psum) sum
    the partial gradients, which is the correct gradient of the replicated value.
    """
    varying = jax.typeof(x).manual_axis_type.varying
    missing = tuple(a for a in _names(axis_name) if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _shift(x: jax.Array, axis_name: AxisName, n: int) -> jax.Array:
    """Sends ``x`` from each device to the next one on the ring (linear index over ``axis_name``)."""
    return jax.lax.ppermute(x, axis_name, perm=[(k, (k + 1) % n) for k in range(n)])


def _dots(img: jax.Array, txt: jax.Array) -> jax.Array:
    """``[b, b]`` float32 ``img @ txt.T``."""
    return jnp.einsum("id,td->it", img, txt, preferred_element_type=jnp.float32)


def _block_grads(d_block, dots, img, txt_chunk, scale):
    """Given d(loss)/d(block logits) ``[b, b]``: contributions to d_img, d_txt_chunk, d_scale (float32)."""
    d_dots = scale * d_block
    return (d_dots @ txt_chunk.astype(jnp.float32),
            d_dots.T @ img.astype(jnp.float32),
            jnp.sum(d_block * dots))


def _cast_grads(grads, primals):
    return tuple(g.astype(p.dtype) for g, p in zip(grads, primals))


# --- sigmoid


def _sigmoid_labels(b: int, step: jax.Array) -> jax.Array:
    """``[b, b]`` float32 labels of the block met at ring step ``step``: +1 on the diagonal of step 0, else -1."""
    return jnp.where(jnp.eye(b, dtype=bool) & (step == 0), 1.0, -1.0)


def _ring_sigmoid_fwd(img, txt, scale, bias, axis_name):
    n = jax.lax.axis_size(axis_name)
    scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)

    def step(s, carry):
        txt_chunk, total = carry
        z = _sigmoid_labels(img.shape[0], s) * (scale32 * _dots(img, txt_chunk) + bias32)
        # The n-th shift brings the chunk home; it keeps the loop body uniform.
        return _shift(txt_chunk, axis_name, n), total - jnp.sum(jax.nn.log_sigmoid(z))

    total = jnp.zeros_like(img, shape=(), dtype=jnp.float32)
    _, total = jax.lax.fori_loop(0, n, step, (txt, total))
    return total, (img, txt, scale, bias)


def _ring_sigmoid_bwd(axis_name, res, g):
    img, txt, scale, bias = res
    n = jax.lax.axis_size(axis_name)
    scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)

    def step(s, carry):
        txt_chunk, d_txt_chunk, d_img, d_scale, d_bias = carry
        dots = _dots(img, txt_chunk)
        labels = _sigmoid_labels(img.shape[0], s)
        # d/dlogit of -log_sigmoid(label * logit) is -label * sigmoid(-label * logit).
        d_block = -g * labels * jax.nn.sigmoid(-labels * (scale32 * dots + bias32))
        di, dt, ds = _block_grads(d_block, dots, img, txt_chunk, scale32)
        # Each chunk's gradient travels with the chunk and is home after n shifts.
        return (_shift(txt_chunk, axis_name, n), _shift(d_txt_chunk + dt, axis_name, n),
                d_img + di, d_scale + ds, d_bias + jnp.sum(d_block))

    zero = jnp.zeros_like(img, shape=(), dtype=jnp.float32)
    init = (txt, jnp.zeros_like(txt, dtype=jnp.float32), jnp.zeros_like(img, dtype=jnp.float32), zero, zero)
    _, d_txt, d_img, d_scale, d_bias = jax.lax.fori_loop(0, n, step, init)
    return _cast_grads((d_img, d_txt, d_scale, d_bias), (img, txt, scale, bias))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid_sum(img, txt, scale, bias, axis_name):
    """This device's image rows' summed SigLIP loss over all global texts (float32, varying)."""
    return _ring_sigmoid_fwd(img, txt, scale, bias, axis_name)[0]


_ring_sigmoid_sum.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def ring_sigmoid_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    axis_name: AxisName,
) -> jax.Array:
    """Global-batch SigLIP loss, computed chunk by chunk round a device ring.

    Must be called inside ``jax.shard_map`` with the batch sharded over
    ``axis_name`` (a mesh axis name or a tuple of them, ring order = their
    linearised index). Equals `sigmoid_contrastive_loss` on the gathered
    ``[B, D]`` arrays (diagonal positives only), B = n * b.

    Args:
      image_emb, text_emb: ``[b, D]`` float, this device's rows (b = B / n).
      logit_scale, logit_bias: scalars, replicated (or varying; any is fine).
      axis_name: the axis (or axes) the batch is sharded over.

    Returns:
      Scalar float32, the global loss (sum over all B^2 pairs / B), identical on
      every device. Memory per device: one ``[b, b]`` block plus O(b * D) chunks,
      in both the forward and the backward pass.
    """
    n = jax.lax.axis_size(axis_name)
    local = _ring_sigmoid_sum(image_emb, text_emb, _as_varying(jnp.asarray(logit_scale), axis_name),
                              _as_varying(jnp.asarray(logit_bias), axis_name), axis_name)
    return jax.lax.psum(local, axis_name) / (n * image_emb.shape[0])


# --- softmax


def _ring_softmax_fwd(img, txt, scale, axis_name):
    n = jax.lax.axis_size(axis_name)
    scale32 = scale.astype(jnp.float32)

    def step(s, carry):
        txt_chunk, col_lse_chunk, row_lse = carry
        block = scale32 * _dots(img, txt_chunk)
        # Running log-sum-exps: rows accumulate here, each text chunk's column
        # log-sum-exp travels with the chunk and is complete when it gets home.
        row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(block, axis=1))
        col_lse_chunk = jnp.logaddexp(col_lse_chunk, jax.nn.logsumexp(block, axis=0))
        return _shift(txt_chunk, axis_name, n), _shift(col_lse_chunk, axis_name, n), row_lse

    neg_inf = jnp.full_like(img[:, 0], -jnp.inf, dtype=jnp.float32)
    _, col_lse, row_lse = jax.lax.fori_loop(0, n, step, (txt, neg_inf, neg_inf))
    positive = scale32 * jnp.einsum("id,id->i", img, txt, preferred_element_type=jnp.float32)
    total = jnp.sum(row_lse) + jnp.sum(col_lse) - 2.0 * jnp.sum(positive)
    return total, (img, txt, scale, row_lse, col_lse)


def _ring_softmax_bwd(axis_name, res, g):
    img, txt, scale, row_lse, col_lse = res
    n = jax.lax.axis_size(axis_name)
    scale32 = scale.astype(jnp.float32)

    def step(s, carry):
        txt_chunk, col_lse_chunk, d_txt_chunk, d_img, d_scale = carry
        dots = _dots(img, txt_chunk)
        block = scale32 * dots
        d_block = g * (jnp.exp(block - row_lse[:, None]) + jnp.exp(block - col_lse_chunk[None, :]))
        # The positive logits (-2 * diagonal of step 0's block) are subtracted in both directions.
        d_block = d_block - 2.0 * g * (jnp.eye(img.shape[0]) * (s == 0))
        di, dt, ds = _block_grads(d_block, dots, img, txt_chunk, scale32)
        return (_shift(txt_chunk, axis_name, n), _shift(col_lse_chunk, axis_name, n),
                _shift(d_txt_chunk + dt, axis_name, n), d_img + di, d_scale + ds)

    init = (txt, col_lse, jnp.zeros_like(txt, dtype=jnp.float32), jnp.zeros_like(img, dtype=jnp.float32),
            jnp.zeros_like(img, shape=(), dtype=jnp.float32))
    _, _, d_txt, d_img, d_scale = jax.lax.fori_loop(0, n, step, init)
    return _cast_grads((d_img, d_txt, d_scale), (img, txt, scale))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_softmax_sum(img, txt, scale, axis_name):
    """This device's share of the summed two-way CLIP loss (float32, varying): its rows and its columns."""
    return _ring_softmax_fwd(img, txt, scale, axis_name)[0]


_ring_softmax_sum.defvjp(_ring_softmax_fwd, _ring_softmax_bwd)


def ring_softmax_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    *,
    axis_name: AxisName,
) -> jax.Array:
    """Global-batch CLIP softmax loss with streamed (online) log-sum-exps round a device ring.

    Must be called inside ``jax.shard_map`` with the batch sharded over
    ``axis_name``. Equals `softmax_contrastive_loss` (no label smoothing, diagonal
    positives) on the gathered ``[B, D]`` arrays.

    Args:
      image_emb, text_emb: ``[b, D]`` float, this device's rows (b = B / n).
      logit_scale: scalar inverse temperature.
      axis_name: the axis (or axes) the batch is sharded over.

    Returns:
      Scalar float32 global mean loss, identical on every device. One ring pass
      computes both directions: image rows' log-sum-exps accumulate locally and
      text columns' travel with their chunk. Memory per device: one ``[b, b]``
      block plus O(b * D).
    """
    n = jax.lax.axis_size(axis_name)
    local = _ring_softmax_sum(image_emb, text_emb, _as_varying(jnp.asarray(logit_scale), axis_name), axis_name)
    return jax.lax.psum(local, axis_name) / (2 * n * image_emb.shape[0])


# ----------------------------------------------------------------------------- shard_map wrapper


def make_ring_loss(
    mesh: jax.sharding.Mesh, loss_name: str, data_axes: Sequence[str] = ("data",)
) -> Callable[..., jax.Array]:
    """A ring loss wrapped in ``jax.shard_map``, callable on globally sharded arrays.

    Args:
      mesh: the device mesh.
      loss_name: ``"sigmoid"`` or ``"softmax"``.
      data_axes: mesh axes the batch dimension is sharded over; several axes
        (e.g. ``("data", "fsdp")``) form one ring over their product.

    Returns:
      ``fn(image_emb, text_emb, logit_scale, logit_bias=None) -> scalar`` for
      ``[B, D]`` embeddings (B divisible by the ring size) and scalar
      scale/bias; ``logit_bias`` is ignored by the softmax loss. Use it inside
      ``jax.jit`` (it also works eagerly).
    """
    axes = tuple(data_axes)
    axis_name = axes[0] if len(axes) == 1 else axes
    emb_spec = P(axis_name)
    if loss_name == "sigmoid":
        inner = partial(ring_sigmoid_loss, axis_name=axis_name)
        sharded = jax.shard_map(inner, mesh=mesh, in_specs=(emb_spec, emb_spec, P(), P()), out_specs=P())
        return lambda image_emb, text_emb, logit_scale, logit_bias: sharded(
            image_emb, text_emb, logit_scale, logit_bias)
    if loss_name == "softmax":
        inner = partial(ring_softmax_loss, axis_name=axis_name)
        sharded = jax.shard_map(inner, mesh=mesh, in_specs=(emb_spec, emb_spec, P()), out_specs=P())
        return lambda image_emb, text_emb, logit_scale, logit_bias=None: sharded(image_emb, text_emb, logit_scale)
    raise ValueError(f"unknown loss {loss_name!r}; expected 'sigmoid' or 'softmax'")


def hard_negative_loss(image_emb: jax.Array, text_emb: jax.Array, negative_emb: jax.Array, mask: jax.Array,
                       logit_scale: jax.Array) -> jax.Array:
    """A two-way softmax per image between its own title and one hard-negative title (NegCLIP's idea,
    kept per row so it needs no cross-device communication under any sharding).

    Args:
      image_emb, text_emb, negative_emb: ``[B, D]`` float, L2-normalised; row ``i`` of
        ``negative_emb`` is a wrong title for image ``i`` (e.g. its colour swapped).
      mask: ``[B]`` bool, rows that have a negative.
      logit_scale: scalar, the contrastive loss's inverse temperature.

    Returns:
      Scalar float32 in nats: ``sum_i mask_i * softplus(scale * (cos(i, neg_i) - cos(i, pos_i))) / B``.
      Dividing by B (not by the masked count) keeps a per-device mean followed by a pmean exact.
    """
    scale = jnp.asarray(logit_scale, jnp.float32)
    pos = jnp.sum(image_emb.astype(jnp.float32) * text_emb.astype(jnp.float32), axis=-1)
    neg = jnp.sum(image_emb.astype(jnp.float32) * negative_emb.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.where(mask, jax.nn.softplus(scale * (neg - pos)), 0.0))


def batch_positives(batch: dict) -> jax.Array:
    """[B, B] bool: pairs that are both correct matches (same product id or identical title)."""
    same_id = batch["ids"][:, None] == batch["ids"][None, :]
    ids = batch["token_ids"]
    same_title = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
    return same_id | same_title
