"""The CLIP model: an image tower and a text tower projected into one embedding space."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prodclip import config as config_lib
from prodclip import losses
from prodclip.models import bert, efficientnet, heads, resnet
from prodclip.models import matcher as matcher_lib
from prodclip.models.fusion import FusionEncoder, build_fusion, pool_image_tokens
from prodclip.models.text import TextTransformer
from prodclip.models.vit import PIXEL_STATS, VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTower(nnx.Module):
    """CLIP / SigLIP two-tower model.

    Attributes:
      image_tower, text_tower: the towers (see vit.py / text.py).
      log_logit_scale: scalar; the logit scale is exp(log_logit_scale), clamped at `logit_scale_max`.
      logit_bias: scalar, used by the sigmoid loss.
      fusion: the fusion encoder with its ITM head (models/fusion.py), or None (no params).
      matcher: None, or a match classifier on the two embeddings (matcher.py).
      image_head, text_head: None, or a trainable head after the tower (heads.py); a locked
        tower's output ("features") can then be cached and only the head trains.
      image_grid: 0, or the side of the grid the image tokens are average-pooled to
        (model.fusion.image_grid, `fusion.pool_image_tokens`).
    """

    def __init__(self, image_tower: VisionTransformer | resnet.ResNet | efficientnet.EfficientNetTower,
                 text_tower: TextTransformer | bert.BertTextTower,
                 *, logit_scale_init: float, logit_bias_init: float, logit_scale_max: float = 100.0,
                 fusion: FusionEncoder | None = None, matcher: matcher_lib.ConcatMatcher | None = None,
                 image_head: heads.ProjectionHead | None = None, text_head: heads.ProjectionHead | None = None,
                 image_grid: int = 0):
        self.image_grid = image_grid
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = image_head
        self.text_head = text_head
        self.fusion = fusion
        self.matcher = matcher
        self.log_logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(logit_bias_init, jnp.float32))
        self.logit_scale_max = logit_scale_max

    def logit_scale(self) -> jax.Array:
        """exp(log_logit_scale) clamped at logit_scale_max; zero gradient at the clamp."""
        return losses.clip_logit_scale(self.log_logit_scale[...], self.logit_scale_max)

    def image_features(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] (0..255) -> the image tower's output [B, F] float32 (what the image cache holds)."""
        return self.image_tower(images)[0].astype(jnp.float32)

    def text_features(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, L] int32 -> the text tower's output [B, F] float32, L2-normalised (the text cache's rows)."""
        return l2_normalize(self.text_tower(token_ids)[0])

    def image_features_and_tokens(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, S, S, 3] (0..255) -> (features [B, F] float32, image tokens [B, T, Wi]): what a locked
        tower's image cache holds for a run with a fusion encoder."""
        features, tokens = self.image_tower(images)
        return features.astype(jnp.float32), pool_image_tokens(tokens, self.image_grid)

    def text_features_and_tokens(self, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """token_ids [B, L] -> (`text_features` [B, F], token states [B, L, Wt]), the text cache's rows with fusion."""
        features, tokens = self.text_tower(token_ids)
        return l2_normalize(features), tokens

    def text_states(self, token_ids: jax.Array, block: int) -> jax.Array:
        """token_ids [B, L] -> [B, L, W] the BERT text tower's token states entering `blocks[block]`: the
        text cache's rows when only the last blocks train (optim.unlock_text_blocks)."""
        return self.text_tower.states_before(token_ids, block)

    def text_features_from_states(self, states: jax.Array, token_ids: jax.Array, block: int) -> jax.Array:
        """states [B, L, W] entering `blocks[block]`, token_ids [B, L] -> `text_features` [B, F]: the rest of the
        BERT text tower runs (its unlocked blocks, pooling)."""
        return l2_normalize(self.text_tower.from_states(states, token_ids, block)[0])

    def embed_image_features(self, features: jax.Array) -> jax.Array:
        """[B, F] image-tower features -> [B, embed_dim] float32, L2-normalised (through the image head, if any)."""
        return l2_normalize(features if self.image_head is None else self.image_head(features))

    def embed_text_features(self, features: jax.Array) -> jax.Array:
        """[B, F] text_features -> [B, embed_dim] float32, L2-normalised (through the text head, if any)."""
        return features if self.text_head is None else l2_normalize(self.text_head(features))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] (0..255) -> [B, embed_dim] float32, L2-normalised."""
        return self.embed_image_features(self.image_tower(images)[0])

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, L] int32 -> [B, embed_dim] float32, L2-normalised."""
        return self.embed_text_features(self.text_features(token_ids))

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> dict[str, jax.Array]:
        image_emb, image_tokens = self.image_tower(images)
        text_emb, text_tokens = self.text_tower(token_ids)
        return {
            "image_emb": self.embed_image_features(image_emb),
            "text_emb": self.embed_text_features(l2_normalize(text_emb)),
            "image_tokens": pool_image_tokens(image_tokens, self.image_grid),
            "text_tokens": text_tokens,
            "logit_scale": self.logit_scale(),
            "logit_bias": self.logit_bias[...],
        }


