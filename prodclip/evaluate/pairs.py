"""An image-title pair benchmark built from any catalog split: true pairs and named kinds of mismatch.

Every item of the split gives one positive (its photo, its own title) and, per negative
kind, one negative (its photo, another title):

  random          a random other title of the split.
  same_type       the title of another product of the same type (`type_label`, e.g. articleType).
  attribute_swap  the title of another product of the same type that differs in one attribute of
                  `swap_labels` (colour, gender, pattern; tried in a random order per item). Among
                  those, products that agree on the other swap attributes are preferred: the
                  realistic listing error of a swapped colour variant. Only when the split holds no
                  such title is the item's own title edited (the attribute's value word replaced by
                  another value's), and the pair records `edited=True`.

Titles are compared case-folded with whitespace collapsed, and a negative never carries a
title identical to the positive's. An item that has no candidate for a kind (no type label, a
type with one title, no attribute word to edit) gets no negative of that kind; `missing`
counts them. Everything is drawn from one generator per (seed, kind), so the same catalog and
seed give the same pairs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from prodclip.config import NEGATIVE_KINDS

POSITIVE = "positive"


def title_key(title: str) -> str:
    """The form titles are compared in: case-folded, whitespace collapsed."""
    return " ".join(str(title).casefold().split())


@dataclasses.dataclass
class PairSet:
    """P pairs over a split of N items.

    image_index: [P] int64 row of the split whose photo the pair shows.
    titles: P strings. title_index: [P] int64 row whose title it is (-1 for an edited title).
    labels: [P] int32, 1 = true pair. kinds: P strings, "positive" or a negative kind.
    attributes: P strings, the swapped attribute of an attribute_swap pair ("" otherwise).
    edited: [P] bool, the title was made by editing a word. missing: kind -> items without one.
    """

    image_index: np.ndarray
    titles: list[str]
    title_index: np.ndarray
    labels: np.ndarray
    kinds: list[str]
    attributes: list[str]
    edited: np.ndarray
    missing: dict[str, int]

    def __len__(self) -> int:
        return len(self.titles)

    def select(self, mask: np.ndarray) -> "PairSet":
        """The pairs where `mask` ([P] bool) is set."""
        keep = np.flatnonzero(mask)
        return PairSet(self.image_index[keep], [self.titles[i] for i in keep], self.title_index[keep],
                       self.labels[keep], [self.kinds[i] for i in keep], [self.attributes[i] for i in keep],
                       self.edited[keep], dict(self.missing))


@dataclasses.dataclass
class Negative:
    title: str
    title_index: int  # -1 when edited
    attribute: str = ""
    edited: bool = False


def word_pattern(value: str) -> re.Pattern:
    """`value` as whole words, case-insensitive (a word inside a longer word or an apostrophe form does not match)."""
    return re.compile(r"(?<![\w'])" + re.escape(value) + r"(?![\w'])", re.IGNORECASE)


def edit_attribute(title: str, value: str, replacement: str) -> str | None:
    """`title` with the word(s) `value` replaced by `replacement` (case-insensitive, whole words,
    capitalised like the original); None when `value` does not occur in it."""
    pattern = word_pattern(value)
    if not value.strip() or not pattern.search(title):
        return None

    def fit_case(match: re.Match) -> str:
        found = match.group(0)
        if found.isupper() and len(found) > 1:
            return replacement.upper()
        if found[:1].isupper():
            return " ".join(w[:1].upper() + w[1:] for w in replacement.split())
        return replacement.lower()
    return pattern.sub(fit_case, title)


class NegativeSampler:
    """Draws mismatched titles for the items of one split (see the module docstring).

    titles: N strings. labels: name -> [N] int (-1 = missing). label_names: name -> class names.
    """

    def __init__(self, titles: Sequence[str], labels: dict[str, np.ndarray],
                 label_names: dict[str, Sequence[str]], *, type_label: str, swap_labels: Sequence[str]):
        for name in (type_label, *swap_labels):
            if name not in labels:
                raise ValueError(f"label {name!r} is not a label of this split; it has: {', '.join(labels) or 'none'}")
        self.titles = list(titles)
        self.keys = np.unique(np.asarray([title_key(t) for t in self.titles], dtype=object).astype(str),
                              return_inverse=True)[1]
        self.labels = {name: np.asarray(labels[name], np.int64) for name in (type_label, *swap_labels)}
        self.label_names = {name: tuple(str(n) for n in label_names.get(name, ())) for name in swap_labels}
        self.type_label, self.swap_labels = type_label, tuple(swap_labels)
        types = self.labels[type_label]
        self.groups = {int(t): np.flatnonzero(types == t) for t in np.unique(types[types >= 0])}

    def __len__(self) -> int:
        return len(self.titles)

    def draw(self, kind: str, i: int, rng: np.random.Generator) -> Negative | None:
        """One negative of `kind` for item `i`, or None when the split has no candidate."""
        if kind == "random":
            return self._random(i, rng)
        if kind == "same_type":
            candidates = self._same_type(i)
            return None if candidates is None or not len(candidates) else self._pick(candidates, rng)
        if kind == "attribute_swap":
            return self._attribute_swap(i, rng)
        raise ValueError(f"unknown negative kind {kind!r}; valid: {', '.join(NEGATIVE_KINDS)}")

    def _pick(self, candidates: np.ndarray, rng: np.random.Generator, attribute: str = "") -> Negative:
        j = int(candidates[rng.integers(len(candidates))])
        return Negative(self.titles[j], j, attribute)

    def _random(self, i: int, rng: np.random.Generator) -> Negative | None:
        for _ in range(64):  # rejection first: almost always done in one draw
            j = int(rng.integers(len(self.titles)))
            if self.keys[j] != self.keys[i]:
                return Negative(self.titles[j], j)
        candidates = np.flatnonzero(self.keys != self.keys[i])
        return self._pick(candidates, rng) if len(candidates) else None

    def _same_type(self, i: int) -> np.ndarray | None:
        group = self.groups.get(int(self.labels[self.type_label][i]))
        return None if group is None else group[self.keys[group] != self.keys[i]]

    def _attribute_swap(self, i: int, rng: np.random.Generator) -> Negative | None:
        order = [self.swap_labels[k] for k in rng.permutation(len(self.swap_labels))]
        group = self._same_type(i)
        if group is not None:
            for attribute in order:
                values = self.labels[attribute]
                if values[i] < 0:
                    continue
                candidates = group[(values[group] >= 0) & (values[group] != values[i])]
                if not len(candidates):
                    continue
                others = [self.labels[a] for a in self.swap_labels if a != attribute]
                same_rest = np.ones(len(candidates), bool)
                for other in others:
                    same_rest &= other[candidates] == other[i]
                return self._pick(candidates[same_rest] if same_rest.any() else candidates, rng, attribute)
        for attribute in order:
            edited = self._edit(i, attribute, rng)
            if edited is not None:
                return edited
        return None

    def _edit(self, i: int, attribute: str, rng: np.random.Generator) -> Negative | None:
        value, names = int(self.labels[attribute][i]), self.label_names[attribute]
        if value < 0 or value >= len(names):
            return None
        replacements = [n for k, n in enumerate(names) if k != value and n.strip()]
        if not replacements:
            return None
        edited = edit_attribute(self.titles[i], names[value], replacements[int(rng.integers(len(replacements)))])
        if edited is None or title_key(edited) == title_key(self.titles[i]):
            return None
        return Negative(edited, -1, attribute, edited=True)


def _kind_rng(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, NEGATIVE_KINDS.index(kind)])


def build_pairs(sampler: NegativeSampler, kinds: Sequence[str] = NEGATIVE_KINDS, *, seed: int = 0) -> PairSet:
    """One positive per item and one negative per item and kind (where the split has one)."""
    unknown = [k for k in kinds if k not in NEGATIVE_KINDS]
    if unknown:
        raise ValueError(f"unknown negative kinds {unknown}; valid: {', '.join(NEGATIVE_KINDS)}")
    n = len(sampler)
    image_index, titles, title_index = list(range(n)), list(sampler.titles), list(range(n))
    pair_kinds, attributes, edited = [POSITIVE] * n, [""] * n, [False] * n
    missing = {}
    for kind in kinds:
        rng, missing[kind] = _kind_rng(seed, kind), 0
        for i in range(n):
            negative = sampler.draw(kind, i, rng)
            if negative is None:
                missing[kind] += 1
                continue
            image_index.append(i)
            titles.append(negative.title)
            title_index.append(negative.title_index)
            pair_kinds.append(kind)
            attributes.append(negative.attribute)
            edited.append(negative.edited)
    labels = np.asarray([int(k == POSITIVE) for k in pair_kinds], np.int32)
    return PairSet(np.asarray(image_index, np.int64), titles, np.asarray(title_index, np.int64), labels,
                   pair_kinds, attributes, np.asarray(edited, bool), missing)


def swapped_titles(sampler: NegativeSampler, count: int, *, seed: int = 0) -> list[list[str]]:
    """Up to `count` distinct attribute_swap titles for every item: N lists (empty where the split has none).

    Hard negatives for training (loss.hard_negatives): mostly titles of other items of the same
    split, so a text cache already holds them. Drawn from their own generator, not the benchmark's.
    """
    rng = np.random.default_rng([seed, NEGATIVE_KINDS.index("attribute_swap"), count])
    out = []
    for i in range(len(sampler)):
        found: dict[str, None] = {}
        for _ in range(2 * count):
            negative = sampler.draw("attribute_swap", i, rng)
            if negative is None:
                break
            found.setdefault(negative.title)
            if len(found) == count:
                break
        out.append(list(found))
    return out


def inject_errors(sampler: NegativeSampler, fractions: dict[str, float], *, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """A copy of the catalog's titles where a fraction of listings carry a wrong title, as sellers' errors do.

    fractions: kind -> share of listings (disjoint sets of rows, e.g. {"attribute_swap": 0.05,
    "random": 0.05}). Returns (titles, injected) where injected[i] is the kind given to row i,
    or "" for an untouched row. A chosen row without a candidate of its kind stays untouched.
    """
    n = len(sampler)
    if sum(fractions.values()) > 1:
        raise ValueError(f"injection fractions {fractions} add up to more than 1")
    order = np.random.default_rng([seed, len(NEGATIVE_KINDS)]).permutation(n)
    titles, injected, start = list(sampler.titles), [""] * n, 0
    for kind, fraction in fractions.items():
        rows = order[start:start + int(round(fraction * n))]
        start += len(rows)
        rng = _kind_rng(seed, kind)
        for i in rows:
            negative = sampler.draw(kind, int(i), rng)
            if negative is not None:
                titles[i], injected[i] = negative.title, kind
    return titles, injected


def sampler_for_source(source, type_label: str, swap_labels: Sequence[str]) -> NegativeSampler:
    """A NegativeSampler over a source's titles, labels and label names."""
    from prodclip.data import pipeline

    labels = getattr(source, "labels", {})
    return NegativeSampler(pipeline.source_titles(source), labels, getattr(source, "label_names", {}),
                           type_label=type_label, swap_labels=swap_labels)
