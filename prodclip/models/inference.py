"""Batched inference: fixed-size padded batches through cached, jitted encoders.

Every batch is padded to the same size, so each encoder compiles once per
(graphdef, batch size); the pad rows repeat the last real row and are cut off
after the call. Evaluation, re-ranking, the LiT text cache, search and the
audit all embed through these functions.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prodclip.data import pipeline
from prodclip.models import fusion, matcher
from prodclip.models.factory import merge_model


def pad_to_batch(x: np.ndarray, n: int) -> np.ndarray:
    """`x` [m, ...] with m <= n, its last row repeated to n rows."""
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def batched(fn: Callable, arrays: tuple[np.ndarray, ...], batch_size: int) -> list[tuple[np.ndarray, ...]]:
    """fn(*padded_batch) over row blocks of `arrays` (same length N), each block padded to `batch_size`.

    Returns one tuple of numpy outputs per block, cut to the block's real rows
    (`fn` may return one array or a tuple of arrays, each with the batch first).
    """
    out = []
    for start in range(0, len(arrays[0]), batch_size):
        block = [a[start:start + batch_size] for a in arrays]
        n = len(block[0])
        result = fn(*(pad_to_batch(b, batch_size) for b in block))
        result = result if isinstance(result, tuple) else (result,)
        out.append(tuple(np.asarray(r)[:n] for r in result))
    return out


def flip_averaged(encode_image: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
    """[B, D] L2-normalised mean of the embeddings of images [B, S, S, 3] and of their mirror images
    (flipped left-right): a photo and its mirror get the same embedding (test-time flip)."""
    both = encode_image(images) + encode_image(images[:, :, ::-1])
    return both / jnp.maximum(jnp.linalg.norm(both, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=16)
def encoders(graphdef, test_time_flip: bool = False):
    """(encode_image(params, [B, S, S, 3] uint8), encode_text(params, [B, L] int32)) -> [B, D], jitted, cached.
    test_time_flip: encode_image returns `flip_averaged` embeddings (model.image.test_time_flip)."""
    if test_time_flip:
        encode_image = jax.jit(lambda p, x: flip_averaged(merge_model(graphdef, p).encode_image, x))
    else:
        encode_image = jax.jit(lambda p, x: merge_model(graphdef, p).encode_image(x))
    encode_text = jax.jit(lambda p, t: merge_model(graphdef, p).encode_text(t))
    return encode_image, encode_text


@functools.lru_cache(maxsize=8)
def feature_encoders(graphdef):
    """The towers without their heads, and each head alone, jitted and cached (LiT feature caches):

    (image_features(params, [B, S, S, 3] uint8) -> [B, F], text_features(params, [B, L] int32) -> [B, F_t],
     embed_image_features(params, [B, F] float32) -> [B, D] L2-normalised,
     embed_text_features(params, [B, F_t] float32) -> [B, D] L2-normalised).
    """
    image_features = jax.jit(lambda p, x: merge_model(graphdef, p).image_features(x))
    text_features = jax.jit(lambda p, t: merge_model(graphdef, p).text_features(t))
    embed_image_features = jax.jit(lambda p, f: merge_model(graphdef, p).embed_image_features(f))
    embed_text_features = jax.jit(lambda p, f: merge_model(graphdef, p).embed_text_features(f))
    return image_features, text_features, embed_image_features, embed_text_features


def embed_cached_features(graphdef, params, features: np.ndarray, batch_size: int, *, text: bool = False
                          ) -> np.ndarray:
    """[N, F] a locked tower's cached features -> [N, D] float32 L2-normalised embeddings through the model's
    image head (text=False) or text head (text=True), `batch_size` rows per call."""
    embed = feature_encoders(graphdef)[3 if text else 2]
    blocks = batched(lambda f: embed(params, f), (np.asarray(features, np.float32),), batch_size)
    return np.concatenate([np.asarray(b[0], np.float32) for b in blocks])


@functools.lru_cache(maxsize=8)
def token_state_encoders(graphdef):
    """The towers without their heads, with the states a fusion encoder reads, jitted and cached (feature
    caches of a run with model.fusion): (image(params, [B, S, S, 3] uint8) -> ([B, F], tokens [B, T, Wi]),
    text(params, [B, L] int32) -> ([B, F_t], token states [B, L, Wt]))."""
    image = jax.jit(lambda p, x: merge_model(graphdef, p).image_features_and_tokens(x))
    text = jax.jit(lambda p, t: merge_model(graphdef, p).text_features_and_tokens(t))
    return image, text


@functools.lru_cache(maxsize=8)
def text_state_encoder(graphdef, block: int):
    """jitted (params, [B, L] int32) -> [B, L, W]: the BERT text tower's token states entering
    `blocks[block]` (the text cache of a run with optim.unlock_text_blocks)."""
    return jax.jit(lambda p, t: merge_model(graphdef, p).text_states(t, block))


def embed_source(graphdef, params, source, tokenizer, config, *, with_text: bool = True,
                 test_time_flip: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """All images and titles of `source`: ([N, D], [N, D] or None) float32, L2-normalised, in source order.
    test_time_flip: None = config.model.image.test_time_flip."""
    flip = config.model.image.test_time_flip if test_time_flip is None else test_time_flip
    encode_image, encode_text = encoders(graphdef, bool(flip))
    batch_size = config.eval.batch_size
    images, texts = [], []
    for batch in pipeline.eval_batches(source, tokenizer, config, batch_size):
        n = len(batch["ids"])
        images.append(np.asarray(encode_image(params, pad_to_batch(batch["images"], batch_size)))[:n])
        if with_text:
            texts.append(np.asarray(encode_text(params, pad_to_batch(batch["token_ids"], batch_size)))[:n])
    return np.concatenate(images), (np.concatenate(texts) if with_text else None)


def embed_images(graphdef, params, source, tokenizer, config, *, test_time_flip: bool | None = None) -> np.ndarray:
    """[N, D] float32 image embeddings of a whole source, in source order (test_time_flip: as embed_source)."""
    return embed_source(graphdef, params, source, tokenizer, config, with_text=False,
                        test_time_flip=test_time_flip)[0]


def title_encoder(graphdef, params, tokenizer, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    """A function: N strings -> [N, D] float32 text embeddings."""
    _, encode_text = encoders(graphdef)

    def encode(titles):
        ids = tokenizer(list(titles))
        return np.concatenate([b[0] for b in batched(lambda t: encode_text(params, t), (ids,), batch_size)])
    return encode


def image_encoder(graphdef, params, test_time_flip: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """A function: [N, S, S, 3] uint8 images -> [N, D] float32 (one call, no padding)."""
    encode_image, _ = encoders(graphdef, test_time_flip)
    return lambda images: np.asarray(encode_image(params, images))


@functools.lru_cache(maxsize=8)
def split_state_encoder(graphdef):
    """jitted (params, images, token_ids) -> (image_emb, text_emb, image_tokens, text_tokens, text_valid)."""
    def encode(params, images, token_ids):
        model = merge_model(graphdef, params)
        out = model(images, token_ids)
        return (out["image_emb"], out["text_emb"], out["image_tokens"], out["text_tokens"],
                model.text_tower.valid_tokens(token_ids))
    return jax.jit(encode)


@functools.lru_cache(maxsize=8)
def fusion_log_odds(graphdef):
    """jitted (params, image_tokens, text_tokens, text_valid, itc) -> [B] fusion match log-odds."""
    def log_odds(params, image_tokens, text_tokens, text_valid, itc):
        model = merge_model(graphdef, params)
        return fusion.match_log_odds(fusion.itm_logits(model, image_tokens, text_tokens, text_valid, itc))
    return jax.jit(log_odds)


def fusion_itm_fn(graphdef, params, *, batch_size: int = 256,
                  log_odds: bool = False) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """itm_fn(images [N, S, S, 3] uint8, token_ids [N, L] int32) -> p(match) [N] float32, numpy.

    Runs both towers and the fusion encoder on each pair, in padded batches of
    `batch_size` (one compilation). The form other modules take an ITM scorer in.
    With `log_odds`, returns `fusion.match_log_odds` instead of the probability (no saturation at 1).
    """
    @jax.jit
    def probabilities(p, images, token_ids):
        model = merge_model(graphdef, p)
        out = model(images, token_ids)
        itc = out["logit_scale"] * jnp.sum(out["image_emb"] * out["text_emb"], axis=-1)
        logits = fusion.itm_logits(model, out["image_tokens"], out["text_tokens"],
                                   model.text_tower.valid_tokens(token_ids), itc)
        return fusion.match_log_odds(logits) if log_odds else jax.nn.softmax(logits, axis=-1)[:, 1]

    def itm_fn(images: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        images, token_ids = np.asarray(images), np.asarray(token_ids)
        if len(images) != len(token_ids):
            raise ValueError(f"itm_fn: {len(images)} images but {len(token_ids)} token rows; they are pairs")
        out = batched(lambda x, t: probabilities(params, x, t), (images, token_ids), batch_size)
        return np.concatenate([b[0] for b in out]) if out else np.zeros((0,), np.float32)

    return itm_fn


def matcher_itm_fn(graphdef, params) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """itm_fn(images [N, S, S, 3] uint8, token_ids [N, L] int32) -> P(match) [N] float32, jitted.

    The concat matcher's scorer, in the `fusion_itm_fn` convention; pairs are row i with row i.
    """
    @jax.jit
    def score(params, images, token_ids):
        model = merge_model(graphdef, params)
        return matcher.match_probability(model, model.encode_image(images), model.encode_text(token_ids))
    return lambda images, token_ids: score(params, images, token_ids)


def match_head_scorer(config, graphdef, params):
    """The run's own match head as `itm_fn(images, token_ids) -> p(match)`: the fusion ITM head or the
    concat matcher; None for a plain two-tower run."""
    if config.model.fusion.enabled:
        return fusion_itm_fn(graphdef, params, batch_size=config.eval.batch_size)
    if config.model.matcher.kind != "none":
        return matcher_itm_fn(graphdef, params)
    return None
