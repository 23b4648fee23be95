"""The classic baseline end to end: ResNet + a locked, imported BERT (text cache) + concat matcher, stopped
by train.max_train_seconds, then evaluated."""

import pathlib

import numpy as np
import pytest

from prodclip import config as config_lib
from prodclip import run as run_lib
from prodclip import convert_bert, train
from prodclip.data import synthetic
from prodclip.data import tokenizer as tokenizer_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def make_bert_dir(directory: pathlib.Path) -> transformers.BertModel:
    """A tiny random BertModel with a WordPiece tokenizer trained on synthetic titles."""
    titles = synthetic.make_catalog("train", 200, seed=0, image_size=32).titles
    tok = tokenizer_lib.train_tokenizer(titles, vocab_size=200)
    tok.save_pretrained(str(directory))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, pad_token_id=tok.pad_token_id))
    model.save_pretrained(str(directory))
    return model


@pytest.mark.slow  # ~35 s, mostly compiling the 8-device step; the wiring check, not a must-show of issue 14
def test_resnet_locked_bert_matcher_run(tmp_path):
    hf_model = make_bert_dir(tmp_path / "bert")
    c = config_lib.base_config()
    c.data.image_size = 32
    c.data.num_train, c.data.num_val, c.data.num_test = 128, 32, 32
    c.data.eval_splits = ("test",)
    c.data.title_dropout_prob = 0.0
    c.tokenizer.context_length = 12
    c.model.embed_dim = 8
    c.model.image.update(dict(kind="resnet", pooling="gap"))
    c.model.image.resnet.update(dict(depth=18, width_mult=0.125, norm_groups=4))
    convert_bert.use_pretrained_text(c, tmp_path / "bert", pooling="cls")
    c.model.matcher.kind = "concat"
    c.optim.lock_text = True
    c.optim.warmup_steps = 0
    c.train.update(dict(batch_size=16, num_steps=10_000, log_every=2, eval_every=0, progress_bar=False,
                        max_train_seconds=2.0))
    c.eval.update(dict(batch_size=32, zeroshot_labels=(), confusion_png=False))
    c.checkpoint.async_save = False
    c.lock()
    workdir = tmp_path / "run"

    results = train.train_and_evaluate(c, workdir)

    assert 1 <= results["train_steps"] < 10_000
    assert 0.0 <= results["test"]["t2i/R@1"] <= results["test"]["t2i/R@10"] <= 1.0
    assert len(list((workdir / "text_cache").glob("*/text_emb.npy"))) == 1
    run = run_lib.load_run(workdir, c)
    params, meta = run.params, run.meta
    assert meta["step"] == results["train_steps"]
    assert "matcher" in params and "blocks" in params["image_tower"]
    # The locked text tower is still exactly the imported BERT.
    hf = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(params["text_tower"]["blocks"][0]["attn"]["query"]["kernel"]),
                                  hf["encoder.layer.0.attention.self.query.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["text_tower"]["token_embed"]["embedding"]),
                                  hf["embeddings.word_embeddings.weight"])
