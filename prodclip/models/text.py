"""Text tower: token + position embedding -> transformer -> pooled, projected embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prodclip.models import layers


def attention_mask(token_ids: jax.Array, pad_id: int, causal: bool) -> jax.Array:
    """Boolean mask [B, 1, L, L]: True where query i may attend to key j.

    Padding keys are masked out. A padding query still sees key 0, so no softmax row is
    empty (its output is never pooled).
    """
    return mask_from_valid(token_ids != pad_id, causal)


def mask_from_valid(valid: jax.Array, causal: bool) -> jax.Array:
    """Boolean mask [B, 1, L, L] from valid tokens [B, L] bool (see attention_mask)."""
    valid = valid.at[:, 0].set(True)
    mask = valid[:, None, None, :]
    if causal:
        length = valid.shape[1]
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    return mask


def eot_positions(token_ids: jax.Array, pad_id: int) -> jax.Array:
    """Index of the last non-pad token of each row, [B] int32 (the end-of-text token)."""
    lengths = jnp.sum(token_ids != pad_id, axis=1)
    return jnp.maximum(lengths - 1, 0).astype(jnp.int32)


def end_positions(token_ids: jax.Array, pad_id: int, eot_rule: str, eos_id: int) -> jax.Array:
    """Where 'eot' pooling reads, [B] int32.

    'last_nonpad': the last non-pad token. 'eos_id': the first occurrence of `eos_id`
    (position 0 if absent), transformers' CLIP rule, which also works when the pad
    token is the end token. 'argmax': the largest id, transformers' rule for legacy
    CLIP configs whose eos_token_id is 2 (the end token has the largest id).
    """
    if eot_rule == "last_nonpad":
        return eot_positions(token_ids, pad_id)
    if eot_rule == "eos_id":
        return jnp.argmax(token_ids == eos_id, axis=1).astype(jnp.int32)
    if eot_rule == "argmax":
        return jnp.argmax(token_ids, axis=1).astype(jnp.int32)
    raise ValueError(f"unknown eot_rule {eot_rule!r}; valid: last_nonpad, eos_id, argmax")


class TextTransformer(nnx.Module):
    """Text tower.

    Args:
      vocab_size, context_length: tokenizer vocabulary and padded sequence length.
      width, depth, num_heads, mlp_ratio: transformer shape.
      embed_dim: output embedding size.
      mask: 'causal' or 'bidirectional' (padding is masked in both).
      pooling: 'eot' (last non-pad token), 'cls' (first token) or 'mean' (over non-pad tokens).
      pad_id: the padding token id.
      eot_rule, eos_id: how 'eot' pooling finds the end token (see end_positions). With
        'eos_id' or 'argmax', the tokens after the end token count as padding.
    """

    def __init__(
        self, *, vocab_size, context_length, width, depth, num_heads, mlp_ratio, embed_dim, rngs: nnx.Rngs,
        mask="causal", pooling="eot", pad_id=0, activation="gelu", proj_bias=False, dtype=jnp.float32, remat=False,
        eot_rule="last_nonpad", eos_id=-1,
    ):
        self.causal = mask == "causal"
        self.pooling = pooling
        self.pad_id = pad_id
        self.eot_rule = eot_rule
        self.eos_id = eos_id
        self.dtype = dtype
        self.token_embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.pos_embed = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (context_length, width)))
        self.encoder = layers.Encoder(
            width, depth, num_heads, mlp_ratio, rngs, activation=activation, dtype=dtype, remat=remat
        )
        self.projection = layers.dense(width, embed_dim, rngs, dtype=dtype, use_bias=proj_bias)

    def valid_tokens(self, token_ids: jax.Array) -> jax.Array:
        """[B, L] bool: the tokens attention may read (not padding, not after the end token)."""
        if self.eot_rule == "last_nonpad":
            return token_ids != self.pad_id
        end = end_positions(token_ids, self.pad_id, self.eot_rule, self.eos_id)
        return jnp.arange(token_ids.shape[1])[None, :] <= end[:, None]

    def __call__(self, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """token_ids: [B, L] int32, padded with pad_id.

        Returns (embedding [B, embed_dim] not normalised, token states [B, L, width]).
        """
        length = token_ids.shape[1]
        end = end_positions(token_ids, self.pad_id, self.eot_rule, self.eos_id)
        valid = self.valid_tokens(token_ids)
        x = self.token_embed(token_ids).astype(self.dtype) + self.pos_embed[...][:length].astype(self.dtype)
        x = self.encoder(x, mask_from_valid(valid, self.causal))
        if self.pooling == "eot":
            pooled = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]
        elif self.pooling == "cls":
            pooled = x[:, 0]
        else:
            valid = valid[..., None].astype(x.dtype)
            pooled = (x * valid).sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1)
        return self.projection(pooled), x
