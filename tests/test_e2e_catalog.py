"""Train and evaluate on a `product_catalog` TFDS dataset through the same CLI as the synthetic one."""

import csv
import json
import pathlib

from PIL import Image

from prodclip import cli
from prodclip.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.image.depth=1", "--config.model.text.depth=1",
    "--config.model.image.width=32", "--config.model.text.width=32", "--config.model.embed_dim=16",
    "--config.model.image.num_heads=2", "--config.model.text.num_heads=2", "--config.data.image_size=32",
    "--config.train.batch_size=16", "--config.train.num_steps=4", "--config.optim.warmup_steps=2",
    "--config.train.log_every=2", "--config.train.eval_every=0", "--config.train.progress_bar=False",
    "--config.eval.batch_size=16", "--config.tokenizer.vocab_size=200",
]


def _folder_catalog(root: pathlib.Path, n: int = 120) -> pathlib.Path:
    catalog = synthetic.make_catalog("train", n, image_size=32)
    (root / "photos").mkdir(parents=True)
    with (root / "styles.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["productId", "file", "productDisplayName", "articleType", "baseColour"])
        for i in range(n):
            Image.fromarray(catalog.images[i]).save(root / "photos" / f"{i}.png")
            item = catalog[i]
            writer.writerow([f"sku{i}", f"photos/{i}.png", item["title"],
                             catalog.label_names["category"][item["category"]],
                             catalog.label_names["colour"][item["colour"]]])
        writer.writerow(["sku0", "photos/0.png", "a duplicate row", "shirt", "red"])
    return root / "styles.csv"


def test_build_inspect_train_eval_on_product_catalog(tmp_path, capsys):
    manifest = _folder_catalog(tmp_path / "shop")
    data_dir = tmp_path / "tfds"
    catalog_fields = ["--config.data.path=" + str(manifest), "--config.data.image_column=file",
                      "--config.data.id_column=productId", "--config.data.title_template={productDisplayName}",
                      "--config.data.label_columns=articleType,baseColour",
                      "--config.data.split_ratios=(('train',0.6),('val',0.2),('test',0.2))"]
    assert cli.main(["data", "build", "product_catalog", "--data-dir", str(data_dir), *catalog_fields]) == 0
    out = capsys.readouterr().out
    assert '"duplicate_id": 1' in out and "skipped row 120 (id sku0): duplicate_id" in out

    grid = tmp_path / "pairs.png"
    assert cli.main(["data", "inspect", "product_catalog", "--data-dir", str(data_dir), "--grid", str(grid),
                     "--num-pairs", "6"]) == 0
    counts = json.loads(capsys.readouterr().out.split("\nsample")[0])
    assert sum(counts.values()) == 120 and set(counts) == {"train", "val", "test"}
    assert Image.open(grid).size[0] > 100

    workdir = tmp_path / "run"
    data_fields = [f"--config.data.data_dir={data_dir}", "--config.data.name=tfds",
                   "--config.data.tfds_name=product_catalog", "--config.data.eval_splits=test",
                   "--config.data.label_columns=articleType,baseColour",
                   "--config.eval.zeroshot_labels=articleType,baseColour"]
    code = cli.main(["train", "--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(workdir),
                     *TINY, *data_fields])
    assert code == 0
    results = json.loads((workdir / "eval.json").read_text())
    assert results["test"]["num_items"] == counts["test"]
    for key in ("t2i/R@1", "i2t/R@10", "zeroshot/articleType/top1", "zeroshot/baseColour/top1"):
        assert 0.0 <= results["test"][key] <= 1.0
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    again = json.loads((workdir / "reeval.json").read_text())
    assert again["test"]["t2i/R@1"] == results["test"]["t2i/R@1"]
