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
from typing import Any, Callable, Iterable

import ml_collections

from prodclip import checkpoint, config_loading, optim
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


def load_tokenizer_and_sources(config: ml_collections.ConfigDict, workdir: pathlib.Path, splits: Iterable[str],
                               check: Callable[[dict], None] | None = None):
    """(tokenizer, {split: source}, label_stats) of a run.

    The tokenizer and label vocabulary come from the workdir when it has them (a finished
    run evaluated on a new catalog file); otherwise they are made from the train split and
    saved there. check: called with {split: source} before anything is written; it raises
    to stop the run.
    """
    workdir = pathlib.Path(workdir)
    splits = list(splits)
    label_stats = sources.load_label_vocabulary(workdir)
    saved_vocab = {label: stats["names"] for label, stats in (label_stats or {}).items()}
    needs_train = "train" in splits or label_stats is None or not (workdir / "tokenizer").exists()
    # The train split indexes its labels with the saved vocabulary too, so that baselines fit on it
    # predict the classes the eval splits are indexed with.
    train_source = sources.make_source(config, "train", saved_vocab or None) if needs_train else None
    new_stats = sources.label_vocabulary(train_source) if label_stats is None and train_source is not None else None
    vocab = {label: stats["names"] for label, stats in (label_stats or new_stats or {}).items()}
    split_sources = {split: train_source if split == "train" else sources.make_source(config, split, vocab)
                     for split in splits}
    if check is not None:
        check(split_sources)
    # Every split was readable: only now is anything written into the workdir.
    if new_stats is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        sources.save_label_vocabulary(workdir, new_stats)
        label_stats = new_stats
    train_titles = pipeline.source_titles(train_source) if train_source is not None else None
    tokenizer = tokenizer_lib.tokenizer_from_config(config, train_titles, workdir / "tokenizer")
    return tokenizer, split_sources, label_stats


def load_run(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None,
             splits: Iterable[str] = (), step: int | None = None) -> Run:
    """Rebuilds the run in `workdir` (a training workdir or an export dir).

    config: default the run's own config.json (`config_loading.load(workdir)`). splits: the data
    splits to open. step: a checkpoint step (default the newest valid one).
    Raises errors.CheckpointError when there is nothing to load.
    """
    workdir = pathlib.Path(workdir)
    config = config if config is not None else config_loading.load(workdir)
    checkpoint.check_loadable(workdir)  # before anything (tokenizer, labels.json) is written there
    tokenizer, split_sources, label_stats = load_tokenizer_and_sources(config, workdir, splits)
    graphdef, params = factory.create_model(config, tokenizer, config.seed)
    params, meta = checkpoint.load_params(workdir, config, optim.init_train_state(config, params), step=step)
    return Run(config=config, graphdef=graphdef, params=params, tokenizer=tokenizer, sources=split_sources,
               meta=meta, label_stats=label_stats)
