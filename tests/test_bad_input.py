"""Bad input through the command line: one line and exit 2, or exit 0 with every skipped row reported.

Each command (train, eval, embed, search, match, audit, export) is fed the inputs a user gets
wrong: missing paths, missing or misspelt columns, unknown splits, broken config files, damaged
checkpoints and stores, unusable queries, and a hypothesis-generated mix of bad catalog rows.
Every failure must print one `prodclip: <kind>: <message>` line and no traceback, write nothing
into the workdir it refused, and never delete or overwrite a checkpoint.
"""

import hashlib
import io
import json
import logging
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prodclip import cli
from prodclip.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
LABELS = ("category", "colour", "pattern")

CONFIG = '''
from prodclip.config import base_config


def get_config():
    c = base_config()
    c.data.name = "catalog"
    c.data.path = {path!r}
    c.data.label_columns = ("category", "colour", "pattern")
    c.data.eval_splits = ("val",)
    c.data.num_train = 0
    c.data.num_val = 8
    c.data.image_size = 32
    c.data.augment = False
    c.data.title_dropout_prob = 0.0
    c.tokenizer.vocab_size = 200
    c.tokenizer.context_length = 16
    c.model.embed_dim = 16
    c.model.image.patch_size = 8
    c.model.image.width = c.model.text.width = 32
    c.model.image.depth = c.model.text.depth = 1
    c.model.image.num_heads = c.model.text.num_heads = 2
    c.train.batch_size = 16
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.progress_bar = False
    c.optim.warmup_steps = 1
    c.checkpoint.async_save = False
    c.eval.batch_size = 16
    c.eval.zeroshot_labels = ("category", "colour", "pattern")
    c.eval.linear_probe_labels = ("category",)
    c.eval.prompt_templates = ("a photo of a {{}}.", "{{}}")
    c.eval.confusion_png = False
    return c
'''


# ----------------------------------------------------------------------------- catalogs


