"""evaluate_all: each split goes through the model once, and every evaluator reads that pass."""

import numpy as np

from prodclip import config_loading
from prodclip import run as run_lib
from prodclip.evaluate import suite
from prodclip.models import factory, inference


def test_each_split_is_embedded_once_and_probes_reuse_it(tmp_path, monkeypatch):
    config = config_loading.load(None, [
        "--config.data.num_train=64", "--config.data.num_test=24", "--config.data.num_compositional=24",
        "--config.data.image_size=32", "--config.model.image.patch_size=8", "--config.model.embed_dim=16",
        "--config.model.image.width=16", "--config.model.image.depth=1", "--config.model.image.num_heads=2",
        "--config.model.text.width=16", "--config.model.text.depth=1", "--config.model.text.num_heads=2",
        "--config.tokenizer.vocab_size=200", "--config.eval.batch_size=16", "--config.optim.warmup_steps=0",
        "--config.eval.linear_probe_labels=('category',)", "--config.eval.zeroshot_labels=('category',)"])
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
    config = config_loading.load(None, [
        "--config.data.num_train=32", "--config.data.num_test=24", "--config.data.eval_splits=('test',)",
        "--config.data.image_size=32", "--config.model.image.patch_size=8", "--config.model.embed_dim=16",
        "--config.model.image.width=16", "--config.model.image.depth=1", "--config.model.image.num_heads=2",
        "--config.model.text.width=16", "--config.model.text.depth=1", "--config.model.text.num_heads=2",
        "--config.tokenizer.vocab_size=200", "--config.eval.batch_size=16", "--config.optim.warmup_steps=0",
        "--config.eval.zeroshot_labels=()", "--config.eval.short_query_keep_prob=1.0"])
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
