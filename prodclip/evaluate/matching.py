"""Match verdicts for (image, title) pairs: scores, calibrated probabilities, a threshold, metrics.

Scores, one per pair:
  two_tower  cosine of the L2-normalised embeddings, calibrated to a probability
             p = sigmoid(scale * cos + bias): the sigmoid loss's own logit_scale and logit_bias
             ("native"), or a Platt fit (a 1-feature logistic regression) on the fit split's pairs,
             which the softmax loss needs because its scores carry no absolute level.
             With match.hubness_k = k > 0 the cosine is first corrected for hubness (CSLS):
             cos - (mean top-k cosine of the photo to the reference titles
             + mean top-k cosine of the title to the reference photos) / 2, the reference
             being the scored split (or the audited catalog), and the calibration is Platt.
             With match.attribute_labels (e.g. colour, gender), the Platt fit also weighs the
             attribute log-likelihood of the colour and gender words the title names under the
             photo's zero-shot posterior (evaluate/attribute_check.py):
             p = sigmoid(scale * score + attribute_weight * attribute + bias).
  fusion     the ITM probability of a fusion head, where the caller passes `itm_fn`.
  combined   sigmoid(w_cos * cos + w_itm * logit(p_itm) (+ w_attr * attribute) + b), a logistic
             regression over the scores fit on the fit split, as retrieval re-ranking mixes ITC and ITM.

A threshold on each probability is chosen on the fit split (max F1, or the lowest threshold
that reaches a target precision); the metrics (match_metrics.py) are reported per negative kind.
Everything fitted (scales, weights, thresholds) is a `Calibration`, saved as JSON so that
`prodclip audit` applies the same verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Callable

import numpy as np
from sklearn import metrics as sk_metrics
from sklearn.linear_model import LogisticRegression

from prodclip.evaluate import attribute_check, hubness, match_metrics
from prodclip.evaluate import pairs as pairs_lib
from prodclip.models import inference

log = logging.getLogger("prodclip")

# images [B, S, S, 3] uint8, token_ids [B, L] int32 -> [B] ITM probabilities (a fusion head).
ItmFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

CALIBRATION_FILE = "match_calibration.json"
FIT_QUANTILES = 1001
SCORES = ("two_tower", "fusion", "combined")
_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def raw_cosine_probability(cos: np.ndarray) -> np.ndarray:
    """The uncalibrated reading of a cosine as a probability: clip(cos, 0, 1)."""
    return np.clip(np.asarray(cos, np.float64), 0.0, 1.0)


# ----------------------------------------------------------------------------- calibration


def fit_logistic(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """(weights [F], bias) of an unregularised logistic regression of labels [P] on features [P, F]."""
    if len(np.unique(labels)) < 2:
        raise ValueError("calibration needs both matched and mismatched pairs; the fit split has one class only")
    model = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(features, np.float64), labels)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def choose_threshold(prob: np.ndarray, labels: np.ndarray, rule: str = "max_f1",
                     target_precision: float = 0.9) -> tuple[float, bool]:
    """(threshold, reached): predict a match where prob >= threshold.

    max_f1: the threshold of the highest F1 on these pairs (reached is True).
    target_precision: the lowest threshold whose precision on these pairs is >= target (the most
    recall at that precision); if none reaches it, the threshold of the highest precision, reached=False.
    """
    precision, recall, thresholds = sk_metrics.precision_recall_curve(labels, prob)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    if rule == "max_f1":
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        return float(thresholds[int(np.argmax(f1))]), True
    if rule == "target_precision":
        ok = np.flatnonzero(precision >= target_precision)
        if len(ok):
            return float(thresholds[ok[0]]), True  # thresholds ascend: the first is the lowest
        return float(thresholds[int(np.argmax(precision))]), False
    raise ValueError(f"threshold rule {rule!r} is not one of max_f1, target_precision")


@dataclasses.dataclass
class Calibration:
    """What turns pair scores into verdicts, fit on one split.

    method: "native" | "platt"; p_two_tower = sigmoid(scale * score + attribute_weight * attribute + bias),
      score the cosine corrected for hubness with hubness_k > 0 (evaluate/hubness.py), else the cosine
      itself; attribute the attribute log-likelihood of `attribute_labels` (evaluate/attribute_check.py),
      read only when attribute_labels is not empty.
    combined: (w_cos, w_itm, bias) of the combined score, or None without a fusion head; it adds
      combined_attribute_weight * attribute with attribute_labels.
    thresholds: score name -> probability threshold; reached: score name -> target precision reached.
    fit_scores: score name -> {"matched": [...], "mismatched": [...]}: up to FIT_QUANTILES quantiles of
      the fit split's probabilities per class, from which `prodclip audit` predicts the precision
      of a threshold at another mismatch rate (None in calibrations saved before they were kept).
    """

    method: str
    scale: float
    bias: float
    thresholds: dict[str, float]
    reached: dict[str, bool]
    rule: str
    target_precision: float
    fit_split: str
    combined: tuple[float, float, float] | None = None
    fit_scores: dict | None = None
    hubness_k: int = 0
    attribute_labels: tuple[str, ...] = ()
    attribute_weight: float = 0.0
    combined_attribute_weight: float = 0.0

    def attribute_term(self, attribute: np.ndarray | None, weight: float, n: int) -> np.ndarray | float:
        """weight * attribute ([P]); 0 without attribute_labels. Raises ValueError when they need one not given."""
        if not self.attribute_labels:
            return 0.0
        if attribute is None or len(attribute) != n:
            raise ValueError(f"this calibration weighs the attribute words of {list(self.attribute_labels)}; "
                             "pass their log-likelihood (evaluate/attribute_check.py) for every pair")
        return weight * np.asarray(attribute, np.float64)

    def two_tower(self, cos: np.ndarray, attribute: np.ndarray | None = None) -> np.ndarray:
        """[P] scores (cosines, or hubness-corrected with hubness_k > 0) and, with attribute_labels, [P]
        attribute log-likelihoods -> [P] match probabilities."""
        cos = np.asarray(cos, np.float64)
        return sigmoid(self.scale * cos + self.attribute_term(attribute, self.attribute_weight, len(cos)) + self.bias)

    def combine(self, cos: np.ndarray, itm_prob: np.ndarray, attribute: np.ndarray | None = None) -> np.ndarray:
        """[P] scores (as in `two_tower`), ITM probabilities (and attribute log-likelihoods) -> [P] combined
        match probabilities."""
        if self.combined is None:
            raise ValueError("this calibration was fit without a fusion head; it has no combined score")
        w_cos, w_itm, bias = self.combined
        cos = np.asarray(cos, np.float64)
        return sigmoid(w_cos * cos + w_itm * logit(itm_prob)
                       + self.attribute_term(attribute, self.combined_attribute_weight, len(cos)) + bias)

    def probabilities(self, cos: np.ndarray, itm_prob: np.ndarray | None = None,
                      attribute: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Score name -> [P] probabilities (fusion and combined only with ITM probabilities)."""
        out = {"two_tower": self.two_tower(cos, attribute)}
        if itm_prob is not None:
            out["fusion"] = np.asarray(itm_prob, np.float64)
            if self.combined is not None:
                out["combined"] = self.combine(cos, itm_prob, attribute)
        return out

    def best_score(self) -> str:
        """The score verdicts use: combined when fit, else two_tower."""
        return "combined" if self.combined is not None else "two_tower"

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "Calibration":
        data = json.loads(pathlib.Path(path).read_text())
        try:
            calibration = cls(**data)
        except TypeError as e:
            raise ValueError(f"{path} is not a match calibration ({e})") from e
        if calibration.combined is not None:
            calibration.combined = tuple(calibration.combined)
        calibration.attribute_labels = tuple(calibration.attribute_labels)
        return calibration


