"""Fusion encoder (ALBEF / BLIP style) with an image-text matching (ITM) head.

The text tower's token states attend to each other (self-attention over the valid
tokens, bidirectional), then to the image tower's patch tokens taken before pooling
(cross-attention), then pass an MLP; after `depth` such pre-LN blocks, a linear
head on the first token gives two logits, [no match, match]. The two-tower
embeddings stay what they were: the fusion encoder only re-scores candidate pairs.

Shapes: N pairs, L text tokens, S image tokens, Wt / Wi the towers' widths,
W the fusion width.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prodclip.models import layers
from prodclip.models.text import mask_from_valid


class FusionBlock(nnx.Module):
    """Pre-LN: x + self_attn(ln(x)), x + cross_attn(ln(x), image tokens), x + mlp(ln(x))."""

    def __init__(self, width: int, image_width: int, num_heads: int, mlp_ratio: float, rngs: nnx.Rngs, *,
                 activation: str = "gelu", dtype=jnp.float32):
        self.norm1 = layers.layer_norm(width, rngs, dtype)
        self.self_attn = layers.Attention(width, num_heads, rngs, dtype=dtype)
        self.norm2 = layers.layer_norm(width, rngs, dtype)
        self.cross_attn = layers.Attention(width, num_heads, rngs, context_width=image_width, dtype=dtype)
        self.norm3 = layers.layer_norm(width, rngs, dtype)
        self.mlp = layers.Mlp(width, int(width * mlp_ratio), rngs, activation=activation, dtype=dtype)

    def __call__(self, x: jax.Array, image_tokens: jax.Array, self_mask: jax.Array) -> jax.Array:
        """x: [N, L, W]; image_tokens: [N, S, Wi]; self_mask: bool [N, 1, L, L]. Returns [N, L, W]."""
        x = x + self.self_attn(self.norm1(x), mask=self_mask)
        x = x + self.cross_attn(self.norm2(x), context=image_tokens)
        return x + self.mlp(self.norm3(x))


class FusionEncoder(nnx.Module):
    """Text token states (projected to `width`) -> `depth` fusion blocks -> LayerNorm -> ITM head on token 0
    (pooling "first") or on the mean of the valid tokens (pooling "mean")."""

    def __init__(self, *, text_width: int, image_width: int, width: int, depth: int, num_heads: int,
                 rngs: nnx.Rngs, mlp_ratio: float = 4.0, activation: str = "gelu", dtype=jnp.float32,
                 remat: bool = False, pooling: str = "first", itc_residual: bool = False):
        if pooling not in ("first", "mean"):
            raise ValueError(f"fusion pooling must be 'first' or 'mean', got {pooling!r}")
        self.dtype = dtype
        self.remat = remat
        self.pooling = pooling
        self.itc_residual = itc_residual
        if itc_residual:  # match log-odds = head + gain * two-tower logit + bias
            self.itc_gain = nnx.Param(jnp.ones((), jnp.float32))
            self.itc_bias = nnx.Param(jnp.zeros((), jnp.float32))
        self.text_in = layers.dense(text_width, width, rngs, dtype=dtype)
        self.blocks = nnx.List([FusionBlock(width, image_width, num_heads, mlp_ratio, rngs, activation=activation,
                                            dtype=dtype) for _ in range(depth)])
        self.norm = layers.layer_norm(width, rngs, dtype)
        self.itm_head = layers.dense(width, 2, rngs, dtype=dtype)

    def __call__(self, text_tokens: jax.Array, text_valid: jax.Array, image_tokens: jax.Array,
                 itc_logits: jax.Array | None = None) -> jax.Array:
        """text_tokens [N, L, Wt], text_valid [N, L] bool, image_tokens [N, S, Wi] -> ITM logits [N, 2] float32.

        Logit 1 is "match", logit 0 "no match". itc_logits [N]: the pairs' two-tower logits
        (logit_scale x cosine), needed with itc_residual and treated as constants: the head
        then learns a correction to the two-tower score instead of the whole match decision.
        """
        x = self.text_in(text_tokens.astype(self.dtype))
        image_tokens = image_tokens.astype(self.dtype)
        mask = mask_from_valid(text_valid, causal=False)
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda blk, h, img, m: blk(h, img, m))(block, x, image_tokens, mask)
            else:
                x = block(x, image_tokens, mask)
        x = self.norm(x)
        if self.pooling == "mean":
            weights = text_valid.astype(x.dtype)[..., None]
            pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        else:
            pooled = x[:, 0]
        logits = self.itm_head(pooled).astype(jnp.float32)
        if not self.itc_residual:
            return logits
        if itc_logits is None:
            raise ValueError("model.fusion.itc_residual=True scores a pair from its two-tower logit too: "
                             "pass itc_logits")
        offset = self.itc_gain.value * jax.lax.stop_gradient(itc_logits.astype(jnp.float32)) + self.itc_bias.value
        return logits + jnp.stack([jnp.zeros_like(offset), offset], axis=-1)


def pool_image_tokens(tokens: jax.Array, grid: int) -> jax.Array:
    """[N, S, W] tokens of a square h x h map (S = h * h, row-major) -> [N, grid * grid, W], the means of
    grid x grid equal blocks. grid 0 returns the tokens as they are.

    The fusion encoder's cross-attention cost grows with S, and so does a cache of the tokens: at
    192 px the EfficientNet's 6 x 6 map pooled to 3 x 3 is a quarter of both.
    """
    if not grid:
        return tokens
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1] or side % grid:
        raise ValueError(f"model.fusion.image_grid={grid} needs a square map whose side it divides; "
                         f"got {tokens.shape[1]} tokens")
    block = side // grid
    return einops.reduce(tokens, "n (g1 p1 g2 p2) w -> n (g1 g2) w", "mean", g1=grid, p1=block, g2=grid, p2=block)


def build_fusion(config: ml_collections.ConfigDict, *, image_width: int, text_width: int,
                 rngs: nnx.Rngs, dtype=jnp.float32) -> FusionEncoder | None:
    """The fusion encoder of `config.model.fusion`, or None when it is disabled (no params at all)."""
    f = config.model.fusion
    if not f.enabled:
        return None
    return FusionEncoder(text_width=text_width, image_width=image_width, width=f.width, depth=f.depth,
                         num_heads=f.num_heads, mlp_ratio=config.model.text.mlp_ratio,
                         activation=config.model.text.activation, dtype=dtype, remat=config.model.remat,
                         pooling=f.pooling, itc_residual=f.itc_residual, rngs=rngs)


def itm_logits(model, image_tokens: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
               itc_logits: jax.Array | None = None) -> jax.Array:
    """ITM logits [N, 2] float32 of N (image, text) pairs of a TwoTower `model` with a fusion encoder.

    image_tokens: [N, S, Wi] the image tower's patch tokens; text_tokens: [N, L, Wt] the text
    tower's token states; text_mask: [N, L] bool valid text tokens (`text_tower.valid_tokens`);
    itc_logits: [N] the pairs' logit_scale x cosine (used with model.fusion.itc_residual).
    """
    if model.fusion is None:
        raise ValueError("this model has no fusion encoder (model.fusion.enabled=False): no ITM scores")
    return model.fusion(text_tokens, text_mask, image_tokens, itc_logits)


def match_log_odds(logits: jax.Array) -> jax.Array:
    """[N, 2] ITM logits -> [N] log p(match) / p(no match), the re-ranking score."""
    return logits[..., 1] - logits[..., 0]
