"""evaluate_all: each split goes through the model once, and every evaluator reads that pass."""

import numpy as np
import pytest

from prodclip import config_loading
from prodclip import run as run_lib
from prodclip.evaluate import suite, zeroshot
from prodclip.models import factory, inference

TINY_MODEL = (
    "--config.data.image_size=32", "--config.model.image.patch_size=8", "--config.model.embed_dim=16",
    "--config.model.image.width=16", "--config.model.image.depth=1", "--config.model.image.num_heads=2",
    "--config.model.text.width=16", "--config.model.text.depth=1", "--config.model.text.num_heads=2",
    "--config.tokenizer.vocab_size=200", "--config.eval.batch_size=16", "--config.optim.warmup_steps=0")


def tiny_config(*overrides: str):
    """The default config with a one-block, 16-wide model on 32 px images, and `overrides` on top."""
    return config_loading.load(None, [*TINY_MODEL, *overrides])


def test_each_split_is_embedded_once_and_probes_reuse_it(tmp_path, monkeypatch):
    config = tiny_config(
        "--config.data.num_train=64", "--config.data.num_test=24", "--config.data.num_compositional=24",
        "--config.eval.linear_probe_labels=('category',)", "--config.eval.zeroshot_labels=('category',)")
    splits = ("train", *config.data.eval_splits)
    tokenizer, sources, label_stats = run_lib.load_tokenizer_and_sources(config, tmp_path, splits)
    graphdef, params = factory.create_model(config, tokenizer, seed=0)

    passes = []
    real = inference.embed_source

    def counted(graphdef, params, source, *args, **kw):
        passes.append(next(name for name, s in sources.items() if s is source))
        return real(graphdef, params, source, *args, **kw)

    monkeypatch.setattr(inference, "embed_source", counted)
    results = suite.evaluate_all(graphdef, params, sources, tokenizer, config, label_stats)
    assert sorted(passes) == sorted(splits)  # train once for the probes, each eval split once

    # The shared pass gives the numbers a split evaluated on its own gives, exactly.
    monkeypatch.setattr(inference, "embed_source", real)
    for split in config.data.eval_splits:
        assert 0.0 <= results[split]["baseline/category/linear_probe/top1"] <= 1.0
        alone = suite.evaluate_split(graphdef, params, sources[split], tokenizer, config, label_stats=label_stats)
        for key, value in alone.items():
            np.testing.assert_array_equal(results[split][key], value, err_msg=key)


def test_short_queries_are_shortened_titles_and_keep_one_equals_full_titles(tmp_path):
    config = tiny_config(
        "--config.data.num_train=32", "--config.data.num_test=24", "--config.data.eval_splits=('test',)",
        "--config.eval.zeroshot_labels=()", "--config.eval.short_query_keep_prob=1.0")
    tokenizer, sources, _ = run_lib.load_tokenizer_and_sources(config, tmp_path, ("train", "test"))
    graphdef, params = factory.create_model(config, tokenizer, seed=0)
    full = suite.evaluate_split(graphdef, params, sources["test"], tokenizer, config, with_zeroshot=False)
    for k in (1, 5, 10):
        assert full[f"t2i_short/R@{k}"] == full[f"t2i/R@{k}"]  # keep every word: the same queries
    words = np.mean([len(t.split()) for t in sources["test"].titles])
    assert full["t2i_short/mean_query_words"] == words
    config.eval.short_query_keep_prob = 0.3
    short = suite.evaluate_split(graphdef, params, sources["test"], tokenizer, config, with_zeroshot=False)
    assert short["t2i_short/mean_query_words"] < 0.6 * words and 0.0 <= short["t2i_short/R@10"] <= 1.0
    assert short["t2i/R@10"] == full["t2i/R@10"]


def test_querybank_metrics_read_the_run_s_train_split_and_never_the_split_itself(tmp_path, caplog):
    from prodclip.data import pipeline
    from prodclip.evaluate import querybank, retrieval

    config = tiny_config(
        "--config.data.num_train=48", "--config.data.num_test=24", "--config.data.eval_splits=('test',)",
        "--config.eval.zeroshot_labels=('category',)", "--config.eval.querybank_k=3")
    tokenizer, sources, _ = run_lib.load_tokenizer_and_sources(config, tmp_path, ("train", "test"))
    graphdef, params = factory.create_model(config, tokenizer, seed=0)
    # An eval split named "train" (another catalog's file) is evaluated; the bank is the run's own train split.
    results = suite.evaluate_all(graphdef, params, {"train": sources["test"]}, tokenizer,
                                 _with_splits(config, ("train",)),
                                 train_source=sources["train"])
    image_emb, text_emb = inference.embed_source(graphdef, params, sources["test"], tokenizer, config)
    bank = inference.title_encoder(graphdef, params, tokenizer, 16)(
        querybank.bank_titles(pipeline.source_titles(sources["train"])))
    keys, _ = suite.retrieval_keys(sources["test"])
    q, g = querybank.with_density(text_emb, image_emb, querybank.densities(image_emb, bank, 3))
    want = retrieval.retrieval_metrics(q, g, keys, keys, ks=(1, 5, 10))
    assert results["train"]["t2i_bank/R@1"] == want["R@1"] and results["train"]["t2i_bank/R@10"] == want["R@10"]
    # Zero-shot: each class prompt lowered by half its mean top-3 cosine to the run's train photos.
    photos = inference.embed_images(graphdef, params, sources["train"], tokenizer, config, test_time_flip=False)
    _, names, labels = suite.zeroshot_classes("category", sources["test"], config, None)
    class_emb = zeroshot.class_embeddings(inference.title_encoder(graphdef, params, tokenizer, 16), names,
                                          zeroshot.label_templates("category", config))
    offset = 0.5 * np.sort(class_emb @ photos.T, axis=1)[:, -3:].mean(axis=1)
    want = zeroshot.classify_scores(image_emb @ class_emb.T - offset[None, :], labels)
    assert results["train"]["zeroshot/category/bank/top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert results["train"]["zeroshot/category/bank/weighted_f1"] == pytest.approx(want["weighted_f1"], abs=1e-9)
    # A split read from the train split's own file gets no querybank metrics, and says why.
    one_file = {split: _OnePath(source, "/catalog/one_file.parquet") for split, source in sources.items()}
    results = suite.evaluate_all(graphdef, params, one_file, tokenizer, config)
    assert not any(key.startswith(("t2i_bank/", "i2t_bank/")) or "/bank/" in key for key in results["test"])
    assert "zeroshot/category/top1" in results["test"]
    assert "train split's file" in caplog.text


def _with_splits(config, splits):
    import copy

    config = copy.deepcopy(config)
    config.data.eval_splits = splits
    return config


class _OnePath:
    """A split as a one-file catalog would give it: the source, with the file's path."""

    def __init__(self, source, path):
        self.source, self.path = source, path

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]

    def __getattr__(self, name):
        return getattr(self.source, name)
