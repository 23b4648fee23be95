"""Sweeps: grid expansion, aggregation (against numpy), reports, and a real sweep that is
interrupted, resumed and skips its finished runs."""

import json
import logging
import math
import pathlib
import shlex

import numpy as np
import pytest

from prodclip import cli, faults, sweep, sweep_grid

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"

TINY = [
    "--config.data.num_train=128", "--config.data.num_val=16", "--config.data.num_test=48",
    "--config.model.image.depth=1", "--config.model.text.depth=1", "--config.model.image.width=16",
    "--config.model.text.width=16", "--config.model.embed_dim=16", "--config.tokenizer.vocab_size=200",
    "--config.train.batch_size=16", "--config.train.num_steps=6", "--config.optim.warmup_steps=1",
    "--config.train.log_every=2", "--config.checkpoint.every_steps=2", "--config.eval.batch_size=16",
    "--config.checkpoint.async_save=False",
]

TINY_SWEEP = '''
import pathlib
from prodclip import sweep_grid
from prodclip.config_loading import load_config_file

def get_config():
    return load_config_file(pathlib.Path({base!r}))

def get_sweep():
    return sweep_grid.Sweep(
        axes=(sweep_grid.axis("loss", {{"softmax": {{"loss.name": "softmax"}},
                                        "sigmoid": {{"loss.name": "sigmoid", "model.logit_bias_init": -5.0}}}}),),
        seeds=(7,),
        metrics=("test/t2i/R@1", "test/zeroshot/colour/top1"),
        plots=(sweep_grid.Plot(x="loss", metric="test/t2i/R@1"),))
'''


# ----------------------------------------------------------------------------- grid expansion


def test_expand_grid_names_order_and_override_precedence():
    s = sweep_grid.Sweep(
        axes=(sweep_grid.axis("loss", {"a": {"loss.name": "softmax", "train.num_steps": 10},
                                       "b": {"loss.name": "sigmoid"}}),
              sweep_grid.axis("train.batch_size", [8, 16, 32]),
              sweep_grid.axis("steps", {"long": {"train.num_steps": 99}})),
        seeds=(3, 5), seed_keys=("seed", "data.seed"))
    runs = sweep_grid.expand(s)
    assert len(runs) == 2 * 3 * 1 * 2
    assert len({r.name for r in runs}) == len(runs)
    # Seeds outermost: the first six runs cover every variant once, with seed 3.
    assert [r.seed for r in runs] == [3] * 6 + [5] * 6
    assert runs[0].name == "loss=a__train.batch_size=8__steps=long__seed=3"
    assert runs[5].labels == {"loss": "b", "train.batch_size": "32", "steps": "long"}
    # A later axis wins on a shared key; the seed fields are set for every run.
    assert runs[0].overrides == {"loss.name": "softmax", "train.num_steps": 99, "train.batch_size": 8,
                                 "seed": 3, "data.seed": 3}
    assert runs[7].overrides["train.batch_size"] == 16 and runs[7].overrides["seed"] == 5
    assert all(r.evals == () for r in runs)


def test_eval_axes_add_variants_not_training_runs():
    s = sweep_grid.Sweep(axes=(sweep_grid.axis("fusion", [False, True], key="train.progress_bar"),
                               sweep_grid.axis("k", {"0": {"eval.batch_size": 1}, "8": {"eval.batch_size": 8}},
                                               stage="eval")),
                         seeds=(0,))
    runs = sweep_grid.expand(s)
    assert [r.name for r in runs] == ["fusion=False__seed=0", "fusion=True__seed=0"]
    assert [e[0] for e in runs[0].evals] == ["k=0", "k=8"]
    assert runs[1].evals[1][2] == {"eval.batch_size": 8}


@pytest.mark.parametrize("bad, message", [
    (sweep_grid.Sweep(axes=()), "at least one axis"),
    (sweep_grid.Sweep(axes=(sweep_grid.axis("x", {"a/b": {}}),)), "label 'a/b'"),
    (sweep_grid.Sweep(axes=(sweep_grid.axis("x", [1]), sweep_grid.axis("x", [2]))), "distinct"),
    (sweep_grid.Sweep(axes=(sweep_grid.axis("x", [1]),), seeds=(1, 1)), "seeds"),
    (sweep_grid.Sweep(axes=(sweep_grid.axis("x", [1]),), plots=(sweep_grid.Plot(x="y", metric="m"),)), "plot x='y'"),
    (sweep_grid.Sweep(axes=(sweep_grid.axis("k", {"1": {"train.num_steps": 1}}, stage="eval"),)), "only set eval"),
])
def test_check_sweep_rejects_bad_grids(bad, message):
    with pytest.raises(sweep_grid.SweepError, match=message):
        sweep_grid.check_sweep(bad)


