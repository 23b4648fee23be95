"""benchmarks/accelerator_check.py: its dry run on CPU end to end, and its batch fitting and JUnit parsing."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
check = importlib.import_module("accelerator_check")


def test_fitting_batch_by_hand():
    # 1 GiB limit, 100 MiB fixed, 64 MiB scratch at batch 8 (8 MiB per pair): (870.4 - 100) / 8 = 96.3 -> 96.
    mib = 2**20
    assert check.fitting_batch(100 * mib, 64 * mib, 8, 1024 * mib, 8, 4096) == 96
    assert check.fitting_batch(100 * mib, 64 * mib, 8, 1024 * mib, 64, 4096) == 64
    assert check.fitting_batch(100 * mib, 64 * mib, 8, 1024 * mib, 8, 32) == 32  # the cap
    assert check.fitting_batch(2000 * mib, 64 * mib, 8, 1024 * mib, 8, 4096) == 8  # never below one multiple


def test_parse_junit(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_a" time="1.5"><properties><property name="x" value="3"/></properties>'
        '</testcase><testcase classname="t" name="test_b" time="0.1"><skipped message="needs a GPU"/></testcase>'
        '<testcase classname="t" name="test_c" time="0.2"><failure message="assert 1 == 2">trace</failure>'
        '</testcase></testsuite></testsuites>')
    cases = check.parse_junit(str(xml))
    assert [(c["name"], c["outcome"]) for c in cases] == [("test_a", "passed"), ("test_b", "skipped"),
                                                          ("test_c", "failed")]
    assert cases[0]["properties"] == {"x": "3"} and cases[1]["message"] == "needs a GPU"
    assert check.parse_junit(str(tmp_path / "missing.xml")) == []


@pytest.mark.slow  # about 2 minutes on 2 cores; still run by default
def test_dry_run_end_to_end(tmp_path):
    """The whole check, every size shrunk, on CPU: every phase runs and the reports are written."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator_check.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert report["ok"] and report["dry_run"] and report["environment"]["backend"] == "cpu"
    cases = {c["name"].split("[")[0]: c for c in report["tests"]["cases"]}
    assert cases["test_cudnn_attention_matches_xla_in_bfloat16"]["outcome"] == "skipped"
    assert "needs a GPU" in cases["test_cudnn_attention_matches_xla_in_bfloat16"]["message"]
    for name in ("test_bfloat16_step_matches_float32", "test_sharded_step_on_all_local_devices_matches_one_device",
                 "test_step_donates_state_and_runs_without_host_transfers", "test_xla_attention_matches_numpy"):
        assert cases[name]["outcome"] == "passed", cases[name]
    for name, r in report["throughput"].items():
        assert r["ok"] and r["dtype"] == "bfloat16" and r["pairs_per_sec"] > 0, name
        assert 0 < r["mfu"] and r["batch_tries"][-1]["fits"] and r["batch_size"] == 32  # the dry run's cap
    assert report["quickstart"]["ok"] and "test/i2t/R@1" in report["quickstart"]["eval"]
    md = (tmp_path / "accelerator_check.md").read_text()
    assert "DRY RUN" in md and "tiny_clip" in md and "vit_b16" in md
