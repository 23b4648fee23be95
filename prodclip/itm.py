"""Image-text matching (ITM) with hard negatives, and the fusion train step's loss.

ALBEF's recipe (Li et al., 2021, sec. 3.2), over the global batch: for each image
one negative text is drawn from the softmax of its similarity row, with the
positives excluded, and for each text one negative image likewise. The fusion
encoder then classifies B positive and 2B negative pairs (match / no match).
With `loss.itm_complete_titles_only`, titles shortened by word-dropout
augmentation take no part in ITM: "red tee" also describes other red tees in the
batch, so as a negative its "no match" label would often be wrong, and kept only
as a positive it would teach the head that short titles match (a length shortcut
that hurt image->text re-ranking when we measured it).

Conventions:

* ``logits``: ``[B, B]`` float32, ``logit_scale * image_emb @ text_emb.T`` (rows
  images, columns texts), the contrastive loss's logits. Sampling treats them as
  constants (no gradient flows through the choice of negatives).
* ``positives``: ``[B, B]`` bool, True where a pair must not be a negative (the
  diagonal, and pairs sharing a product id or an identical title; see
  `prodclip.losses.batch_positives`).

Across devices: in the sharded step (jit over the mesh) every array here is a
global array. The ``[B, B]`` similarities come from the all-gathered embeddings,
the draw uses one key for the whole global batch, and the chosen negatives' token
states are gathered from the devices that own them, so the samples and the loss
are those of one device with the same key.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from prodclip import losses
from prodclip.models import fusion
from prodclip.models.factory import merge_model

# (image_tokens [N, S, Wi], text_tokens [N, L, Wt], text_valid [N, L] bool, pair two-tower logits [N])
# -> ITM logits [N, 2].
PairScorer = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

class SwappedTitles(NamedTuple):
    """Each row's attribute-swapped title (loss.hard_negatives) as the ITM loss reads it: tokens [B, L, Wt]
    the text tower's token states, valid [B, L] bool, mask [B] bool rows that have one (and a complete
    own title), itc [B] float32 the two-tower logit of (image row, its swapped title)."""
    tokens: jax.Array
    valid: jax.Array
    mask: jax.Array
    itc: jax.Array


# Folded into the run's seed so the negatives' stream is independent of parameter init.
_SAMPLER_STREAM = 0x17A


def sample_hard_negatives(key: jax.Array, logits: jax.Array, positives: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One column per row, drawn from softmax(logits[row]) restricted to the row's non-positive columns.

    Args:
      key: a PRNG key.
      logits: [R, C] float, unnormalised log-probabilities.
      positives: [R, C] bool, columns that are never drawn for that row.

    Returns:
      (index [R] int32, has_negative [R] bool). A row whose columns are all positives
      gets index -1 and has_negative False.
    """
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    has_negative = ~jnp.all(positives, axis=1)
    # Gumbel-max over -inf-masked logits: a masked column never wins against a finite one.
    masked = jnp.where(positives, -jnp.inf, logits)
    masked = jnp.where(has_negative[:, None], masked, 0.0)
    index = jax.random.categorical(key, masked, axis=1).astype(jnp.int32)
    return jnp.where(has_negative, index, -1), has_negative


