"""Evaluating a trained run on a catalog that is not its own.

    prodclip eval --workdir RUN --config.data.path=OTHER.parquet

What the numbers mean:
  - the whole file is evaluated: the run's data.num_train / num_val / num_test cap the run's
    own splits, never this catalog;
  - one file is one eval split, named after the file ("other" for other.parquet); a folder is
    evaluated on the data.eval_splits it holds (an error names the ones it lacks);
  - labels are mapped through the run's vocabularies (labels.json): a value the run was not
    trained on counts as unlabelled for that label, and the rows are counted and reported
    ("labels/<label>/unseen_rows"); a label column the file lacks is skipped with a message;
  - the baselines (majority class, linear probe) are fitted on the run's own train split
    (the data config saved in the workdir), or not reported, with a message, when that split
    cannot be read; so are the class shares of eval.zeroshot_train_prior (the training
    catalog's, not this one's).
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib

import ml_collections

from prodclip import errors, image_cache, text_cache
from prodclip import run as run_lib
from prodclip.data import sources
from prodclip.evaluate import suite

log = logging.getLogger("prodclip")


def run_data_config(workdir: str | pathlib.Path) -> dict | None:
    """The `data` config the run in `workdir` was trained with (its config.json), or None."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("data")


def is_other_catalog(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> bool:
    """True when `config.data` names a catalog (data.name=catalog) at another path than the run's own."""
    run_data = run_data_config(workdir)
    if config.data.name != "catalog" or run_data is None:
        return False
    return run_data.get("name") != "catalog" or run_data.get("path") != config.data.path


def catalog_splits(config: ml_collections.ConfigDict) -> dict[str, pathlib.Path]:
    """Split name -> file to evaluate: one file (named by its stem), or the eval splits of a folder."""
    path = config.data.path
    if "{split}" not in path and pathlib.Path(path).is_file():
        return {pathlib.Path(path).stem: pathlib.Path(path)}
    return {split: sources.catalog_file(path, split) for split in config.data.eval_splits}


def run_train_source(workdir: pathlib.Path, config: ml_collections.ConfigDict, vocab: dict):
    """The run's own train split (its saved data config), labels indexed by `vocab`; None if unreadable."""
    from prodclip import config_loading

    own = copy.deepcopy(config)
    for key, value in (run_data_config(workdir) or {}).items():
        if key in own.data:
            config_loading.set_field(own, f"data.{key}", tuple(value) if isinstance(value, list) else value)
    try:
        return sources.make_source(own, "train", vocab)
    except errors.DataError as e:
        log.warning("baselines, train class shares and querybank metrics not reported: the run's own train split "
                    "cannot be read (%s)", e)
        return None


def cached_train_embeddings(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, run,
                            train_source) -> dict:
    """{"train_image_emb", "train_title_emb"}: the train photos' and distinct train titles' embeddings from
    the run's image and text caches where they hold them (else None: evaluation runs the towers)."""
    return {"train_image_emb": image_cache.cached_train_embeddings(config, workdir, run.graphdef, run.params,
                                                                   train_source),
            "train_title_emb": text_cache.cached_train_titles(config, workdir, run.graphdef, run.params,
                                                              run.tokenizer, train_source)}


def evaluate_on_catalog(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Metrics of the run in `workdir` on the catalog `config.data` names (see the module docstring).

    Returns {split: {metric: value}}, with "labels/<label>/unseen_rows" per label and, when the
    run's train split is readable and eval.linear_probe_labels is set, "baseline/..." metrics;
    also written to workdir/catalog_eval.json and .md beside the other catalogs evaluated at the same
    step, confusion plots to workdir/catalog_eval_confusion (the run's own eval.json and plots are
    left alone).
    """
    workdir = pathlib.Path(workdir)
    files = catalog_splits(config)  # raises DataError before anything is loaded or written
    run = run_lib.load_run(workdir, config)
    graphdef, params, tokenizer, label_stats = run.graphdef, run.params, run.tokenizer, run.label_stats
    vocab = {label: stats["names"] for label, stats in (label_stats or {}).items()}
    split_sources = {split: sources.open_catalog(config, path, label_vocab=vocab) for split, path in files.items()}
    # The run's own train split stays apart from this catalog's splits, one of which may be named train.
    train_source = run_train_source(workdir, config, vocab) if suite.reads_train_split(config) else None
    sources.report_skipped({s: split_sources[s] for s in files}, workdir, name="catalog_eval_skipped_rows.jsonl")
    eval_config = copy.deepcopy(config)
    eval_config.data.eval_splits = tuple(files)
    results = suite.evaluate_all(graphdef, params, split_sources, tokenizer, eval_config, label_stats,
                                 plot_dir=workdir / "catalog_eval_confusion", train_source=train_source,
                                 **cached_train_embeddings(config, workdir, run, train_source))
    for split in files:
        source = split_sources[split]
        for label in source.labels:
            results[split][f"labels/{label}/unseen_rows"] = sum(source.unseen_labels.get(label, {}).values())
    step = run.meta.get("step")
    suite.write_results(workdir, {**earlier_catalogs(workdir, step), **results}, step=step, name="catalog_eval")
    return results


def earlier_catalogs(workdir: pathlib.Path, step: int | None) -> dict:
    """The results of other catalogs already in workdir/catalog_eval.json for the same checkpoint step,
    kept beside a new catalog's (a catalog evaluated again, by its split name, is replaced)."""
    path = workdir / "catalog_eval.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("catalog_eval.json could not be read; it is replaced by this catalog's results")
        return {}
    if not isinstance(earlier, dict) or earlier.get("step") != step:
        log.warning("catalog_eval.json held results of step %s; replaced by step %s",
                    earlier.get("step") if isinstance(earlier, dict) else None, step)
        return {}
    return {split: metrics for split, metrics in earlier.items() if split != "step" and isinstance(metrics, dict)}