def test_unknown_override_names_the_run(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(TINY_SWEEP.format(base=str(ABLATIONS / "small_base.py")).replace(
        '"model.logit_bias_init"', '"model.logit_bias_initial"'))
    with pytest.raises(sweep_grid.SweepError, match=r"run loss=sigmoid__seed=7: unknown config key 'model.logit_bias_i"):
        sweep.run_sweep(path, tmp_path / "sw")
    assert not (tmp_path / "sw").exists()  # nothing ran, nothing written


def test_every_shipped_ablation_expands_to_valid_configs():
    from prodclip.config import base_config

    has_fusion = "fusion" in base_config().model
    names = []
    for path in sorted(ABLATIONS.glob("*.py")):
        if "def get_sweep" not in path.read_text():
            continue
        names.append(path.stem)
        if path.stem == "fusion" and not has_fusion:
            continue  # model.fusion.* lands with the fusion branch
        runs = sweep_grid.expand(sweep_grid.load_sweep_file(path))
        for run in runs:
            sweep_grid.run_config(path, None, [], run)  # validates
    assert {"loss_batch", "temperature", "fusion", "pooling_patch", "text_mask"} <= set(names)


# ----------------------------------------------------------------------------- aggregation


def _fake_rows(rng):
    rows = []
    for loss in ("softmax", "sigmoid"):
        for bs in ("16", "64"):
            for seed in (0, 1, 2, 3):
                status = "finished" if (loss, bs, seed) not in {("sigmoid", "64", 3), ("softmax", "16", 0)} else (
                    "failed" if seed == 3 else "pending")
                row = {"loss": loss, "batch_size": bs, "seed": seed, "status": status}
                if status == "finished":
                    row["test/t2i/R@1"] = float(rng.uniform())
                    row["test/i2t/R@1"] = float(rng.uniform())
                rows.append(row)
    return rows


def test_summary_mean_and_std_match_numpy():
    rows = _fake_rows(np.random.default_rng(0))
    summary = sweep.summarize(rows, ["loss", "batch_size"], ["test/t2i/R@1", "test/i2t/R@1"])
    assert [(e["loss"], e["batch_size"]) for e in summary] == [
        ("softmax", "16"), ("softmax", "64"), ("sigmoid", "16"), ("sigmoid", "64")]
    for entry in summary:
        values = np.array([[r["test/t2i/R@1"], r["test/i2t/R@1"]] for r in rows
                           if r["loss"] == entry["loss"] and r["batch_size"] == entry["batch_size"]
                           and "test/t2i/R@1" in r])
        assert entry["n"] == len(values) and entry["runs"] == 4
        np.testing.assert_allclose(entry["test/t2i/R@1/mean"], np.mean(values[:, 0]), rtol=1e-12)
        np.testing.assert_allclose(entry["test/t2i/R@1/std"], np.std(values[:, 0], ddof=1), rtol=1e-12)
        np.testing.assert_allclose(entry["test/i2t/R@1/std"], np.std(values[:, 1], ddof=1), rtol=1e-12)
    assert [e["n"] for e in summary] == [3, 4, 4, 3]


def test_markdown_shows_mean_pm_std_and_single_seed_without_std():
    rows = [{"v": "a", "seed": 0, "status": "finished", "m": 0.25},
            {"v": "a", "seed": 1, "status": "finished", "m": 0.75},
            {"v": "b", "seed": 0, "status": "finished", "m": 0.5},
            {"v": "b", "seed": 1, "status": "pending"}]
    summary = sweep.summarize(rows, ["v"], ["m"])
    assert math.isnan(summary[1]["m/std"])
    table = sweep.format_markdown(summary, ["v"], ["m"]).splitlines()
    assert table[0] == "| v | seeds | m |"
    assert table[2] == f"| a | 2/2 | 0.500 ± {np.std([0.25, 0.75], ddof=1):.3f} |"
    assert table[3] == "| b | 1/2 | 0.500 |"


def _fake_sweep_dir(root: pathlib.Path) -> pathlib.Path:
    """A sweep directory whose runs have eval.json files but no training (what --report reads)."""
    s = sweep_grid.Sweep(axes=(sweep_grid.axis("loss", ["softmax", "sigmoid"], key="loss.name"),
                               sweep_grid.axis("batch_size", [16, 32, 64], key="train.batch_size")),
                         seeds=(0, 1), metrics=("test/t2i/R@1",),
                         plots=(sweep_grid.Plot(x="batch_size", metric="test/t2i/R@1", logx=True),))
    runs = sweep_grid.expand(s)
    sweep.write_definition(root, {"config": "x.py", "config_arg": None, "overrides": [], "sweep": s.to_json(),
                                  "runs": [r.name for r in runs]})
    rng = np.random.default_rng(1)
    for run in runs[:-1]:  # the last run never finished
        run_dir = root / "runs" / run.name
        run_dir.mkdir(parents=True)
        (run_dir / "eval.json").write_text(json.dumps({
            "step": 10, "train_seconds": 1.5,
            "test": {"t2i/R@1": float(rng.uniform()), "i2t/R@1": 0.5, "zeroshot/colour/class/red": 1.0}}))
    return root


def test_report_from_finished_runs(tmp_path, capsys):
    root = _fake_sweep_dir(tmp_path / "sw")
    assert cli.main(["sweep", "--report", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "| softmax | 16 | 2/2 |" in printed and "| sigmoid | 64 | 1/2 |" in printed
    rows = sweep.read_csv(root / "results.csv")
    assert len(rows) == 12 and sum(r["status"] == "finished" for r in rows) == 11
    assert list(rows[0])[:5] == ["loss", "batch_size", "seed", "status", "test/t2i/R@1"]
    assert "test/zeroshot/colour/class/red" not in rows[0]  # per-class values stay in eval.json
    values = {(r["loss"], r["batch_size"], r["seed"]): r["test/t2i/R@1"] for r in rows if "test/t2i/R@1" in r}
    summary = {(r["loss"], r["batch_size"]): r for r in sweep.read_csv(root / "summary.csv")}
    for (loss, bs), entry in summary.items():
        seeds = [values[(loss, bs, s)] for s in (0, 1) if (loss, bs, s) in values]
        np.testing.assert_allclose(entry["test/t2i/R@1/mean"], np.mean(seeds), rtol=1e-9)
    png = root / "plots" / "test_t2i_R_1_vs_batch_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    with pytest.raises(sweep_grid.SweepError, match="no sweep.json"):
        sweep.report(tmp_path)


# ----------------------------------------------------------------------------- a real sweep


def test_sweep_emits_runs_resumes_and_skips(tmp_path, monkeypatch, caplog, capsys):
    config = tmp_path / "tiny_sweep.py"
    config.write_text(TINY_SWEEP.format(base=str(ABLATIONS / "small_base.py")))
    workdir = tmp_path / "sw"
    caplog.set_level(logging.INFO, logger="prodclip")

    # --emit-commands: one command per run; running the first one trains that run alone.
    assert cli.main(["sweep", str(config), "--workdir", str(workdir), "--emit-commands", *TINY]) == 0
    emitted = capsys.readouterr().out.splitlines()
    assert len(emitted) == 2 and "--run loss=softmax__seed=7" in emitted[0]
    assert emitted[1].endswith(shlex.join(TINY)) and "--run loss=sigmoid__seed=7" in emitted[1]
    argv = shlex.split(emitted[0])
    assert argv[0] == "prodclip"
    assert cli.main(argv[1:]) == 0
    softmax_dir = workdir / "runs" / "loss=softmax__seed=7"
    assert sweep.run_status(softmax_dir) == "finished"
    assert sweep.run_status(workdir / "runs" / "loss=sigmoid__seed=7") == "pending"
    finished_mtime = (softmax_dir / "eval.json").stat().st_mtime_ns
    assert len(sweep.emit_commands(config, workdir, cli_overrides=TINY)) == 1

    # The sweep skips the finished run; the second is interrupted (SIGTERM-style) after step 4.
    monkeypatch.setattr(faults.StopRequests, "requested", lambda self, step: step == 4)
    with pytest.raises(faults.Preempted):
        sweep.run_sweep(config, workdir, cli_overrides=TINY)
    sigmoid_dir = workdir / "runs" / "loss=sigmoid__seed=7"
    assert sweep.run_status(sigmoid_dir) == "interrupted"
    from prodclip import checkpoint
    assert max(checkpoint.checkpoint_steps(sigmoid_dir)) == 4
    assert "loss=softmax__seed=7: finished, skipped" in caplog.text

    # Rerun: the interrupted run resumes from step 4, the finished one is not touched.
    monkeypatch.undo()
    caplog.clear()
    assert cli.main(["sweep", str(config), "--workdir", str(workdir), *TINY]) == 0
    assert "loss=sigmoid__seed=7: resuming" in caplog.text
    assert "resumed from the checkpoint of step 4" in caplog.text
    assert (softmax_dir / "eval.json").stat().st_mtime_ns == finished_mtime
    steps = [json.loads(l)["step"] for l in (sigmoid_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # each logged once, across the interruption

    rows = sweep.read_csv(workdir / "results.csv")
    assert [(r["loss"], r["status"]) for r in rows] == [("softmax", "finished"), ("sigmoid", "finished")]
    for row, run_dir in zip(rows, (softmax_dir, sigmoid_dir)):
        results = json.loads((run_dir / "eval.json").read_text())
        assert row["test/t2i/R@1"] == pytest.approx(results["test"]["t2i/R@1"], abs=1e-12)
    assert "| softmax | 1/1 |" in (workdir / "results.md").read_text()
    assert (workdir / "plots" / "test_t2i_R_1_vs_loss.png").exists()
    assert sweep.emit_commands(config, workdir, cli_overrides=TINY) == []

    # The same config file from another checkout (another path, same contents) is the same sweep.
    moved = tmp_path / "other_checkout" / config.name
    moved.parent.mkdir()
    moved.write_text(config.read_text())
    assert sweep.emit_commands(moved, workdir, cli_overrides=TINY) == []
    # The same directory refuses a different sweep definition, or a changed config file.
    moved.write_text(config.read_text() + "\n# edited\n")
    with pytest.raises(sweep_grid.SweepError, match="config_sha256 differs"):
        sweep.emit_commands(moved, workdir, cli_overrides=TINY)
    with pytest.raises(sweep_grid.SweepError, match="holds another sweep"):
        sweep.run_sweep(config, workdir, cli_overrides=[*TINY[:-1], "--config.checkpoint.async_save=True"])


def test_a_nan_run_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from prodclip import checkpoint, train

    config = tmp_path / "tiny_sweep.py"
    config.write_text(TINY_SWEEP.format(base=str(ABLATIONS / "small_base.py")))
    calls = []

    def fake_train(cfg, workdir):  # stands in for the trainer: sigmoid diverges, softmax finishes
        calls.append(cfg.loss.name)
        if cfg.loss.name == "sigmoid":
            raise faults.NonFiniteError("loss = nan at step 3")
        pathlib.Path(workdir).mkdir(parents=True)
        checkpoint.write_config(workdir, cfg)
        (pathlib.Path(workdir) / "eval.json").write_text(json.dumps({"test": {"t2i/R@1": 0.25}}))

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    statuses = sweep.run_sweep(config, tmp_path / "sw", cli_overrides=TINY)
    assert statuses == {"loss=softmax__seed=7": "finished", "loss=sigmoid__seed=7": "failed"}
    assert "nan at step 3" in (tmp_path / "sw" / "runs" / "loss=sigmoid__seed=7" / "sweep_failed.json").read_text()
    assert "| sigmoid | 0/1 |  |" in (tmp_path / "sw" / "results.md").read_text()
    sweep.run_sweep(config, tmp_path / "sw", cli_overrides=TINY)
    assert calls == ["softmax", "sigmoid"]  # neither is retried

    # A finished run whose saved config no longer matches (e.g. the base config file changed) is an error.
    saved = tmp_path / "sw" / "runs" / "loss=softmax__seed=7" / "config.json"
    edited = json.loads(saved.read_text())
    edited["model"]["embed_dim"] = 99
    saved.write_text(json.dumps(edited))
    with pytest.raises(sweep_grid.SweepError, match=r"trained with another config \(model.embed_dim: 99 -> 16\)"):
        sweep.run_sweep(config, tmp_path / "sw", cli_overrides=TINY)