def fit_calibration(cos: np.ndarray, labels: np.ndarray, *, loss_name: str, method: str = "auto",
                    logit_scale: float | None = None, logit_bias: float | None = None,
                    itm_prob: np.ndarray | None = None, rule: str = "max_f1", target_precision: float = 0.9,
                    fit_split: str = "val", hubness_k: int = 0, attribute: np.ndarray | None = None,
                    attribute_labels: tuple[str, ...] = ()) -> Calibration:
    """Fits the two-tower calibration (and the combined score and thresholds) on [P] pair scores and labels.

    cos: the cosines, or with hubness_k > 0 the hubness-corrected cosines (evaluate/hubness.py).
    method: auto (native for loss_name 'sigmoid' without hubness_k or attribute_labels, else platt) |
    native | platt. native needs the model's logit_scale (exp'd, clamped) and logit_bias.
    attribute: [P] attribute log-likelihoods of `attribute_labels` (evaluate/attribute_check.py), a second
    feature of the Platt fit (and a third of the combined one).
    """
    attribute_labels = tuple(attribute_labels)
    if attribute_labels and attribute is None:
        raise ValueError(f"attribute_labels {list(attribute_labels)} need the pairs' attribute log-likelihoods")
    if method == "auto":
        method = "native" if loss_name == "sigmoid" and not hubness_k and not attribute_labels else "platt"
    if method == "native" and (hubness_k or attribute_labels):
        raise ValueError("native calibration applies the model's scale to raw cosines; with match.hubness_k > 0 "
                         "or match.attribute_labels use match.calibration='platt' (or 'auto')")
    extra = [np.asarray(attribute, np.float64)] if attribute_labels else []
    if method == "native":
        if logit_scale is None or logit_bias is None:
            raise ValueError("native calibration needs the model's logit_scale and logit_bias")
        scale, bias, attribute_weight = float(logit_scale), float(logit_bias), 0.0
    elif method == "platt":
        weights, bias = fit_logistic(np.stack([np.asarray(cos, np.float64), *extra], axis=1), labels)
        scale, attribute_weight = float(weights[0]), float(weights[1]) if extra else 0.0
    else:
        raise ValueError(f"calibration method {method!r} is not one of auto, native, platt")
    calibration = Calibration(method, scale, bias, {}, {}, rule, float(target_precision), fit_split,
                              hubness_k=int(hubness_k), attribute_labels=attribute_labels,
                              attribute_weight=attribute_weight)
    if itm_prob is not None:
        weights, bias = fit_logistic(np.stack([np.asarray(cos, np.float64), logit(itm_prob), *extra], axis=1),
                                     labels)
        calibration.combined = (float(weights[0]), float(weights[1]), bias)
        calibration.combined_attribute_weight = float(weights[2]) if extra else 0.0
    calibration.fit_scores = {}
    for name, prob in calibration.probabilities(cos, itm_prob, attribute).items():
        calibration.thresholds[name], calibration.reached[name] = choose_threshold(prob, labels, rule,
                                                                                   target_precision)
        calibration.fit_scores[name] = {kind: class_quantiles(prob[np.asarray(labels) == value])
                                        for kind, value in (("matched", 1), ("mismatched", 0))}
    return calibration


