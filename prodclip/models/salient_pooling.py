"""Saliency-weighted pooling of a CNN's maps and of its input's colours (EfficientNet `gap_stages_salient`).

A plain spatial mean mixes the product with its background. Here each location of the final map
weighs by its share of that map's channel norm (where the last stage responds), and the weights
are carried to any earlier map or to the pixels by linear interpolation between the *pixel
centres* of the cells. With TF 'SAME' padding (the odd pixel after) a stride-2 layer's cell j is
centred on input pixel 2j + 1 for kernels 3 and 5, not on 2j + 0.5 as an image resize assumes;
over the five stride-2 layers of an EfficientNet that is half a final cell, so the centres are
computed from the layers' actual padding (`conv_centres`).

The weights are a fixed attention map: no gradient flows through them (the tower may be trained;
the norm has no gradient where a location is all zero).

Shapes: B batch; h, w a map's cells; H, W pixels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prodclip.models import convolution

COLOUR_BINS = 6  # levels per RGB channel: a 6 x 6 x 6 = 216-bin colour histogram


def saliency(final_map: jax.Array) -> jax.Array:
    """final_map [B, h, w, C] -> [B, h, w] weights summing to 1 per image, without gradient: each
    location's share of the channels' L2 norm (uniform where the whole map is zero)."""
    norm = jnp.linalg.norm(jax.lax.stop_gradient(final_map).astype(jnp.float32), axis=-1)
    total = norm.sum(axis=(1, 2), keepdims=True)
    uniform = jnp.full_like(norm, 1.0 / (norm.shape[1] * norm.shape[2]))
    return jnp.where(total > 0, norm / jnp.where(total > 0, total, 1.0), uniform)


def conv_centres(size: int, convs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pixel coordinates ([n] float, pixel i centred at i) of the cells of the map that convs
    [(kernel, stride), ...], applied in order with TF 'SAME' padding, make of an axis of `size` pixels."""
    scale, offset, n = 1.0, 0.0, size
    for kernel, stride in convs:
        before, _ = convolution.same_padding(n, kernel, stride)
        offset += scale * ((kernel - 1) / 2 - before)
        scale *= stride
        n = -(-n // stride)
    return scale * np.arange(n) + offset


def interpolation_matrix(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """[len(target), len(source)] linear-interpolation weights from values at the increasing coordinates
    `source` to the coordinates `target`, clamped to the edge values outside them."""
    position = np.interp(target, source, np.arange(len(source), dtype=np.float64))
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(source) - 1)
    frac = position - low
    matrix = np.zeros((len(target), len(source)), np.float32)
    rows = np.arange(len(target))
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def carried_weights(weights: jax.Array, image_hw: tuple[int, int], source_convs, target_convs) -> jax.Array:
    """weights [B, h, w] on the map that source_convs make of an image of image_hw pixels -> [B, h', w']
    on the map that target_convs make of it (`[]`: the pixels), interpolated between the cells' pixel
    centres and summing to 1 per image."""
    rows, cols = (interpolation_matrix(conv_centres(n, target_convs), conv_centres(n, source_convs))
                  for n in image_hw)
    carried = jnp.einsum("ih,bhw,jw->bij", rows, weights, cols)
    return carried / jnp.maximum(carried.sum(axis=(1, 2), keepdims=True), 1e-12)


def colour_histogram(pixels: jax.Array, weights: jax.Array, bins: int = COLOUR_BINS) -> jax.Array:
    """pixels [B, H, W, 3] on a 0..255 scale, weights [B, H, W] -> [B, bins ** 3]: the weighted share of
    each RGB cell (bins levels per channel, red slowest), summing to the weights' sum."""
    level = jnp.clip((pixels.astype(jnp.float32) * (bins / 256.0)).astype(jnp.int32), 0, bins - 1)
    cell = (level[..., 0] * bins + level[..., 1]) * bins + level[..., 2]
    batch = pixels.shape[0]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, cell[0].size))
    return jnp.zeros((batch, bins ** 3), jnp.float32).at[rows, cell.reshape(batch, -1)].add(
        weights.reshape(batch, -1).astype(jnp.float32))


def salient_parts(stage_maps: Sequence[jax.Array], stage_convs: Sequence[Sequence[tuple[int, int]]],
                  final_map: jax.Array, final_convs, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two salient parts of a CNN's pooled feature.

    stage_maps [[B, h_i, w_i, C_i], ...], each made by stage_convs[i] ([(kernel, stride), ...] from the
    pixels); final_map [B, h, w, C] made by final_convs; pixels [B, H, W, 3] on a 0..255 scale.
    Returns (the stage maps averaged with the final map's saliency as weights [B, sum C_i], the
    pixels' colour histogram under the same weights [B, COLOUR_BINS ** 3], summing to 1).
    """
    weights = saliency(final_map)
    image_hw = (pixels.shape[1], pixels.shape[2])
    stages = [jnp.einsum("bhwc,bhw->bc", m.astype(jnp.float32), carried_weights(weights, image_hw, final_convs, convs))
              for m, convs in zip(stage_maps, stage_convs)]
    colours = colour_histogram(pixels, carried_weights(weights, image_hw, final_convs, []))
    return jnp.concatenate(stages, axis=-1), colours
