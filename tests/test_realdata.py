"""Real catalog (Myntra, ../shared/data/myntra): a few steps of training and evaluation through the CLI.

Skips with a message when the data directory is absent; where it is present (as on CI) it runs
as part of `make test`.
"""

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prodclip import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
MYNTRA = ROOT.parent / "shared" / "data" / "myntra"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (MYNTRA / "train.parquet").exists(),
                       reason=f"Myntra catalog not found at {MYNTRA}; see README 'Real catalog' to get it"),
]

TINY = [
    f"--config.data.path={MYNTRA}", "--config.data.num_train=512", "--config.data.num_val=256",
    "--config.model.image.depth=1", "--config.model.text.depth=1", "--config.model.image.width=32",
    "--config.model.text.width=32", "--config.model.embed_dim=16", "--config.model.image.num_heads=2",
    "--config.model.text.num_heads=2", "--config.model.image.patch_size=16", "--config.train.batch_size=32",
    "--config.train.num_steps=4", "--config.optim.warmup_steps=1", "--config.train.log_every=2",
    "--config.train.eval_every=0", "--config.train.progress_bar=False", "--config.tokenizer.vocab_size=400",
    "--config.eval.min_class_count=5",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("myntra") / "run"
    assert cli.main(["train", "--config", str(ROOT / "configs" / "myntra.py"), "--workdir", str(workdir), *TINY]) == 0
    return workdir


def test_train_and_eval_on_real_slice(trained):
    results = json.loads((trained / "eval.json").read_text())["val"]
    assert results["num_items"] == 256
    for key in ("t2i/R@1", "t2i/R@10", "i2t/R@1", "zeroshot/articleType/top1", "zeroshot/baseColour/top1",
                "zeroshot/gender/top1", "baseline/articleType/linear_probe/top1", "baseline/articleType/chance/top1"):
        assert 0.0 <= results[key] <= 1.0, key
    labels = json.loads((trained / "labels.json").read_text())
    counts = np.asarray(labels["articleType"]["train_counts"])
    assert counts.sum() == 512
    # Zero-shot only over classes with >= min_class_count train items; chance is 1 / that count.
    assert results["zeroshot/articleType/num_classes"] == int(np.sum(counts >= 5))
    assert results["baseline/articleType/chance/top1"] == pytest.approx(1 / np.sum(counts >= 5))


def test_eval_on_another_catalog_file_uses_workdir_vocabularies(trained, tmp_path):
    # A catalog of the same shape: 64 val rows, in a new file, with an articleType unseen in training.
    table = pq.ParquetFile(MYNTRA / "val.parquet").read_row_group(0).slice(0, 64)
    article = table.column("articleType").to_pylist()
    article[0] = "Never Seen Type"
    table = table.set_column(table.schema.get_field_index("articleType"), "articleType", pa.array(article))
    other = tmp_path / "other.parquet"
    pq.write_table(table, other)
    tokenizer_before = (trained / "tokenizer" / "tokenizer.json").read_bytes()
    assert cli.main(["eval", "--workdir", str(trained), f"--config.data.path={other}",
                     "--config.eval.linear_probe_labels=()"]) == 0
    results = json.loads((trained / "catalog_eval.json").read_text())["other"]
    assert results["num_items"] == 64
    assert (trained / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_before
    labels = json.loads((trained / "labels.json").read_text())
    assert "Never Seen Type" not in labels["articleType"]["names"]
