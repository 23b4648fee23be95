"""Zero-shot classification: classes become text prompts; images go to the nearest class.

Each class embedding is the mean of its prompt embeddings (each L2-normalised),
normalised again: the prompt ensemble of the CLIP paper. A class name may list
synonyms separated by '|' ("grey|gray"); every synonym x template prompt joins
that class's ensemble.

Class names come from the dataset's label columns (`source.label_names`) and can
be renamed for prompting with `eval.class_names` entries "label:raw=readable".

A zero-shot classifier assumes every class equally likely; a catalog is not (18.5% of
Myntra's val photos are t-shirts). `estimate_class_prior` estimates the class shares of a set of
unlabelled photos by EM (Saerens, Latinne & Decaestecker, "Adjusting the outputs of a
classifier to new a priori probabilities", Neural Computation 2002), and `adapted_scores`
adds their log to the logits: no label is read, only the photos being classified.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Sequence

import numpy as np

from prodclip.config import ConfigError


def parse_class_names(entries: Sequence[str]) -> dict[str, dict[str, str]]:
    """("colour:grey=grey|gray", ...) -> {"colour": {"grey": "grey|gray"}}; raises ConfigError on bad entries."""
    out: dict[str, dict[str, str]] = {}
    for entry in entries:
        label, sep1, rest = entry.partition(":")
        raw, sep2, readable = rest.partition("=")
        if not (sep1 and sep2 and label.strip() and raw.strip() and readable.strip("| ")):
            raise ConfigError(
                f"eval.class_names entry {entry!r} must look like 'label:raw value=readable name' "
                "(synonyms separated by '|'), e.g. 'colour:grey=grey|gray'")
        out.setdefault(label.strip(), {})[raw.strip()] = readable.strip()
    return out


def prompt_names(raw_names: Sequence[str], renames: dict[str, str], label: str) -> list[str]:
    """The prompt name of each raw class name: its rename if configured, else itself.

    A rename list may cover classes that one split lacks (a small slice of a catalog), so
    unmatched renames are ignored; but if none of them matches, it is a likely typo of the
    label's values and raises ConfigError listing the valid ones.
    """
    if renames and not set(renames) & set(raw_names):
        raise ConfigError(f"eval.class_names renames {sorted(renames)} of label {label!r}, which has no such classes; "
                         f"valid: {', '.join(map(str, raw_names))}")
    return [renames.get(name, name) for name in raw_names]


def label_templates(label: str, config) -> tuple[str, ...]:
    """Prompt templates for one label: its eval.label_templates entries ("label:template"), else
    eval.prompt_templates."""
    own = [entry.partition(":")[2] for entry in config.eval.label_templates if entry.partition(":")[0] == label]
    return tuple(own) if own else tuple(config.eval.prompt_templates)


def class_embeddings(encode_titles: Callable[[Sequence[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """encode_titles: N strings -> [N, D] L2-normalised. Returns [C, D] float32, L2-normalised.

    A class name "a|b" is ensembled over both synonyms and all templates.
    """
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    synonyms = [[s.strip() for s in name.split("|") if s.strip()] or [name] for name in class_names]
    prompts = [template.format(s) for names in synonyms for s in names for template in templates]
    counts = np.asarray([len(names) * len(templates) for names in synonyms])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    emb = np.add.reduceat(encode_titles(prompts).astype(np.float64), starts, axis=0) / counts[:, None]
    return (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float32)


def estimate_class_prior(scores: np.ndarray, logit_scale: float, *, max_iter: int = 500,
                         tol: float = 1e-7) -> np.ndarray:
    """[C] float64 class shares of M unlabelled images, estimated by EM (Saerens et al., 2002).

    scores: [M, C] cosines of the images to the class embeddings; logit_scale: the model's
    inverse temperature, so that softmax(logit_scale * scores) is its posterior under equal
    priors (the zero-shot classifier's implicit ones). Each step weighs every image's posterior
    by the current shares and takes their mean as the next shares, until none moves by more
    than `tol`. A class no image supports tends to share 0.
    """
    logits = logit_scale * np.asarray(scores, np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    likelihood = np.exp(logits)
    prior = np.full(scores.shape[1], 1.0 / scores.shape[1])
    for _ in range(max_iter):
        posterior = likelihood * prior
        posterior /= posterior.sum(axis=1, keepdims=True)
        new_prior = posterior.mean(axis=0)
        if np.max(np.abs(new_prior - prior)) < tol:
            return new_prior
        prior = new_prior
    return prior


def adapted_scores(scores: np.ndarray, logit_scale: float, prior: np.ndarray) -> np.ndarray:
    """[N, C] logits with the class prior: logit_scale * scores + log(prior) (prior [C], shares)."""
    return logit_scale * np.asarray(scores, np.float64) + np.log(np.maximum(prior, 1e-300))


def classify_adapted(scores: np.ndarray, labels: np.ndarray, logit_scale: float, ks: Sequence[int] = (1, 5), *,
                     prior_scores: np.ndarray | None = None) -> dict[str, float]:
    """`classify_scores` with the class prior that `estimate_class_prior` finds in `prior_scores` [M, C]
    (cosines of other unlabelled photos, e.g. the train photos), by default in all rows of `scores`
    [N, C] (the unlabelled rows count too): labels are read for scoring only."""
    prior = estimate_class_prior(scores if prior_scores is None else prior_scores, logit_scale)
    return classify_scores(adapted_scores(scores, logit_scale, prior), labels, ks)


def classify(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
             ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_emb [N, D], class_emb [C, D], labels [N] int (negative = unlabelled, skipped).

    Returns "top{k}" accuracy for each k < C (top1 always), "mean_per_class" (the mean
    of per-class top-1 accuracy over classes present in `labels`), "weighted_f1", and
    "class/{c}" per-class top-1 accuracy for each present class index c.
    Ties go to the lower class index.
    """
    return classify_scores(image_emb @ class_emb.T, labels, ks)


def classify_scores(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`classify` on precomputed class scores [N, C] (higher = likelier), e.g. `adapted_scores`."""
    keep = labels >= 0
    scores = scores[keep]
    labels = labels[keep]
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {}
    for k in ks:
        if k < scores.shape[1] or k == 1:
            out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
    predicted = order[:, 0]
    per_class = {int(c): float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}
    out["mean_per_class"] = float(np.mean(list(per_class.values())))
    out["weighted_f1"] = weighted_f1(labels, predicted)
    out.update({f"class/{c}": acc for c, acc in per_class.items()})
    return out


def weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 per true class, averaged with weights = the class's share of `labels` (sklearn's 'weighted')."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predicted, average="weighted", zero_division=0))


def confusion_matrix(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[C, C] int64 counts: rows are true classes, columns predicted (ties to the lower index)."""
    keep = labels >= 0
    predicted = np.argmax(image_emb[keep] @ class_emb.T, axis=1)
    c = class_emb.shape[0]
    return np.bincount(labels[keep] * c + predicted, minlength=c * c).reshape(c, c)


def plot_confusion(counts: np.ndarray, class_names: Sequence[str], path: str | pathlib.Path,
                   title: str = "") -> pathlib.Path:
    """Writes a row-normalised confusion-matrix heatmap (true rows, predicted columns) to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.35 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
    names = [n.split("|")[0] for n in class_names]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
