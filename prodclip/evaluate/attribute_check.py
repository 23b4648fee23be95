"""Does the colour (gender, ...) that a title names fit its photo? A zero-shot check of the title's attribute words.

A match verdict scores the cosine of the photo with the whole title, which one colour or gender
word moves little: a listing whose title is a colour variant's ("Men Blue Shirt" on a red shirt)
keeps most of its cosine through the brand and the type. This check reads those words on their
own. For each label of `match.attribute_labels` (e.g. baseColour, gender) it finds the label's
values that the title names as whole words ("Navy Blue" before "Blue", which inside it does not
count again), classifies the photo zero-shot over all of the label's values (the eval prompts,
zeroshot.py) at the model's logit scale, and takes

    attribute log-likelihood = sum over labels of max over the named values of log p(value | photo)

where a label whose values the title names none of adds 0. The match calibration
(matching.fit_calibration) weighs it beside the pair score with a logistic fit on the fit
split's pairs, so the weight is learnt there, not set by hand. The values are the run's label
vocabulary (labels.json, the train split's), so an audited catalog needs no label columns.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from prodclip.evaluate import pairs, zeroshot


@dataclasses.dataclass
class AttributeClasses:
    """What titles are checked against.

    labels: the checked labels, in order. names: label -> its raw values (what titles are searched
    for). embeddings: label -> [C, D] float32 L2-normalised class embeddings (the zero-shot prompts).
    logit_scale: the model's inverse temperature (the softmax of logit_scale * cosine is its posterior).
    """

    labels: tuple[str, ...]
    names: dict[str, list[str]]
    embeddings: dict[str, np.ndarray]
    logit_scale: float
    patterns: dict[str, list[tuple[int, re.Pattern]]] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.patterns = {label: value_patterns(self.names[label]) for label in self.labels}


def attribute_classes(labels: Sequence[str], label_names: dict[str, Sequence[str]], config,
                      encode_titles: Callable[[Sequence[str]], np.ndarray], logit_scale: float) -> AttributeClasses:
    """The classes of `labels` (names from `label_names`, the run's vocabulary), embedded as zero-shot prompts
    (eval.class_names renames, eval.label_templates / prompt_templates). Raises ValueError naming a label the
    run does not have."""
    missing = [label for label in labels if label not in label_names]
    if missing:
        raise ValueError(f"match.attribute_labels {missing} are not labels of the run; it has: "
                         f"{', '.join(label_names) or 'none'}")
    renames = zeroshot.parse_class_names(config.eval.class_names)
    names, embeddings = {}, {}
    for label in labels:
        names[label] = [str(n) for n in label_names[label]]
        prompts = zeroshot.prompt_names(names[label], renames.get(label, {}), label)
        embeddings[label] = zeroshot.class_embeddings(encode_titles, prompts, zeroshot.label_templates(label, config))
    return AttributeClasses(tuple(labels), names, embeddings, float(logit_scale))


def value_patterns(names: Sequence[str]) -> list[tuple[int, re.Pattern]]:
    """(index, whole-word pattern) of each non-blank value of `names`, the longest value first."""
    order = sorted((i for i, n in enumerate(names) if str(n).strip()), key=lambda i: -len(str(names[i])))
    return [(i, pairs.word_pattern(str(names[i]))) for i in order]


def named_values(title: str, patterns: Sequence[tuple[int, re.Pattern]]) -> list[int]:
    """Indices of the values that `title` names (`patterns` from value_patterns).

    Longer values are matched first, and a value found only inside a longer named one ("Blue" in
    "Navy Blue") is not counted again; "Black and White" names both.
    """
    claimed: list[tuple[int, int]] = []
    found = []
    for i, pattern in patterns:
        free = [m.span() for m in pattern.finditer(title)
                if not any(start <= m.start() and m.end() <= end for start, end in claimed)]
        if free:
            found.append(i)
            claimed.extend(free)
    return found


def log_posteriors(image_emb: np.ndarray, classes: AttributeClasses, label: str) -> np.ndarray:
    """[P, C] float64 log p(value | photo) over one label's values: the zero-shot softmax at the logit scale."""
    logits = classes.logit_scale * (np.asarray(image_emb, np.float64) @ classes.embeddings[label].astype(np.float64).T)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def log_likelihood(image_emb: np.ndarray, titles: Sequence[str], classes: AttributeClasses) -> np.ndarray:
    """[P] float64 attribute log-likelihood (module docstring) of P pairs: photo embeddings [P, D]
    (L2-normalised) and their titles."""
    return check(image_emb, titles, classes)[0]


def check(image_emb: np.ndarray, titles: Sequence[str], classes: AttributeClasses) -> tuple[np.ndarray, list[dict]]:
    """([P] attribute log-likelihood, P evidence dicts) of P pairs (photo embeddings [P, D], titles).

    A pair's evidence has, per label its title names a value of, {"named": the best named value,
    "p_named": its probability, "photo": the photo's likeliest value, "p_photo": its probability}:
    what an audit shows beside a flagged listing ("title says Blue, photo looks Red").
    """
    out = np.zeros(len(titles), np.float64)
    evidence: list[dict] = [{} for _ in titles]
    for label in classes.labels:
        log_p = log_posteriors(image_emb, classes, label)
        likeliest = np.argmax(log_p, axis=1)
        names = classes.names[label]
        for p, title in enumerate(titles):
            found = named_values(str(title), classes.patterns[label])
            if found:
                best = found[int(np.argmax(log_p[p, found]))]
                out[p] += log_p[p, best]
                evidence[p][label] = {"named": names[best], "p_named": round(float(np.exp(log_p[p, best])), 4),
                                      "photo": names[likeliest[p]],
                                      "p_photo": round(float(np.exp(log_p[p, likeliest[p]])), 4)}
    return out, evidence