def itm_loss(key: jax.Array, logits: jax.Array, positives: jax.Array, image_tokens: jax.Array,
             text_tokens: jax.Array, text_valid: jax.Array, score_pairs: PairScorer,
             text_ok: jax.Array | None = None, num_rows: int = 0,
             swapped: SwappedTitles | None = None) -> tuple[jax.Array, dict]:
    """ITM cross-entropy over n positives and 2n hard negatives (n = num_rows or B), plus with `swapped`
    up to n more negatives: image r with its own attribute-swapped title.

    Args:
      key: PRNG key of this step's draw.
      logits: [B, B] image-text similarity logits (rows images, columns texts).
      positives: [B, B] bool (the diagonal is added here).
      image_tokens: [B, S, Wi]; text_tokens: [B, L, Wt]; text_valid: [B, L] bool.
      score_pairs: the fusion encoder on N pairs, see `PairScorer`.
      text_ok: optional [B] bool, texts that take part in ITM. A text marked False forms no
        pair at all: not its positive, not a negative for any image, no negative image of
        its own (its image still gets a negative text). Used for titles shortened by word
        dropout, which describe many images at once.
      num_rows: 0 (all B rows), or n < B: pairs for the first n images and texts only, their
        negatives still drawn from all B columns (model.fusion.itm_rows).
      swapped: each row's title with a colour or gender swapped (loss.hard_negatives), see
        `SwappedTitles`; rows of the first n whose mask is False add no pair.

    Returns:
      (loss: scalar float32 in nats, the mean cross-entropy over the pairs that exist
       (a row without any negative adds no negative pair);
       metrics: {"itm_accuracy", "itm_positives", "itm_negatives"} scalars, accuracy over
       those pairs and the numbers of positive and negative pairs).
    """
    b = logits.shape[0]
    positives = positives | jnp.eye(b, dtype=bool)
    positive_ok = jnp.ones(b, bool)
    if text_ok is not None:
        positives = positives | ~text_ok[None, :]
        positive_ok = text_ok
    n = min(num_rows, b) if num_rows else b
    key_text, key_image = jax.random.split(key)
    negative_text, has_text = sample_hard_negatives(key_text, logits[:n], positives[:n])  # one per image
    negative_image, has_image = sample_hard_negatives(key_image, logits.T[:n], positives.T[:n])  # one per text
    rows = jnp.arange(n, dtype=jnp.int32)
    image_index = jnp.concatenate([rows, rows, jnp.maximum(negative_image, 0)])
    text_index = jnp.concatenate([rows, jnp.maximum(negative_text, 0), rows])
    labels = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
    positive_ok = positive_ok[:n]
    weights = jnp.concatenate([positive_ok, has_text, has_image]).astype(jnp.float32)
    pair_itc = jax.lax.stop_gradient(logits)[image_index, text_index]
    pair_text, pair_valid = text_tokens[text_index], text_valid[text_index]
    if swapped is not None:
        image_index = jnp.concatenate([image_index, rows])
        pair_text = jnp.concatenate([pair_text, swapped.tokens[:n].astype(pair_text.dtype)])
        pair_valid = jnp.concatenate([pair_valid, swapped.valid[:n]])
        pair_itc = jnp.concatenate([pair_itc, jax.lax.stop_gradient(swapped.itc[:n]).astype(pair_itc.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros(n, jnp.int32)])
        weights = jnp.concatenate([weights, swapped.mask[:n].astype(jnp.float32)])
    pair_logits = score_pairs(image_tokens[image_index], pair_text, pair_valid, pair_itc)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(pair_logits.astype(jnp.float32), labels)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(pair_logits, axis=-1) == labels).astype(jnp.float32)
    positives_used = jnp.sum(positive_ok.astype(jnp.float32))
    metrics = {"itm_accuracy": jnp.sum(weights * correct) / total, "itm_positives": positives_used,
               "itm_negatives": jnp.sum(weights) - positives_used}
    if swapped is not None:
        swapped_pairs = weights[3 * n:]
        metrics["itm_swapped"] = jnp.sum(swapped_pairs)
        metrics["itm_swapped_accuracy"] = jnp.sum(swapped_pairs * correct[3 * n:]) / jnp.maximum(
            jnp.sum(swapped_pairs), 1.0)
    return jnp.sum(weights * cross_entropy) / total, metrics


