"""Evaluate a trained model on dataset splits: retrieval both ways plus zero-shot classification."""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import ml_collections
import numpy as np

from prodclip import files, losses
from prodclip.data import pipeline, view_augment
from prodclip.evaluate import baselines, querybank, rerank, retrieval, zeroshot
from prodclip.models import inference

log = logging.getLogger("prodclip")


def retrieval_keys(source) -> tuple[np.ndarray, str]:
    """[N] int64 match keys for a split, and which rule made them ("product_id" | "title").

    When some product id appears on several rows (a product with several captions or
    photos), rows match by product id. Otherwise rows match by identical title, since
    catalogs repeat titles across colour or size variants that look alike.
    """
    ids = np.asarray(source.ids if hasattr(source, "ids") else [source[i]["id"] for i in range(len(source))])
    if len(np.unique(ids)) < len(ids):
        return np.unique(ids, return_inverse=True)[1].astype(np.int64), "product_id"
    return retrieval.keys_from_strings(pipeline.source_titles(source)), "title"


def zeroshot_classes(label: str, source, config: ml_collections.ConfigDict,
                     label_stats: dict | None) -> tuple[list[str], list[str], np.ndarray]:
    """(raw class names, prompt names, [N] labels re-indexed to them; -1 = not evaluated) for one label.

    Classes with fewer than eval.min_class_count training items (from `label_stats`, see
    sources.label_vocabulary) are left out, and so are the images of those classes. Raw class
    values are renamed for prompting through eval.class_names.
    """
    raw_names = [str(n) for n in source.label_names[label]]
    renames = zeroshot.parse_class_names(config.eval.class_names).get(label, {})
    prompt = zeroshot.prompt_names(raw_names, renames, label)
    labels = np.asarray(source.labels[label])
    keep = list(range(len(raw_names)))
    if label_stats and label in label_stats and config.eval.min_class_count > 0:
        counts = label_stats[label]["train_counts"]
        keep = [i for i in keep if counts[i] >= config.eval.min_class_count]
    remap = np.full(len(raw_names) + 1, -1, np.int64)
    remap[keep] = np.arange(len(keep))
    return [raw_names[i] for i in keep], [prompt[i] for i in keep], remap[labels]  # -1 indexes the trailing -1


def zeroshot_split(image_emb: np.ndarray, source, encode, config: ml_collections.ConfigDict, *,
                   label_stats: dict | None = None, plot_dir: str | pathlib.Path | None = None,
                   split: str = "", logit_scale: float | None = None,
                   train_image_emb: np.ndarray | None = None,
                   photo_bank: np.ndarray | None = None) -> dict[str, float]:
    """'zeroshot/<label>/top1|top5|mean_per_class|weighted_f1|num_classes|class/<name>' per configured label.

    With eval.zeroshot_adapt_prior and the model's `logit_scale`, also
    'zeroshot/<label>/adapted/top1|top5|mean_per_class|weighted_f1': the same photos classified
    with the class shares that EM estimates from all of them, labels unread (zeroshot.py).
    With eval.zeroshot_train_prior, `logit_scale` and `train_image_emb` ([N_train, D], the run's
    train photos), also 'zeroshot/<label>/train_prior/...': each photo classified on its own, with
    the class shares that EM estimates from the unlabelled train photos.
    With eval.querybank_k > 0 and `photo_bank` ([B, D] the run's train photos, `querybank_banks`), also
    'zeroshot/<label>/bank/...': each class prompt's score lowered by half its mean top-k cosine to the
    bank (querybank.normalised_scores), a per-class offset that reads no label and no eval photo.
    With `plot_dir` (and eval.confusion_png), a confusion-matrix PNG per label is written there.
    """
    metrics: dict[str, float] = {}
    for label in config.eval.zeroshot_labels:
        if label not in getattr(source, "labels", {}):
            continue
        raw_names, names, labels = zeroshot_classes(label, source, config, label_stats)
        if not (labels >= 0).any():
            log.warning("zero-shot %s skipped on %s: no row has a %s value the run knows", label, split or "split",
                        label)
            continue
        class_emb = zeroshot.class_embeddings(encode, names, zeroshot.label_templates(label, config))
        scores = image_emb @ class_emb.T
        for name, value in zeroshot.classify_scores(scores, labels).items():
            if name.startswith("class/"):
                name = f"class/{raw_names[int(name[len('class/'):])]}"
            metrics[f"zeroshot/{label}/{name}"] = value
        metrics[f"zeroshot/{label}/num_classes"] = len(names)
        if config.eval.zeroshot_adapt_prior and logit_scale is not None:
            adapted = zeroshot.classify_adapted(scores, labels, logit_scale)
            metrics.update({f"zeroshot/{label}/adapted/{name}": value for name, value in adapted.items()
                            if not name.startswith("class/")})
        if config.eval.zeroshot_train_prior and logit_scale is not None and train_image_emb is not None:
            inductive = zeroshot.classify_adapted(scores, labels, logit_scale, prior_scores=train_image_emb @ class_emb.T)
            metrics.update({f"zeroshot/{label}/train_prior/{name}": value for name, value in inductive.items()
                            if not name.startswith("class/")})
        if config.eval.querybank_k > 0 and photo_bank is not None:
            normalised = querybank.normalised_scores(image_emb, class_emb, photo_bank, config.eval.querybank_k)
            metrics.update({f"zeroshot/{label}/bank/{name}": value
                            for name, value in zeroshot.classify_scores(normalised, labels).items()
                            if not name.startswith("class/")})
        if plot_dir is not None and config.eval.confusion_png:
            counts = zeroshot.confusion_matrix(image_emb, class_emb, labels)
            zeroshot.plot_confusion(counts, raw_names, pathlib.Path(plot_dir) / f"{split or 'split'}_{label}.png",
                                    title=f"zero-shot {label}, {split} ({int(counts.sum())} images)")
    return metrics