def class_quantiles(prob: np.ndarray, num: int = FIT_QUANTILES) -> list[float]:
    """`num` evenly spaced quantiles of one class's probabilities (all of them when fewer), ascending."""
    prob = np.sort(np.asarray(prob, np.float64))
    if len(prob) > num:
        prob = np.quantile(prob, np.linspace(0.0, 1.0, num))
    return [float(p) for p in prob]


# ----------------------------------------------------------------------------- scoring a pair set


def pair_cosines(image_emb: np.ndarray, title_emb: np.ndarray, pair_set: pairs_lib.PairSet,
                 encode_titles: Callable[[list[str]], np.ndarray], hubness_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([P] float64 cosines, [P] float64 scores) of a pair set: the scores are the cosines, or with
    hubness_k > 0 the cosines corrected for hubness with the split as the reference.

    image_emb, title_emb: [N, D] float32 L2-normalised embeddings of the split's photos and titles;
    edited titles (title_index -1) are embedded with `encode_titles` (N strings -> [N, D]).
    """
    texts = title_emb[np.maximum(pair_set.title_index, 0)].astype(np.float64)
    edited = np.flatnonzero(pair_set.title_index < 0)
    if len(edited):
        texts[edited] = encode_titles([pair_set.titles[i] for i in edited])
    cos = np.einsum("pd,pd->p", image_emb[pair_set.image_index].astype(np.float64), texts)
    if not hubness_k:
        return cos, cos
    image_density = hubness.mean_top_k(image_emb, title_emb, hubness_k)[pair_set.image_index]
    return cos, hubness.corrected(cos, image_density, hubness.mean_top_k(texts, image_emb, hubness_k))


class _PairRows:
    """A pair set over a split as a source: row p = (photo of pair p, title of pair p)."""

    def __init__(self, source, pair_set: pairs_lib.PairSet):
        self.source, self.pair_set = source, pair_set

    def __len__(self) -> int:
        return len(self.pair_set)

    def __getitem__(self, p: int) -> dict:
        item = self.source[int(self.pair_set.image_index[int(p)])]
        return {"image": item["image"], "title": self.pair_set.titles[int(p)], "id": int(p)}


def itm_probabilities(itm_fn: ItmFn, source, pair_set: pairs_lib.PairSet, tokenizer, config) -> np.ndarray:
    """[P] ITM probabilities of a pair set, batched through the eval pipeline (fitted photos, token ids)."""
    from prodclip.data import pipeline

    out = [np.asarray(itm_fn(batch["images"], batch["token_ids"]), np.float64).reshape(-1)
           for batch in pipeline.eval_batches(_PairRows(source, pair_set), tokenizer, config)]
    return np.concatenate(out)


@dataclasses.dataclass
class ScoredPairs:
    """A split's pair set with its cosines [P], the scores calibrated ([P]: the cosines, or corrected for
    hubness), with a fusion head ITM probabilities [P], and with match.attribute_labels the attribute
    log-likelihoods [P] (evaluate/attribute_check.py)."""

    split: str
    pair_set: pairs_lib.PairSet
    cos: np.ndarray
    itm_prob: np.ndarray | None = None
    score: np.ndarray | None = None
    attribute: np.ndarray | None = None

    def __post_init__(self):
        if self.score is None:
            self.score = self.cos


def score_split(graphdef, params, source, tokenizer, config, split: str, *, itm_fn: ItmFn | None = None
                ) -> ScoredPairs:
    """Builds the split's pair benchmark (config.match) and scores every pair."""
    type_label, swap_labels = benchmark_labels(config, source)
    sampler = pairs_lib.sampler_for_source(source, type_label, swap_labels)
    pair_set = pairs_lib.build_pairs(sampler, config.match.negative_kinds, seed=config.match.seed)
    image_emb, title_emb = inference.embed_source(graphdef, params, source, tokenizer, config)
    encode = inference.title_encoder(graphdef, params, tokenizer, config.eval.batch_size)
    cos, score = pair_cosines(image_emb, title_emb, pair_set, encode, config.match.hubness_k)
    itm = itm_probabilities(itm_fn, source, pair_set, tokenizer, config) if itm_fn is not None else None
    attribute = None
    if config.match.attribute_labels:
        classes = attribute_classes(params, config, encode, tuple(config.match.attribute_labels),
                                    getattr(source, "label_names", {}))
        attribute = attribute_check.log_likelihood(image_emb[pair_set.image_index], pair_set.titles, classes)
    return ScoredPairs(split, pair_set, cos, itm, score, attribute)