def _png(image: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    if mode == "I;16":
        picture = Image.fromarray((np.asarray(picture.convert("L"), np.uint16) * 257))
    elif mode != "RGB":
        picture = picture.convert(mode)
    picture.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    return buffer.getvalue()


def good_rows(n: int, seed: int = 0, prefix: str = "sku") -> list[dict]:
    catalog = synthetic.make_catalog("train", n, seed=seed, image_size=32)
    return [{"id": f"{prefix}{i}", "image": _png(catalog.images[i]), "title": catalog.titles[i],
             **{label: catalog.label_names[label][catalog.labels[label][i]] for label in LABELS}}
            for i in range(n)]


def write_parquet(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(k, pa.binary() if k == "image" else pa.string()) for k in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# Bad row kinds -> the skip reason each must be counted under (None: kept).
ROW_KINDS = {
    "good": None, "corrupt": "corrupt_image", "truncated": "corrupt_image", "empty_image": "corrupt_image",
    "no_image": "missing_image", "empty_title": "empty_title", "null_title": "empty_title",
    "missing_id": "missing_id", "duplicate": "duplicate_id",
    "mode_L": None, "mode_P": None, "mode_RGBA": None, "mode_CMYK": None, "mode_I;16": None,
}


def mixed_rows(kinds: list[str], seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """Catalog rows of the given kinds, and the skip counts by reason they must produce."""
    base = good_rows(len(kinds), seed=seed, prefix="mix")
    rows, expected, kept_ids = [], {}, []
    for row, kind in zip(base, kinds):
        row = dict(row)
        reason = ROW_KINDS[kind]
        if kind == "corrupt":
            row["image"] = b"\x89PNG not really an image"
        elif kind == "truncated":
            row["image"] = row["image"][: len(row["image"]) // 2]
        elif kind == "empty_image":
            row["image"] = b""
        elif kind == "no_image":
            row["image"] = None
        elif kind == "empty_title":
            row["title"] = "   "
        elif kind == "null_title":
            row["title"] = None
        elif kind == "missing_id":
            row["id"] = None
        elif kind == "duplicate":
            if kept_ids:
                row["id"] = kept_ids[0]
            else:
                reason = None  # nothing kept yet to duplicate: a good row
        elif kind.startswith("mode_"):
            image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
            row["image"] = _png(image, kind[len("mode_"):])
        if reason is None:
            kept_ids.append(row["id"])
        else:
            expected[reason] = expected.get(reason, 0) + 1
        rows.append(row)
    return rows, expected


# ----------------------------------------------------------------------------- helpers


def run_cli(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prodclip:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tree_digest(directory: pathlib.Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict:
    """A catalog folder (train with 3 bad rows, val) and a config file pointing at it."""
    root = tmp_path_factory.mktemp("shop")
    train = good_rows(48)
    train[5]["image"] = b"not an image"
    train[9]["title"] = ""
    train[12]["id"] = train[3]["id"]
    write_parquet(root / "catalog" / "train.parquet", train)
    write_parquet(root / "catalog" / "val.parquet", good_rows(16, seed=1, prefix="val"))
    config = root / "tiny.py"
    config.write_text(CONFIG.format(path=str(root / "catalog")))
    return {"root": root, "catalog": root / "catalog", "config": config}


@pytest.fixture(scope="module")
def run(shop, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", "--config", str(shop["config"]), "--workdir", str(workdir)]) == 0
    return workdir


# ----------------------------------------------------------------------------- skips


def test_train_reports_every_skipped_row_once(run):
    rows = [json.loads(line) for line in (run / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["split"], r["row"], r["id"], r["reason"]) for r in rows] == [
        ("train", 5, "sku5", "corrupt_image"), ("train", 9, "sku9", "empty_title"),
        ("train", 12, "sku3", "duplicate_id")]
    assert all(not r["detail"].startswith(r["reason"]) for r in rows)  # the reason is written once
    assert json.loads((run / "eval.json").read_text())["val"]["num_items"] == 8  # the run's own num_val cap


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(sorted(ROW_KINDS)), min_size=1, max_size=12))
def test_embed_counts_a_mix_of_bad_rows_by_reason(run, capsys, kinds):
    rows, expected = mixed_rows(kinds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        catalog = write_parquet(tmp / "mix.parquet", rows)
        out = tmp / "store"
        code, _, err = run_cli(["embed", "--workdir", run, "--out", out, "--split", "val",
                                f"--config.data.path={catalog}", "--config.data.num_val=0"], capsys)
        kept = len(rows) - sum(expected.values())
        if kept == 0:
            assert_one_error_line(code, err, "no usable rows")
            assert not out.exists()
            return
        assert code == 0, err
        written = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
        counts = {}
        for row in written:
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
        assert counts == expected
        assert json.loads((out / "store.json").read_text())["num_items"] == kept


def test_wrong_columns_fail_with_one_line(run, shop, tmp_path, capsys):
    rows = good_rows(6)
    no_title = write_parquet(tmp_path / "no_title.parquet", [{k: v for k, v in r.items() if k != "title"}
                                                             for r in rows])
    code, _, err = run_cli(["embed", "--workdir", run, "--out", tmp_path / "s1", "--split", "val",
                            f"--config.data.path={no_title}"], capsys)
    assert_one_error_line(code, err, "no column 'title' (data.title_template)", "its columns are: id, image")
    code, _, err = run_cli(["embed", "--workdir", run, "--out", tmp_path / "s2", "--split", "val",
                            "--config.data.image_column=imagee"], capsys)
    assert_one_error_line(code, err, "no column 'imagee' (data.image_column)")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


# ----------------------------------------------------------------------------- failed starts write nothing


def _bad_train_inputs(shop, tmp: pathlib.Path) -> dict[str, tuple[list[str], str]]:
    rows = good_rows(20)
    no_title = write_parquet(tmp / "no_title" / "train.parquet",
                             [{k: v for k, v in r.items() if k != "title"} for r in rows]).parent
    all_bad = write_parquet(tmp / "all_bad" / "train.parquet",
                            [{**r, "image": b"broken"} for r in rows]).parent
    (tmp / "syntax.py").write_text("def get_config(:\n")
    (tmp / "no_get_config.py").write_text("X = 1\n")
    (tmp / "raises.py").write_text("def get_config():\n    return 1 / 0\n")
    config = ["--config", str(shop["config"])]
    return {
        "missing data path": (config + [f"--config.data.path={tmp / 'nowhere'}"], "data error: catalog not found"),
        "no title column": (config + [f"--config.data.path={no_title}"], "no column 'title'"),
        "image column typo": (config + ["--config.data.image_column=img"], "no column 'img'"),
        "unknown eval split": (config + ["--config.data.eval_splits=tset"], "no tset.parquet/.csv/.jsonl"),
        "no usable rows": (config + [f"--config.data.path={all_bad}"], "no usable rows out of 20 (corrupt_image 20)"),
        "config syntax error": (["--config", str(tmp / "syntax.py")], "line 1: syntax error"),
        "no get_config": (["--config", str(tmp / "no_get_config.py")], "defines no get_config()"),
        "get_config raises": (["--config", str(tmp / "raises.py")], "ZeroDivisionError"),
        "unknown config key": (config + ["--config.data.imagecolumn=x"], "config error"),
    }


def test_train_refuses_bad_input_before_writing(shop, tmp_path, capsys):
    for name, (args, fragment) in _bad_train_inputs(shop, tmp_path / "inputs").items():
        workdir = tmp_path / name.replace(" ", "_")
        code, _, err = run_cli(["train", "--workdir", workdir, *args], capsys)
        assert_one_error_line(code, err, fragment)
        assert not workdir.exists(), name


def test_commands_on_a_workdir_without_a_run_write_nothing(shop, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = ["--config", shop["config"]]
    for command in (["eval"], ["embed", "--out", tmp_path / "store"], ["search", "shirt", "--store", tmp_path],
                    ["match"], ["audit", "--catalog", shop["catalog"] / "val.parquet", "--out", tmp_path / "audit"],
                    ["export", "--out", tmp_path / "export"]):
        code, _, err = run_cli([*command, "--workdir", empty, *config], capsys)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (command, err)
        assert list(empty.iterdir()) == [], command
    for out in ("store", "audit", "export"):
        assert not (tmp_path / out).exists()


def test_myntra_config_outside_a_clone_says_what_to_pass(tmp_path):
    env = {"PRODCLIP_MYNTRA_DIR": str(tmp_path / "not_here"), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "prodclip.cli", "train", "--config", "configs/myntra.py",
                           "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert_one_error_line(done.returncode, done.stderr, "catalog not found", "--config.data.path=")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- checkpoints


def _flip_bytes(directory: pathlib.Path) -> None:
    for f in sorted(directory.rglob("*")):
        if f.is_file() and "state" in f.parts and f.stat().st_size > 64:
            data = bytearray(f.read_bytes())
            for i in range(len(data) // 2, len(data) // 2 + 16):
                data[i] ^= 0x5A
            f.write_bytes(bytes(data))


def test_all_checkpoints_damaged_refuses_to_start_over(run, shop, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    steps = sorted(p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        _flip_bytes(step)
    before = tree_digest(workdir / "checkpoints")
    command = ["train", "--config", shop["config"], "--workdir", workdir, "--config.train.num_steps=3"]
    for _ in range(2):  # the second run must refuse as well, not start from step 0
        code, _, err = run_cli(command, capsys)
        assert_one_error_line(code, err, "checkpoint error", "is damaged", "--allow-fresh-start")
        assert tree_digest(workdir / "checkpoints") == before  # nothing moved, deleted or overwritten
    code, _, err = run_cli([*command, "--allow-fresh-start"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir()) == [f"step_{s.name}" for s in steps]


def test_export_over_an_export_is_refused(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert run_cli(["export", "--workdir", run, "--out", out], capsys)[0] == 0
    before = tree_digest(out)
    code, _, err = run_cli(["export", "--workdir", run, "--out", out], capsys)
    assert_one_error_line(code, err, "already holds an export")
    assert tree_digest(out) == before


# ----------------------------------------------------------------------------- stores and queries


def test_store_refuses_foreign_folder_verifies_shards_and_resume_repairs(run, shop, tmp_path, capsys, caplog):
    catalog_before = tree_digest(shop["catalog"])
    code, _, err = run_cli(["embed", "--workdir", run, "--out", shop["catalog"], "--split", "val"], capsys)
    assert_one_error_line(code, err, "not empty and is not an embedding store", "train.parquet")
    assert tree_digest(shop["catalog"]) == catalog_before

    store = tmp_path / "store"
    embed = ["embed", "--workdir", run, "--out", store, "--split", "val", "--config.embed.shard_size=3"]
    assert run_cli(embed, capsys)[0] == 0
    shard = store / "shards" / "emb_00001.npy"
    good = shard.read_bytes()
    search = ["search", "red shirt", "--store", store, "--workdir", run, "-k", "3"]
    assert run_cli(search, capsys)[0] == 0
    for damage, message in ((good[:-20], "truncated"), (good[:-4] + b"\x00\x01\x02\x03", "SHA-256")):
        shard.write_bytes(damage)
        code, _, err = run_cli(search, capsys)
        assert_one_error_line(code, err, "store error", "emb_00001.npy", message)
        with caplog.at_level(logging.WARNING, logger="prodclip"):
            assert run_cli(embed, capsys)[0] == 0  # resume redoes the bad shard
        assert "embedding that shard again" in caplog.text
        assert shard.read_bytes() == good
        assert run_cli(search, capsys)[0] == 0


def test_queries_without_known_tokens_warn_and_long_queries_echo_80_characters(run, tmp_path, capsys, caplog):
    store = tmp_path / "store"
    assert run_cli(["embed", "--workdir", run, "--out", store, "--split", "val"], capsys)[0] == 0
    for query in ("🙂🙂", "!!!"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prodclip"):
            assert run_cli(["search", query, "--store", store, "--workdir", run], capsys)[0] == 0
        assert "none of its tokens is in the model's vocabulary" in caplog.text
    caplog.clear()
    long_query = "red shirt " * 700  # 7 KB
    with caplog.at_level(logging.WARNING, logger="prodclip"):
        assert run_cli(["search", long_query, "--store", store, "--workdir", run], capsys)[0] == 0
    (message,) = [r.getMessage() for r in caplog.records if "truncated to the context length" in r.getMessage()]
    assert len(message) < 300 and "6920 more characters" in message
    code, _, err = run_cli(["search", "   ", "--store", store, "--workdir", run], capsys)
    assert_one_error_line(code, err, "empty text query")


# ----------------------------------------------------------------------------- match and audit


def test_match_and_audit_report_bad_rows_and_bad_splits(run, shop, tmp_path, capsys):
    code, _, err = run_cli(["match", "--workdir", run, "--split", "nosuch", "--out", tmp_path / "m"], capsys)
    assert_one_error_line(code, err, "no nosuch.parquet")
    rows, expected = mixed_rows(["good"] * 14 + ["corrupt", "empty_title", "duplicate"], seed=2)
    catalog = write_parquet(tmp_path / "listings.parquet", rows)
    out = tmp_path / "audit"
    code, stdout, err = run_cli(["audit", "--workdir", run, "--catalog", catalog, "--out", out], capsys)
    assert code == 0, err
    assert "3 unscorable" in stdout and "Expected precision of the flags" in stdout
    written = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in written) == sorted(expected)
    summary = json.loads((out / "audit.json").read_text())
    assert summary["expected_error_rate"] == 0.03 and summary["unscorable_reasons"] == expected
    code, _, err = run_cli(["audit", "--workdir", run, "--catalog", tmp_path / "nope.parquet", "--out",
                            tmp_path / "audit2"], capsys)
    assert_one_error_line(code, err, "catalog not found")
    assert not (tmp_path / "audit2").exists()


# ----------------------------------------------------------------------------- another catalog


def _numpy_retrieval(query: np.ndarray, gallery: np.ndarray, keys: np.ndarray, ks=(1, 5, 10)) -> dict:
    """R@k, MRR, mAP, nDCG@10 and median rank of key-matched retrieval, by brute force."""
    order = np.argsort(-(query @ gallery.T), axis=1, kind="stable")
    relevant = keys[order] == keys[:, None]
    first = relevant.argmax(axis=1) + 1
    out = {f"R@{k}": float(np.mean(first <= k)) for k in ks}
    out["MRR"] = float(np.mean(1.0 / first))
    out["median_rank"] = float(np.median(first))
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    out["mAP"] = float(np.mean([precision_at[q][relevant[q]].mean() for q in range(len(query))]))
    discount = 1.0 / np.log2(np.arange(2, 12))
    dcg = (relevant[:, :10] * discount[:relevant[:, :10].shape[1]]).sum(axis=1)
    ideal = np.asarray([discount[:min(int(n), 10)].sum() for n in relevant.sum(axis=1)])
    out["nDCG@10"] = float(np.mean(dcg / ideal))
    out["num_queries"], out["num_queries_without_positive"] = len(query), 0
    return out


def _embed_rows(model, rows: list[dict], tokenizer, config) -> tuple[np.ndarray, np.ndarray]:
    from prodclip.data import pipeline

    images = np.stack([pipeline.fit_to_square(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")),
                                              config.data.image_size, config.data.resize) for r in rows])
    import jax.numpy as jnp

    return (np.asarray(model.encode_image(jnp.asarray(images)), np.float32),
            np.asarray(model.encode_text(jnp.asarray(tokenizer([r["title"] for r in rows]))), np.float32))


def test_eval_on_another_catalog_matches_numpy(run, shop, tmp_path, capsys, caplog):
    """20 rows (more than the run's num_val=8, fewer than a num_val of 50), one colour value the run never
    saw, no pattern column: every metric, baselines included, recomputed here from the model's embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    import jax.numpy as jnp

    from prodclip import config_loading
    from prodclip import run as run_lib
    from prodclip.models import factory

    rows = good_rows(20, seed=5, prefix="other")
    rows[3]["colour"] = "ultraviolet"
    for row in rows:
        del row["pattern"]
    other = write_parquet(tmp_path / "other.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="prodclip"):
        code, _, err = run_cli(["eval", "--workdir", run, f"--config.data.path={other}"], capsys)
    assert code == 0, err
    assert "no label column 'pattern'" in caplog.text and "ultraviolet" in caplog.text
    assert "1 rows have a colour value the run was not trained on (ultraviolet)" in caplog.text
    results = json.loads((run / "catalog_eval.json").read_text())["other"]
    assert run_cli(["eval", "--workdir", run, f"--config.data.path={other}", "--config.data.num_val=50"],
                   capsys)[0] == 0
    assert json.loads((run / "catalog_eval.json").read_text())["other"] == results
    second = write_parquet(tmp_path / "second.parquet", good_rows(20, seed=6, prefix="second"))
    assert run_cli(["eval", "--workdir", run, f"--config.data.path={second}"], capsys)[0] == 0
    both = json.loads((run / "catalog_eval.json").read_text())
    assert both["other"] == results and "t2i/R@1" in both["second"]  # the first catalog's results are kept

    config = config_loading.load(run, [f"--config.data.path={other}"])
    loaded = run_lib.load_run(run, config)
    tokenizer, label_stats = loaded.tokenizer, loaded.label_stats
    model = factory.merge_model(loaded.graphdef, loaded.params)
    image_emb, text_emb = _embed_rows(model, rows, tokenizer, config)
    titles = [r["title"] for r in rows]
    keys = np.asarray([titles.index(t) for t in titles])
    expected = {"num_items": 20, "distinct_keys": len(set(titles)), "match_by_product_id": 0}
    for direction, (q, g) in {"i2t": (image_emb, text_emb), "t2i": (text_emb, image_emb)}.items():
        expected.update({f"{direction}/{k}": v for k, v in _numpy_retrieval(q, g, keys).items()})

    labels = {}
    for label in ("category", "colour"):
        names = label_stats[label]["names"]
        labels[label] = np.asarray([names.index(r[label]) if r[label] in names else -1 for r in rows])
        expected[f"labels/{label}/unseen_rows"] = int(np.sum(labels[label] < 0))
        prompts = [t.format(n) for n in names for t in ("a photo of a {}.", "{}")]
        prompt_emb = np.asarray(model.encode_text(jnp.asarray(tokenizer(prompts))), np.float64).reshape(len(names), 2, -1)
        class_emb = prompt_emb.mean(axis=1)
        class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
        known = labels[label] >= 0
        truth = labels[label][known]
        order = np.argsort(-(image_emb[known].astype(np.float64) @ class_emb.T), axis=1, kind="stable")
        per_class = {c: float(np.mean(order[truth == c, 0] == c)) for c in np.unique(truth)}
        expected[f"zeroshot/{label}/top1"] = float(np.mean(order[:, 0] == truth))
        if len(names) > 5:
            expected[f"zeroshot/{label}/top5"] = float(np.mean((order[:, :5] == truth[:, None]).any(axis=1)))
        expected[f"zeroshot/{label}/mean_per_class"] = float(np.mean(list(per_class.values())))
        expected[f"zeroshot/{label}/weighted_f1"] = f1_score(truth, order[:, 0], average="weighted")
        expected[f"zeroshot/{label}/num_classes"] = len(names)
        expected.update({f"zeroshot/{label}/class/{names[c]}": v for c, v in per_class.items()})

    # Baselines: fitted on the run's own train split (its kept rows), scored on this file.
    train_rows = pq.read_table(shop["catalog"] / "train.parquet").to_pylist()
    train_rows = [r for i, r in enumerate(train_rows) if i not in (5, 9, 12)]  # the rows train skipped
    train_emb, _ = _embed_rows(model, train_rows, tokenizer, config)
    names = label_stats["category"]["names"]
    train_labels = np.asarray([names.index(r["category"]) for r in train_rows])
    majority = np.bincount(train_labels, minlength=len(names)).argmax()
    known = labels["category"] >= 0  # rows of a category the run never saw are not scored, as for zero-shot
    probe = LogisticRegression(C=10.0, max_iter=300).fit(train_emb, train_labels).predict(image_emb[known])
    truth = labels["category"][known]
    expected.update({
        "baseline/category/chance/top1": 1 / len(names),
        "baseline/category/majority/top1": float(np.mean(truth == majority)),
        "baseline/category/majority/mean_per_class": 1 / len(names),
        "baseline/category/linear_probe/top1": float(np.mean(probe == truth)),
        "baseline/category/linear_probe/mean_per_class": float(np.mean([np.mean(probe[truth == c] == c)
                                                                         for c in np.unique(truth)])),
    })
    assert sorted(results) == sorted(expected)  # every metric reported is checked, none is missing
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