def short_query_retrieval(image_emb: np.ndarray, source, keys: np.ndarray, graphdef, params, tokenizer,
                          config: ml_collections.ConfigDict) -> dict[str, float]:
    """'t2i_short/R@1', ...: text->image retrieval with each title shortened, like a shopper's query.

    Query i keeps each word of title i with probability eval.short_query_keep_prob (at least one;
    view_augment.title_views view 1 with seed 0, so every model is asked the same queries); its
    positives are item i's own key, as in 't2i/'. image_emb: [N, D] float32; keys: [N] int64.
    """
    titles = pipeline.source_titles(source)
    queries = view_augment.title_views(titles, 2, seed=0, keep_prob=config.eval.short_query_keep_prob)[1]
    encode = inference.title_encoder(graphdef, params, tokenizer, config.eval.batch_size)
    metrics = retrieval.retrieval_metrics(encode(queries), image_emb, keys, keys, ks=tuple(config.eval.ks))
    metrics["mean_query_words"] = float(np.mean([len(q.split()) for q in queries]))
    return {f"t2i_short/{k}": v for k, v in metrics.items()}


def embed_split(graphdef, params, source, tokenizer, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """One pass of `source` through the model: {"image_emb": [N, D], "text_emb": [N, D]} float32, in order.

    With fusion re-ranking on (rerank.enabled), also the towers' token states that the
    fusion encoder reads (see rerank.embed_split). Every evaluator of the split reads this pass.
    """
    if rerank.enabled(config):
        return rerank.embed_split(graphdef, params, source, tokenizer, config)
    image_emb, text_emb = inference.embed_source(graphdef, params, source, tokenizer, config)
    return {"image_emb": image_emb, "text_emb": text_emb}


def train_photo_embeddings(graphdef, params, train_source, tokenizer, config: ml_collections.ConfigDict,
                           cached: np.ndarray | None = None) -> np.ndarray:
    """[N_train, D] the train photos that the probe and the train class shares read: `cached` when given
    (image_cache.cached_train_embeddings), else each photo once through the model without the test-time
    flip, as the image cache holds them, so that both give the same numbers."""
    if cached is not None:
        return cached
    return inference.embed_images(graphdef, params, train_source, tokenizer, config, test_time_flip=False)


def reads_train_split(config: ml_collections.ConfigDict) -> bool:
    """True when evaluation needs the run's train split: a linear probe, the train class shares, or the
    query banks of querybank normalisation."""
    return (bool(config.eval.linear_probe_labels) or bool(config.eval.zeroshot_train_prior)
            or config.eval.querybank_k > 0)


def title_bank(graphdef, params, train_source, tokenizer, config: ml_collections.ConfigDict,
               cached: np.ndarray | None = None) -> np.ndarray:
    """[B, D] float32 the train split's distinct titles (`querybank.bank_titles`) through the model: the bank
    that normalises a photo gallery's scores (querybank.py). `cached`: the same rows when the caller has
    them (text_cache.cached_title_embeddings), else the titles go through the text tower here."""
    if cached is not None:
        return cached
    encode = inference.title_encoder(graphdef, params, tokenizer, config.eval.batch_size)
    return encode(querybank.bank_titles(pipeline.source_titles(train_source)))


def evaluate_split(graphdef, params, source, tokenizer, config: ml_collections.ConfigDict, *,
                   with_zeroshot: bool = True, label_stats: dict | None = None,
                   plot_dir: str | pathlib.Path | None = None, split: str = "",
                   embedded: dict[str, np.ndarray] | None = None,
                   train_image_emb: np.ndarray | None = None,
                   banks: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> dict[str, float]:
    """Flat metrics: 'i2t/R@1', ..., 't2i/R@10', and 'zeroshot/<label>/top1', ... for one split.

    Retrieval matches by product id when a product has several rows, else by identical
    title (see `retrieval_keys`). With a fusion encoder and eval.rerank_k > 0, also
    'i2t/rerank/R@1', ... for the fusion-re-ranked top-k (see rerank.py). `embedded`: the
    split's `embed_split` output when the caller has it (else it is computed here).
    train_image_emb: [N_train, D] the train photos, for eval.zeroshot_train_prior (`zeroshot_split`).
    banks: (title bank [B, D], photo bank [B', D]) of querybank normalisation (`querybank_banks`): with
    eval.querybank_k > 0, 't2i_bank/...' for the first, 'i2t_bank/...' and 'zeroshot/<label>/bank/...'
    for the second when given.
    """
    if len(source) == 0:
        raise ValueError(f"split {split!r} has no items to evaluate")
    if embedded is None:
        embedded = embed_split(graphdef, params, source, tokenizer, config)
    image_emb, text_emb = embedded["image_emb"], embedded["text_emb"]
    keys, rule = retrieval_keys(source)
    metrics = retrieval.two_way_retrieval(image_emb, text_emb, keys, keys, ks=tuple(config.eval.ks))
    if config.eval.querybank_k > 0:
        metrics.update(querybank.normalised_retrieval(image_emb, text_emb, keys, title_bank=banks[0],
                                                      photo_bank=banks[1], k=config.eval.querybank_k,
                                                      ks=tuple(config.eval.ks)))
    if rerank.enabled(config):
        metrics.update(rerank.two_way_reranked(graphdef, params, embedded, keys, config))
    if config.eval.short_query_keep_prob > 0:
        metrics.update(short_query_retrieval(image_emb, source, keys, graphdef, params, tokenizer, config))
    metrics["num_items"] = len(source)
    metrics["distinct_keys"] = int(len(np.unique(keys)))
    metrics["match_by_product_id"] = int(rule == "product_id")
    if with_zeroshot:
        encode = inference.title_encoder(graphdef, params, tokenizer, config.eval.batch_size)
        metrics.update(zeroshot_split(image_emb, source, encode, config, label_stats=label_stats,
                                      plot_dir=plot_dir, split=split, train_image_emb=train_image_emb,
                                      photo_bank=banks[1],
                                      logit_scale=losses.trained_logit_scale(params, config.model.logit_scale_max)))
    return metrics


def querybank_banks(split: str, source, train_source, title_bank_emb: np.ndarray | None,
                    photo_bank_emb: np.ndarray | None, k: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The (title, photo) banks that normalise `split`'s retrieval, or (None, None) with a logged reason: the
    split read from the same file as the train split (the bank would hold the split itself), or a bank
    of fewer than k rows."""
    if title_bank_emb is None and photo_bank_emb is None:
        return None, None
    path = getattr(source, "path", None)
    if path is not None and path == getattr(train_source, "path", None):
        log.warning("querybank metrics not reported for %s: it is read from %s, the train split's file, which "
                    "would put its own titles and photos in the bank", split, path)
        return None, None
    if min(len(b) for b in (title_bank_emb, photo_bank_emb) if b is not None) < k:
        log.warning("querybank metrics not reported for %s: the train split has fewer than eval.querybank_k=%d "
                    "distinct titles or photos", split, k)
        return None, None
    return title_bank_emb, photo_bank_emb


def evaluate_all(graphdef, params, split_sources: dict, tokenizer, config, label_stats: dict | None = None, *,
                 plot_dir: str | pathlib.Path | None = None, train_image_emb: np.ndarray | None = None,
                 train_title_emb: np.ndarray | None = None, train_source=None) -> dict[str, Any]:
    """Metrics per eval split; with eval.linear_probe_labels and a train split, the baselines too.

    Each split goes through the model once: retrieval, re-ranking, zero-shot and the probes
    all read the same embeddings. train_image_emb: [N_train, D] image embeddings of the train
    split when already known (e.g. from the image feature cache), so the probe and the train
    class shares (eval.zeroshot_train_prior) do not embed the train images again; train_title_emb:
    [B, D] the train split's distinct titles (`title_bank`) when already known, for eval.querybank_k.
    train_source: the run's train split when it is not split_sources["train"] (another catalog, whose
    own file may be named train); default split_sources.get("train").
    """
    embedded = {split: embed_split(graphdef, params, split_sources[split], tokenizer, config)
                for split in config.data.eval_splits if len(split_sources[split])}
    train_source = train_source if train_source is not None else split_sources.get("train")
    probe_labels = [l for l in config.eval.linear_probe_labels
                    if l in getattr(train_source, "labels", {})
                    and all(l in getattr(split_sources[s], "labels", {}) for s in config.data.eval_splits)]
    train_emb = None
    train_titles = None
    if train_source is not None and len(train_source):
        if probe_labels or config.eval.zeroshot_train_prior or config.eval.querybank_k > 0:
            train_emb = train_photo_embeddings(graphdef, params, train_source, tokenizer, config, train_image_emb)
        if config.eval.querybank_k > 0:
            train_titles = title_bank(graphdef, params, train_source, tokenizer, config, train_title_emb)
    elif config.eval.querybank_k > 0:
        log.warning("querybank metrics (eval.querybank_k) not reported: no train split to take the bank from")
    results = {split: evaluate_split(graphdef, params, split_sources[split], tokenizer, config,
                                     label_stats=label_stats, plot_dir=plot_dir, split=split,
                                     embedded=embedded.get(split), train_image_emb=train_emb,
                                     banks=querybank_banks(split, split_sources[split], train_source, train_titles,
                                                           train_emb if config.eval.querybank_k > 0 else None,
                                                           config.eval.querybank_k))
               for split in config.data.eval_splits}
    if probe_labels:
        for split in config.data.eval_splits:
            eval_emb = embedded[split]["image_emb"]
            for label in probe_labels:
                _, _, train_labels = zeroshot_classes(label, train_source, config, label_stats)
                names, _, eval_labels = zeroshot_classes(label, split_sources[split], config, label_stats)
                if not (eval_labels >= 0).any() or not (train_labels >= 0).any():
                    continue
                rates = {**baselines.chance_and_majority(train_labels, eval_labels, len(names)),
                         **baselines.linear_probe(train_emb, train_labels, eval_emb, eval_labels)}
                results[split].update({f"baseline/{label}/{k}": v for k, v in rates.items()})
    return results


def format_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per metric, one column per split."""
    splits = [s for s, v in results.items() if isinstance(v, dict)]
    if not splits:
        return "(no results)"
    # Per-class accuracies stay in the JSON; the table keeps their mean.
    metrics = list(dict.fromkeys(k for s in splits for k in results[s] if "/" in k and "/class/" not in k))
    lines = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for m in metrics:
        cells = [f"{results[s][m]:.3f}" if m in results[s] else "" for s in splits]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    side_by_side = rerank.format_side_by_side(results)
    return "\n".join(lines) + (f"\n\nfusion re-ranking:\n\n{side_by_side}" if side_by_side else "")


def write_results(workdir: str | pathlib.Path, results: dict[str, Any], *, step: int | None = None,
                  name: str = "eval") -> None:
    workdir = pathlib.Path(workdir)
    payload = {"step": step, **results}
    files.write_text(workdir / f"{name}.json", json.dumps(payload, indent=2, sort_keys=True))
    files.write_text(workdir / f"{name}.md", format_table(results) + "\n")