def build_model(config: ml_collections.ConfigDict, *, vocab_size: int, pad_id: int, rngs: nnx.Rngs) -> TwoTower:
    """Builds the two-tower model from `config.model` (see config.base_config)."""
    m = config.model
    dtype = DTYPES[m.dtype]
    if m.text.vocab_size is not None and m.text.vocab_size < vocab_size:
        raise config_lib.ConfigError(
            f"model.text.vocab_size={m.text.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    vocab_size = m.text.vocab_size or vocab_size
    pixel_mean, pixel_std = PIXEL_STATS[m.image.pixel_norm]
    image_dims = config_lib.tower_dims(m.image, config_lib.VIT_PRESETS)
    text_dims = config_lib.tower_dims(m.text, config_lib.TEXT_PRESETS)
    image_tower = resnet.build_resnet(config, dtype, rngs) if m.image.kind == "resnet" else efficientnet.build_efficientnet(
        config, dtype, rngs) if m.image.kind in efficientnet.VARIANTS else VisionTransformer(
        image_size=config.data.image_size, patch_size=m.image.patch_size, mlp_ratio=m.image.mlp_ratio,
        embed_dim=m.embed_dim, pooling=m.image.pooling, posemb=m.image.posemb, pre_norm=m.image.pre_norm,
        activation=m.image.activation, proj_bias=m.image.proj_bias, dtype=dtype, remat=m.remat, rngs=rngs,
        patch_bias=m.image.patch_bias, stem=m.image.stem, stem_depth=m.image.stem_depth, pixel_mean=pixel_mean, pixel_std=pixel_std,
        **image_dims,
    )
    if m.image.kind in efficientnet.VARIANTS:  # the fusion encoder cross-attends to the 1280-wide feature map
        image_dims = {**image_dims, "width": efficientnet.FEATURE_CHANNELS}
    text_tower = bert.build_bert(config, vocab_size, pad_id, dtype, rngs) if m.text.kind == "bert" else TextTransformer(
        vocab_size=vocab_size, context_length=config.tokenizer.context_length, mlp_ratio=m.text.mlp_ratio,
        embed_dim=m.embed_dim, mask=m.text.mask, pooling=m.text.pooling, pad_id=pad_id,
        activation=m.text.activation, proj_bias=m.text.proj_bias, dtype=dtype, remat=m.remat, rngs=rngs,
        eot_rule=m.text.eot_rule, eos_id=m.text.eos_id,
        **text_dims,
    )
    # Built after the towers, so the towers' initial weights do not depend on model.fusion.
    fusion = build_fusion(config, image_width=image_dims["width"], text_width=text_dims["width"], rngs=rngs,
                          dtype=dtype)
    image_head = heads.build_head(m.head.image, tower_output_dim(config, "image"), m.embed_dim, m.head.hidden,
                                  rngs, dtype)
    text_head = heads.build_head(m.head.text, tower_output_dim(config, "text"), m.embed_dim, m.head.hidden,
                                 rngs, dtype)
    return TwoTower(
        image_tower, text_tower, logit_scale_init=m.logit_scale_init, logit_bias_init=m.logit_bias_init,
        logit_scale_max=m.logit_scale_max, fusion=fusion, matcher=matcher_lib.build_matcher(config, dtype, rngs),
        image_head=image_head, text_head=text_head, image_grid=m.fusion.image_grid if m.fusion.enabled else 0,
    )


def tower_output_dim(config: ml_collections.ConfigDict, tower: str) -> int:
    """Width of a tower's output (its features): embed_dim when the tower projects, else its own width."""
    m = config.model
    if tower == "image" and m.image.kind in efficientnet.VARIANTS and m.head.image != "none":
        return efficientnet.pooled_width(m.image.kind, m.image.pooling)
    if tower == "text" and m.text.kind == "bert" and not m.text.bert.projection:
        width = config_lib.tower_dims(m.text, config_lib.TEXT_PRESETS)["width"]
        return bert.pooled_width(width, m.text.bert.mean_layers)
    return m.embed_dim