def benchmark_labels(config, source) -> tuple[str, tuple[str, ...]]:
    """(type label, swap labels) from config.match, defaulting to data.label_columns[0] and the rest."""
    columns = [c for c in config.data.label_columns if c in getattr(source, "labels", {})]
    type_label = config.match.type_label or (columns[0] if columns else "")
    swap = tuple(config.match.swap_labels) or tuple(c for c in columns if c != type_label)
    if not type_label:
        raise ValueError("the pair benchmark needs a product-type label: set match.type_label to a label "
                         f"column of the catalog (data.label_columns = {tuple(config.data.label_columns)})")
    return type_label, swap


def model_logit_scale_bias(params, logit_scale_max: float) -> tuple[float, float]:
    """The model's (logit_scale, logit_bias) as the sigmoid loss uses them (scale exp'd, clamped)."""
    scale = float(np.exp(np.asarray(params["log_logit_scale"], np.float64)))
    return min(scale, float(logit_scale_max)), float(np.asarray(params["logit_bias"]))


def attribute_classes(params, config, encode, labels: tuple[str, ...],
                      label_names: dict) -> attribute_check.AttributeClasses:
    """The classes `labels` are checked against (attribute_check.attribute_classes) at the model's logit scale;
    encode: N strings -> [N, D] text embeddings; label_names: label -> the run's values."""
    logit_scale, _ = model_logit_scale_bias(params, config.model.logit_scale_max)
    return attribute_check.attribute_classes(labels, label_names, config, encode, logit_scale)


