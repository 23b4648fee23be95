"""ViT image tower: patches -> pre-LN transformer -> pooled, projected embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from prodclip.models import layers

# ImageNet statistics on a 0..255 scale; the model normalises its own uint8 input.
PIXEL_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
PIXEL_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# OpenAI CLIP's statistics on a 0..255 scale (its preprocessor_config.json, times 255).
CLIP_PIXEL_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_PIXEL_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
# TF's EfficientNet-Lite preprocessing, (x - 127) / 128: what its ImageNet weights were trained with.
TF_LITE_PIXEL_STATS = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
PIXEL_STATS = {"imagenet": (PIXEL_MEAN, PIXEL_STD), "clip": (CLIP_PIXEL_MEAN, CLIP_PIXEL_STD), "tf_lite": TF_LITE_PIXEL_STATS}


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, [grid_h * grid_w, width] float32."""
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}")
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class ConvStem(nnx.Module):
    """Convolutional patch embedding (after Xiao et al. 2021, "Early convolutions help transformers see better").

    A patchify convolution (kernel = stride = patch_size / 2**depth; skipped when that is 1),
    then `depth` 3x3 stride-2 convolutions, each conv followed by LayerNorm over channels and
    GELU, with channels doubling up to `width`, then a 1x1 convolution to `width`. It yields
    the same token grid as the linear patchify stem, but edges and shapes that straddle patch
    borders reach the transformer as features. Starting with a patchify keeps the full-resolution
    activations (the costly part on CPU) out of the stem.
    """

    def __init__(self, patch_size: int, width: int, rngs: nnx.Rngs, *, depth: int = 2, dtype=jnp.float32):
        if depth < 1 or patch_size % 2 ** depth:
            raise ValueError(f"a conv stem of depth {depth} needs patch_size divisible by {2 ** depth}, got {patch_size}")
        first = patch_size // 2 ** depth
        shapes = ([(first, first)] if first > 1 else []) + [(3, 2)] * depth  # (kernel, stride) per conv
        channels = [max(width // 2 ** (len(shapes) - 1 - i), 8) for i in range(len(shapes))]
        ins = [3, *channels[:-1]]
        self.convs = nnx.List([nnx.Conv(i, o, (k, k), strides=s, padding="SAME" if k > s else "VALID",
                                        dtype=dtype, rngs=rngs) for i, o, (k, s) in zip(ins, channels, shapes)])
        self.norms = nnx.List([nnx.LayerNorm(o, epsilon=1e-5, dtype=dtype, rngs=rngs) for o in channels])
        self.out = nnx.Conv(channels[-1], width, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, S, 3] normalised pixels -> [B, (S/patch)², width]."""
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.gelu(norm(conv(x)), approximate=False)
        return rearrange(self.out(x), "b h w c -> b (h w) c")


class VisionTransformer(nnx.Module):
    """Image tower.

    Args:
      image_size, patch_size: square input side and patch side, in pixels.
      width, depth, num_heads, mlp_ratio: transformer shape.
      embed_dim: output embedding size.
      pooling: 'cls' (class token), 'gap' (mean of patch tokens) or 'map' (attention pooling).
      posemb: 'sincos2d' (fixed) or 'learn'.
      pre_norm: a LayerNorm on the tokens before the blocks (as OpenAI CLIP).
      patch_bias: a bias in the patch embedding (OpenAI CLIP has none).
      stem: 'patch' (a linear map of each flattened patch, as ViT and CLIP) or 'conv' (ConvStem with `stem_depth` 3x3 stride-2 convs).
      pixel_mean, pixel_std: per-channel statistics on a 0..255 scale.
    """

    def __init__(
        self, *, image_size, patch_size, width, depth, num_heads, mlp_ratio, embed_dim, rngs: nnx.Rngs,
        pooling="gap", posemb="sincos2d", pre_norm=False, activation="gelu", proj_bias=False,
        pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, dtype=jnp.float32, remat=False, patch_bias=True,
        stem="patch", stem_depth=2,
    ):
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.pooling = pooling
        self.dtype = dtype
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.width = width
        if stem == "conv":
            self.conv_stem = ConvStem(patch_size, width, rngs, depth=stem_depth, dtype=dtype)
        else:
            self.patch_embed = layers.dense(patch_size * patch_size * 3, width, rngs, dtype=dtype, use_bias=patch_bias)
        num_tokens = self.grid * self.grid + (1 if pooling == "cls" else 0)
        if posemb == "learn":
            self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (num_tokens, width)))
        else:
            self.pos_embed = None  # fixed sincos table, built in __call__ as a compile-time constant
        if pooling == "cls":
            self.cls_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (width,)))
        self.pre_norm = layers.layer_norm(width, rngs, dtype) if pre_norm else None
        self.encoder = layers.Encoder(
            width, depth, num_heads, mlp_ratio, rngs, activation=activation, dtype=dtype, remat=remat
        )
        self.map_head = (
            layers.AttentionPool(width, num_heads, mlp_ratio, rngs, activation=activation, dtype=dtype)
            if pooling == "map" else None
        )
        self.projection = layers.dense(width, embed_dim, rngs, dtype=dtype, use_bias=proj_bias)

    def _position_embedding(self) -> jax.Array:
        if self.pos_embed is not None:
            return self.pos_embed[...]
        table = sincos_2d(self.grid, self.grid, self.width)
        if self.pooling == "cls":
            table = np.concatenate([np.zeros((1, self.width), np.float32), table])
        return jnp.asarray(table)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: [B, S, S, 3], uint8 or float on a 0..255 scale.

        Returns (embedding [B, embed_dim] not normalised, patch tokens [B, grid², width]).
        """
        x = (images.astype(jnp.float32) - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
        if hasattr(self, "conv_stem"):
            x = self.conv_stem(x.astype(self.dtype))
        else:
            p = self.patch_size
            x = rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p).astype(self.dtype)
            x = self.patch_embed(x)
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self._position_embedding().astype(x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.encoder(x)
        if self.pooling == "cls":
            pooled, patches = x[:, 0], x[:, 1:]
        elif self.pooling == "map":
            pooled, patches = self.map_head(x), x
        else:
            pooled, patches = x.mean(axis=1), x
        return self.projection(pooled), patches
