"""model.text.bert.mean_layers with a locked, cached BERT text tower: the cache holds the wider
features, its key follows the layers, and the run trains the head on them."""

import jax
import numpy as np
from multihost_worker import tiny_model
from test_image_cache import tiny_config as cache_config

from prodclip import run, text_cache, train
from prodclip.models.factory import merge_model

BERT = {"model.text.kind": "bert", "model.text.mask": "bidirectional", "model.text.depth": 3,
        "model.text.pooling": "mean", "model.text.bert.projection": False, "model.head.text": "mlp",
        "model.head.hidden": 32, "optim.lock_text": True}


def run_config(**overrides):
    c = cache_config(**{"data.num_train": 48, "data.num_val": 16, "data.num_test": 16, "data.eval_splits": ("test",),
                        "data.image_size": 32, "train.batch_size": 16, "train.num_steps": 3, "train.log_every": 1,
                        "train.eval_every": 0, "train.progress_bar": False, "eval.batch_size": 16,
                        "eval.zeroshot_labels": (), "eval.confusion_png": False, "tokenizer.vocab_size": 200,
                        "checkpoint.async_save": False, **BERT, **overrides})
    c.lock()
    return c


def test_the_cache_holds_the_layer_means_and_the_run_trains_on_them(tmp_path):
    c = run_config(**{"model.text.bert.mean_layers": (0, 2)})
    results = train.train_and_evaluate(c, tmp_path / "run")
    assert 0.0 <= results["test"]["t2i/R@1"] <= 1.0
    (directory,) = (tmp_path / "run" / "text_cache").iterdir()
    cache = text_cache.load(directory)
    width = c.model.text.width
    assert cache.text_emb.shape[1] == 3 * width
    trained = run.load_run(tmp_path / "run")
    model = merge_model(trained.graphdef, trained.params)
    ids = jax.numpy.asarray(cache.token_ids[:4])
    np.testing.assert_allclose(cache.text_emb[:4], np.asarray(model.text_features(ids)), atol=1e-5)
    pooled, _ = model.text_tower(ids)
    final = np.linalg.norm(np.asarray(pooled[:, :width]), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pooled[:, width:]), axis=-1), final, rtol=1e-5)


def test_the_cache_key_follows_the_layers():
    tokenizer = type("Tok", (), {"hf": type("HF", (), {"get_vocab": lambda self: {"a": 0}})(), "context_length": 8,
                                 "lowercase": True, "pad_id": 0})()
    keys = set()
    for layers in ((), (0,), (0, 2)):
        c = run_config(**{"model.text.bert.mean_layers": layers})
        _, params, _, _ = tiny_model(c)
        keys.add(text_cache.cache_key(params["text_tower"], tokenizer, c))
    assert len(keys) == 3
