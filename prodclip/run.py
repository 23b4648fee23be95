"""A run on disk -> the objects that use it: `load_run(workdir) -> Run`.

A run (a training workdir or an export dir) holds its config.json, its tokenizer,
its label vocabulary and its checkpoints. `load_run` rebuilds all of them; eval,
embed, search, match, audit, export and sweep load a trained model only through it.
`load_tokenizer_and_sources` is the data half, shared with training (which makes
the tokenizer and label vocabulary from the train split when the workdir has none).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterable

import ml_collections

from prodclip import checkpoint, optim
from prodclip import config as config_lib
from prodclip.data import pipeline, sources
from prodclip.data import tokenizer as tokenizer_lib
from prodclip.models import factory


@dataclasses.dataclass(frozen=True)
class Run:
    """A loaded run.

    config: the run's config (locked). graphdef, params: the model (`factory.merge_model`).
    tokenizer: its TitleTokenizer. sources: the requested splits by name. meta: the checkpoint's
    metadata ({"step": ..., ...}). label_stats: the label vocabulary and train counts (or None).
    """

    config: ml_collections.ConfigDict
    graphdef: Any
    params: Any
    tokenizer: tokenizer_lib.TitleTokenizer
    sources: dict[str, Any]
    meta: dict
    label_stats: dict | None


def load_tokenizer_and_sources(config: ml_collections.ConfigDict, workdir: pathlib.Path, splits: Iterable[str]):
    """(tokenizer, {split: source}, label_stats) of a run.

    The tokenizer and label vocabulary come from the workdir when it has them (a finished
    run evaluated on a new catalog file); otherwise they are made from the train split and
    saved there.
    """
    workdir = pathlib.Path(workdir)
    splits = list(splits)
    label_stats = sources.load_label_vocabulary(workdir)
    needs_train = "train" in splits or label_stats is None or not (workdir / "tokenizer").exists()
    train_source = sources.make_source(config, "train") if needs_train else None
    if label_stats is None and train_source is not None:
        label_stats = sources.label_vocabulary(train_source)
        sources.save_label_vocabulary(workdir, label_stats)
    vocab = {label: stats["names"] for label, stats in (label_stats or {}).items()}
    split_sources = {split: train_source if split == "train" else sources.make_source(config, split, vocab)
                     for split in splits}
    train_titles = pipeline.source_titles(train_source) if train_source is not None else None
    tokenizer = tokenizer_lib.tokenizer_from_config(config, train_titles, workdir / "tokenizer")
    return tokenizer, split_sources, label_stats


def load_run(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None,
             splits: Iterable[str] = (), step: int | None = None) -> Run:
    """Rebuilds the run in `workdir` (a training workdir or an export dir).

    config: default the run's own config.json (`config.load(workdir)`). splits: the data
    splits to open. step: a checkpoint step (default the newest valid one).
    Raises errors.CheckpointError when there is nothing to load.
    """
    workdir = pathlib.Path(workdir)
    config = config if config is not None else config_lib.load(workdir)
    tokenizer, split_sources, label_stats = load_tokenizer_and_sources(config, workdir, splits)
    graphdef, params = factory.create_model(config, tokenizer, config.seed)
    params, meta = checkpoint.load_params(workdir, config, optim.init_train_state(config, params), step=step)
    return Run(config=config, graphdef=graphdef, params=params, tokenizer=tokenizer, sources=split_sources,
               meta=meta, label_stats=label_stats)
