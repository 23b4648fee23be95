"""BERT text tower: word + position + token-type embeddings -> post-LN encoder -> [CLS] or mean pooling.

Numerically the encoder of `transformers.BertModel` (tests/test_bert.py checks it within 1e-4),
so pretrained BERT-family weights (e.g. all-MiniLM-L6-v2) load into it with
prodclip/convert_bert.py. Differences from the CLIP-style text tower (text.py): the
LayerNorm comes *after* each residual sum (post-LN), the embeddings are normalised before
the first block, attention is always bidirectional with padding masked, and there is no final
LayerNorm. Dropout is not implemented (prodclip trains towers without it).

Shapes: B batch, L tokens, W width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prodclip.models import layers
from prodclip.models.text import mask_from_valid


def valid_mean_layers(mean_layers, depth: int) -> bool:
    """Whether `mean_layers` are increasing integer layer indices in 0..depth-1 (0: the embeddings)."""
    return (all(isinstance(i, int) and 0 <= i < depth for i in mean_layers)
            and list(mean_layers) == sorted(set(mean_layers)))


def pooled_width(width: int, mean_layers) -> int:
    """Width of the pooled feature: the pooled state, then one token mean per entry of `mean_layers`."""
    return width * (1 + len(mean_layers))


def _layer_norm(width, eps, rngs, dtype):
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)


class PostLNBlock(nnx.Module):
    """BERT layer: x = ln1(x + attn(x)); x = ln2(x + mlp(x))."""

    def __init__(self, width, num_heads, mlp_ratio, eps, rngs, *, activation="gelu", dtype=jnp.float32):
        self.attn = layers.Attention(width, num_heads, rngs, dtype=dtype)
        self.norm1 = _layer_norm(width, eps, rngs, dtype)
        self.mlp = layers.Mlp(width, int(round(width * mlp_ratio)), rngs, activation=activation, dtype=dtype)
        self.norm2 = _layer_norm(width, eps, rngs, dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.norm1(x + self.attn(x, mask=mask))
        return self.norm2(x + self.mlp(x))


class BertTextTower(nnx.Module):
    """Text tower with BERT's architecture.

    Args:
      vocab_size, width, depth, num_heads, mlp_ratio: encoder shape (mlp width = width * mlp_ratio).
      embed_dim: output embedding size.
      pooling: 'cls' (the first token's final state) or 'mean' (over non-pad tokens).
      pad_id: the padding id; padding keys are masked and left out of mean pooling.
      mean_layers: earlier layers (0: the normalised embeddings, i: block i's output, i < depth) whose
        token means follow the pooled state, L2-normalised together and scaled to its norm: the
        lexical detail (a colour, a gender word) that a sentence encoder's last layer blurs.
      type_vocab_size, max_positions, layer_norm_eps: BERT's config fields.
      projection: a dense map width -> embed_dim after pooling; False: the pooled state is the
        embedding (a pretrained sentence encoder's own space; embed_dim must equal width).
    """

    def __init__(self, *, vocab_size, width, depth, num_heads, mlp_ratio, embed_dim, rngs: nnx.Rngs, pooling="cls",
                 pad_id=0, type_vocab_size=2, max_positions=512, layer_norm_eps=1e-12, activation="gelu",
                 projection=True, proj_bias=False, dtype=jnp.float32, remat=False, mean_layers=()):
        if not valid_mean_layers(mean_layers, depth):
            raise ValueError(f"mean_layers {tuple(mean_layers)} must be increasing layer indices below depth {depth}")
        self.pooling = pooling
        self.mean_layers = tuple(int(i) for i in mean_layers)
        self.pad_id = pad_id
        self.dtype = dtype
        self.remat = remat
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Param(init(rngs.params(), (max_positions, width)))
        self.type_embed = nnx.Param(init(rngs.params(), (type_vocab_size, width)))
        self.embed_norm = _layer_norm(width, layer_norm_eps, rngs, dtype)
        self.blocks = nnx.List([PostLNBlock(width, num_heads, mlp_ratio, layer_norm_eps, rngs, activation=activation,
                                            dtype=dtype) for _ in range(depth)])
        self.projection = (layers.dense(pooled_width(width, self.mean_layers), embed_dim, rngs, dtype=dtype,
                                        use_bias=proj_bias) if projection else None)

    def valid_tokens(self, token_ids: jax.Array) -> jax.Array:
        """[B, L] bool: the tokens attention reads (everything but padding)."""
        return token_ids != self.pad_id

    def states_before(self, token_ids: jax.Array, block: int,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """token_ids: [B, L] int32 padded with pad_id -> [B, L, width]: the token states entering
        `blocks[block]` (block = depth: the final states). What a text cache holds when only the
        blocks from `block` on train (optim.unlock_text_blocks)."""
        length = token_ids.shape[1]
        types = jnp.zeros_like(token_ids) if token_type_ids is None else token_type_ids
        x = (self.token_embed(token_ids) + self.pos_embed[...][:length][None]
             + jnp.take(self.type_embed[...], types, axis=0))
        x = self.embed_norm(x.astype(self.dtype))
        return self.run_blocks(x, token_ids, 0, block)

    def run_blocks(self, x: jax.Array, token_ids: jax.Array, start: int, stop: int) -> jax.Array:
        """x [B, L, width], the states entering blocks[start] -> the states leaving blocks[stop - 1]."""
        mask = mask_from_valid(self.valid_tokens(token_ids), causal=False)
        for block in self.blocks[start:stop]:
            x = nnx.remat(lambda blk, h, m: blk(h, m))(block, x, mask) if self.remat else block(x, mask)
        return x

    def token_mean(self, x: jax.Array, token_ids: jax.Array) -> jax.Array:
        """x [B, L, width] -> [B, width]: the mean over the non-pad tokens."""
        weights = self.valid_tokens(token_ids)[..., None].astype(x.dtype)
        return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)

    def from_states(self, states: jax.Array, token_ids: jax.Array, block: int,
                    layer_means: list[jax.Array] = ()) -> tuple[jax.Array, jax.Array]:
        """states [B, L, width] entering `blocks[block]` (`states_before`), token_ids [B, L] -> what
        `__call__` returns: the blocks from `block` on, then pooling and the projection.
        layer_means: the `token_mean`s [B, width] of the `mean_layers` (all below `block`)."""
        if len(layer_means) != len(self.mean_layers):
            raise ValueError(f"from_states needs the {len(self.mean_layers)} token means of mean_layers "
                             f"{self.mean_layers}; got {len(layer_means)}")
        x = self.run_blocks(states.astype(self.dtype), token_ids, block, len(self.blocks))
        pooled = x[:, 0] if self.pooling == "cls" else self.token_mean(x, token_ids)
        pooled = layers.append_scaled(pooled, list(layer_means))
        return (pooled if self.projection is None else self.projection(pooled)), x

    def __call__(self, token_ids: jax.Array, token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """token_ids: [B, L] int32 padded with pad_id; token_type_ids: [B, L] int32 (default all 0).

        Returns (embedding [B, embed_dim] not normalised (without a projection: [B, `pooled_width`], the
        pooled state and the mean_layers' means), token states [B, L, width]).
        """
        x = self.states_before(token_ids, 0, token_type_ids)
        means, block = [], 0
        for layer in self.mean_layers:
            x = self.run_blocks(x, token_ids, block, layer)
            means.append(self.token_mean(x, token_ids).astype(jnp.float32))
            block = layer
        return self.from_states(x, token_ids, block, means)


def build_bert(config, vocab_size: int, pad_id: int, dtype, rngs: nnx.Rngs) -> BertTextTower:
    """The BERT text tower of `config.model` (model.text.kind='bert')."""
    from prodclip import config as config_lib

    m = config.model
    b = m.text.bert
    return BertTextTower(
        vocab_size=vocab_size, mlp_ratio=m.text.mlp_ratio, embed_dim=m.embed_dim, pooling=m.text.pooling,
        pad_id=pad_id, type_vocab_size=b.type_vocab_size, max_positions=b.max_positions,
        layer_norm_eps=b.layer_norm_eps, activation=m.text.activation, projection=b.projection,
        proj_bias=m.text.proj_bias, dtype=dtype, remat=m.remat, rngs=rngs, mean_layers=tuple(b.mean_layers),
        **config_lib.tower_dims(m.text, config_lib.TEXT_PRESETS))
