"""A tiny end-to-end run through the real CLI: train, evaluate, re-evaluate from the workdir."""

import json
import pathlib

import pytest

from prodclip import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "--config.data.num_train=256", "--config.data.num_val=64", "--config.data.num_test=64",
    "--config.data.num_compositional=64", "--config.model.image.depth=1", "--config.model.text.depth=1",
    "--config.model.image.width=32", "--config.model.text.width=32", "--config.model.embed_dim=16",
    "--config.model.image.num_heads=2", "--config.model.text.num_heads=2",
    "--config.train.batch_size=32", "--config.train.num_steps=6", "--config.optim.warmup_steps=2",
    "--config.train.log_every=3", "--config.train.eval_every=3", "--config.train.progress_bar=False",
    "--config.eval.batch_size=32", "--config.tokenizer.vocab_size=300",
]


def test_train_then_eval_through_cli(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(workdir), *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "t2i/R@1" in out and "zeroshot/category/top1" in out
    results = json.loads((workdir / "eval.json").read_text())
    assert set(results) >= {"test", "compositional", "step"}
    for split in ("test", "compositional"):
        for key in ("i2t/R@1", "t2i/R@10", "zeroshot/category/top1"):
            assert 0.0 <= results[split][key] <= 1.0
        assert results[split]["t2i/R@1"] <= results[split]["t2i/R@5"] <= results[split]["t2i/R@10"]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "train/loss" in l] == [3, 6]
    assert any("val/t2i/R@1" in l for l in lines)
    assert list((workdir / "tensorboard").glob("events.*"))
    assert (workdir / "tokenizer" / "tokenizer_config.json").exists()

    # Re-evaluation from the workdir alone gives the same numbers.
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    again = json.loads((workdir / "reeval.json").read_text())
    for split in ("test", "compositional"):
        for key, value in results[split].items():
            assert again[split][key] == pytest.approx(value, abs=1e-6), key


def test_cli_rejects_unknown_key_before_compute(tmp_path, capsys):
    code = cli.main(["train", "--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(tmp_path / "x"),
                     "--config.train.batchsize=8"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.batchsize" in err and "train.batch_size" in err
    assert not (tmp_path / "x").exists()