def calibrate(scored: ScoredPairs, params, config) -> Calibration:
    """Fits a Calibration (config.match) on one scored split."""
    m = config.match
    scale, bias = model_logit_scale_bias(params, config.model.logit_scale_max)
    return fit_calibration(scored.score, scored.pair_set.labels, loss_name=config.loss.name, method=m.calibration,
                           logit_scale=scale, logit_bias=bias,
                           itm_prob=scored.itm_prob, rule=m.threshold_rule, target_precision=m.target_precision,
                           fit_split=scored.split, hubness_k=m.hubness_k, attribute=scored.attribute,
                           attribute_labels=tuple(m.attribute_labels))


def evaluate(scored: ScoredPairs, calibration: Calibration, *, num_bins: int = 15,
             plot_path: str | pathlib.Path | None = None) -> dict:
    """Per score name and negative kind, the metrics at the calibration's threshold; the raw cosine's ECE
    beside the calibrated one; the pair counts. With plot_path, the reliability diagram PNG."""
    labels = scored.pair_set.labels
    probabilities = calibration.probabilities(scored.score, scored.itm_prob, scored.attribute)
    results = {"split": scored.split, "calibration": dataclasses.asdict(calibration),
               "missing_negatives": scored.pair_set.missing, "edited_titles": int(scored.pair_set.edited.sum()),
               "ece_raw_cosine": match_metrics.expected_calibration_error(raw_cosine_probability(scored.cos), labels,
                                                                          num_bins)}
    for name, prob in probabilities.items():
        results[name] = match_metrics.metrics_by_kind(prob, scored.pair_set, calibration.thresholds[name], num_bins)
    if plot_path is not None:
        curves = {"raw cosine": raw_cosine_probability(scored.cos)}
        curves.update({f"{name} (calibrated)" if name == "two_tower" else name: prob
                       for name, prob in probabilities.items()})
        match_metrics.reliability_diagram(curves, labels, plot_path, num_bins=num_bins,
                                          title=f"{scored.split}: calibration fit on {calibration.fit_split}")
    return results


def format_table(results: dict) -> str:
    """A markdown table: one row per (score, negative kind) with the headline metrics."""
    columns = ("roc_auc", "pr_auc", "accuracy", "precision", "recall", "f1", "kappa", "ece", "num_pairs")
    calibration = results["calibration"]
    lines = [f"pairs of `{results['split']}`; {calibration['method']} calibration and threshold "
             f"({calibration['rule']}) fit on `{calibration['fit_split']}`; raw-cosine ECE "
             f"{results['ece_raw_cosine']:.3f}; {results['edited_titles']} attribute_swap titles edited; "
             f"items without a negative: {results['missing_negatives']}", "",
             "| score | negatives | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for name in SCORES:
        for kind, row in results.get(name, {}).items():
            # ECE only over all pairs: one kind against the positives has another class balance than the fit
            cells = [str(row[c]) if c == "num_pairs" else "" if c == "ece" and kind != "all" else f"{row[c]:.3f}"
                     for c in columns]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_benchmark(graphdef, params, tokenizer, split_sources: dict, config, out_dir: str | pathlib.Path, *,
                  splits: list[str], fit_split: str, itm_fn: ItmFn | None = None) -> dict:
    """`prodclip match`: calibrate on `fit_split`, evaluate each of `splits`; writes match.json, match.md,
    match_reliability_<split>.png and the calibration (CALIBRATION_FILE) into out_dir. Returns the results."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = {s: score_split(graphdef, params, split_sources[s], tokenizer, config, s, itm_fn=itm_fn)
              for s in dict.fromkeys([fit_split, *splits])}
    calibration = calibrate(scored[fit_split], params, config)
    calibration.save(out_dir / CALIBRATION_FILE)
    results = {s: evaluate(scored[s], calibration, num_bins=config.match.ece_bins,
                           plot_path=out_dir / f"match_reliability_{s}.png") for s in splits}
    (out_dir / "match.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out_dir / "match.md").write_text("\n\n".join(format_table(r) for r in results.values()) + "\n")
    return results