def sampler_key(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """The negatives' key of train step `step`: a function of (config.seed, step) only, so a resumed run and
    any device layout draw the same negatives."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _SAMPLER_STREAM), step)


def batch_states(model, batch: dict) -> dict:
    """{image_emb [B, D], text_emb [B, D], image_tokens [B, T, Wi], text_tokens [B, L, Wt]} of a batch, and
    negative_text_emb / negative_text_tokens of its attribute-swapped titles when it has them.

    A locked tower's outputs may come with the batch (image_cache.py: image_features and image_tokens;
    text_cache.py: text_emb and text_tokens): then only that side's head runs, and the fusion encoder
    reads the cached tokens. Otherwise the tower runs on images or token_ids, as in `TwoTower.__call__`.
    """
    if "image_features" in batch:
        image_emb, image_tokens = model.embed_image_features(batch["image_features"]), batch["image_tokens"]
    else:
        features, tokens = model.image_tower(batch["images"])
        image_emb, image_tokens = model.embed_image_features(features), fusion.pool_image_tokens(tokens,
                                                                                                 model.image_grid)
    out = {"image_emb": image_emb, "image_tokens": image_tokens}
    sides = (("text", "token_ids"), ("negative_text", "negative_token_ids")) if "negative_mask" in batch else (
        ("text", "token_ids"),)
    for side, ids in sides:  # the titles, and with loss.hard_negatives the attribute-swapped ones
        if f"{side}_emb" in batch:
            out[f"{side}_emb"] = model.embed_text_features(batch[f"{side}_emb"])
            out[f"{side}_tokens"] = batch[f"{side}_tokens"]
        else:
            features, out[f"{side}_tokens"] = model.text_features_and_tokens(batch[ids])
            out[f"{side}_emb"] = model.embed_text_features(features)
    return out


def make_loss_and_grads(config: ml_collections.ConfigDict, graphdef, pair_loss):
    """The fusion train step's loss: loss_and_grads(params, batch, step) -> (loss, grads, metrics).

    loss = contrastive (`pair_loss` on the global batch) + loss.itm_weight * ITM, where the
    ITM negatives are drawn from the contrastive logits with `sampler_key(config, step)`.
    metrics: contrastive_loss, itm_loss, itm_accuracy, itm_positives, itm_negatives (scalars).
    """
    def loss_fn(params, batch, key):
        model = merge_model(graphdef, params)
        out = batch_states(model, batch)
        logit_scale = model.logit_scale()
        contrastive = pair_loss(out["image_emb"], out["text_emb"], logit_scale, model.logit_bias[...], batch)
        logits = logit_scale * jnp.einsum("id,td->it", out["image_emb"], out["text_emb"],
                                          preferred_element_type=jnp.float32)
        score_pairs = lambda image_tokens, text_tokens, text_valid, pair_itc: fusion.itm_logits(
            model, image_tokens, text_tokens, text_valid, pair_itc)
        complete = batch.get("title_complete") if config.loss.itm_complete_titles_only else None
        swapped = None
        if "negative_mask" in batch:  # loss.hard_negatives: a contrastive term and ITM negatives
            contrastive = contrastive + config.loss.hard_negative_weight * losses.hard_negative_loss(
                out["image_emb"], out["text_emb"], out["negative_text_emb"], batch["negative_mask"], logit_scale)
            swapped = SwappedTitles(
                out["negative_text_tokens"], model.text_tower.valid_tokens(batch["negative_token_ids"]),
                batch["negative_mask"], logit_scale * jnp.sum(out["image_emb"] * out["negative_text_emb"], axis=-1))
        itm, metrics = itm_loss(key, logits, losses.batch_positives(batch), out["image_tokens"], out["text_tokens"],
                                model.text_tower.valid_tokens(batch["token_ids"]), score_pairs, complete,
                                num_rows=config.model.fusion.itm_rows, swapped=swapped)
        metrics.update(contrastive_loss=contrastive, itm_loss=itm)
        return contrastive + config.loss.itm_weight * itm, metrics

    def loss_and_grads(params, batch, step):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch,
                                                                           sampler_key(config, step))
        return loss, grads, metrics

    return loss_and_grads
