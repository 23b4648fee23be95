"""Fusion through the real CLI: train a tiny fusion model, evaluate with re-ranking, search, export."""

import json
import pathlib

import pytest
from test_e2e import TINY

from prodclip import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
FUSION = ["--config.model.fusion.width=16", "--config.model.fusion.depth=1", "--config.model.fusion.num_heads=2",
          "--config.eval.rerank_k=8", "--config.train.eval_every=0", "--config.eval.zeroshot_labels=()"]


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fusion") / "run"
    code = cli.main(["train", "--config", str(ROOT / "configs" / "quickstart_fusion.py"), "--workdir", str(workdir),
                     *TINY, *FUSION])
    assert code == 0
    return workdir


def test_train_reports_itm_and_reranked_retrieval(fusion_run, capsys):
    results = json.loads((fusion_run / "eval.json").read_text())
    for split in ("test", "compositional"):
        r = results[split]
        for direction in ("t2i", "i2t"):
            assert r[f"{direction}/rerank/k"] == 8
            assert r[f"{direction}/rerank/pairs_scored"] == 64 * 8  # queries x k, not queries x gallery
            assert r[f"{direction}/rerank/ms_per_query"] > 0
            # Re-ranking permutes the top 8 only: R@k for k >= 8 cannot change.
            assert r[f"{direction}/rerank/R@10"] == pytest.approx(r[f"{direction}/R@10"])
    lines = [json.loads(l) for l in (fusion_run / "metrics.jsonl").read_text().splitlines()]
    assert all({"train/itm_loss", "train/contrastive_loss", "train/itm_accuracy"} <= set(l) for l in lines
               if "train/loss" in l)

    assert cli.main(["eval", "--workdir", str(fusion_run)]) == 0
    out = capsys.readouterr().out
    assert "fusion re-ranking" in out and "re-ranked R@1" in out
    again = json.loads((fusion_run / "reeval.json").read_text())
    assert again["test"]["t2i/rerank/R@1"] == pytest.approx(results["test"]["t2i/rerank/R@1"], abs=1e-6)


def test_search_export_and_convert_with_fusion(fusion_run, tmp_path, capsys):
    store = tmp_path / "store"
    assert cli.main(["embed", "--workdir", str(fusion_run), "--out", str(store), "--split", "test"]) == 0
    capsys.readouterr()
    assert cli.main(["search", "red shirt", "--store", str(store), "--workdir", str(fusion_run), "-k", "3",
                     "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all("two_tower_rank" in h for h in hits)  # re-ranked from the two-tower top eval.rerank_k = 8
    assert all(1 <= h["two_tower_rank"] <= 8 for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # The inference export keeps the fusion params: its evaluation re-ranks the same way.
    export = tmp_path / "export"
    assert cli.main(["export", "--workdir", str(fusion_run), "--out", str(export)]) == 0
    assert cli.main(["eval", "--workdir", str(export)]) == 0
    trained = json.loads((fusion_run / "eval.json").read_text())
    exported = json.loads((export / "reeval.json").read_text())
    for key in ("t2i/rerank/R@1", "i2t/rerank/R@5", "t2i/R@1"):
        assert exported["test"][key] == pytest.approx(trained["test"][key], abs=1e-6), key

    # A transformers CLIPModel has no fusion encoder: the HF export refuses, naming the option.
    capsys.readouterr()
    assert cli.main(["convert", "export", str(fusion_run), "--out", str(tmp_path / "hf")]) == 2
    assert "model.fusion.enabled=True" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
