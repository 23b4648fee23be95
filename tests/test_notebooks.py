"""The notebooks run top to bottom (tiny settings), and are stored without outputs."""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from prodclip import sweep, sweep_grid

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _execute(name: str, monkeypatch, env: dict) -> nbformat.NotebookNode:
    """Runs a notebook in a fresh kernel that imports this checkout's prodclip; raises on a cell error."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # raises on any cell error
    return nb


def _outputs(nb, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if kind in o.get("data", {}) or (kind == "text" and o.get("output_type") == "stream")]


def test_notebooks_are_stored_stripped():
    paths = sorted(str(p) for p in NOTEBOOKS.glob("*.ipynb"))
    assert {pathlib.Path(p).name for p in paths} >= {"quickstart.ipynb", "ablations.ipynb"}
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "strip_notebooks.py"), "--check", *paths],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_strip_script_removes_outputs(tmp_path):
    nb = nbformat.read(NOTEBOOKS / "ablations.ipynb", as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hello")]
    nb.cells[1].execution_count = 3
    path = tmp_path / "dirty.ipynb"
    nbformat.write(nb, path)
    script = str(ROOT / "scripts" / "strip_notebooks.py")
    assert subprocess.run([sys.executable, script, "--check", str(path)], capture_output=True).returncode == 1
    assert subprocess.run([sys.executable, script, str(path)]).returncode == 0
    cleaned = nbformat.read(path, as_version=4)
    assert cleaned.cells[1].outputs == [] and cleaned.cells[1].execution_count is None


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = _execute("quickstart.ipynb", monkeypatch,
                  {"PRODCLIP_NOTEBOOK_TINY": "1", "PRODCLIP_NOTEBOOK_WORKDIR": str(tmp_path / "qs")})
    text = "".join(o.get("text", "") for o in _outputs(nb, "text"))
    assert "| t2i/R@1 |" in text and "queries miss at rank 1" in text
    assert len(_outputs(nb, "image/png")) >= 3  # data grid, result grid, failures (tiny: almost all fail)
    results = json.loads((tmp_path / "qs" / "eval.json").read_text())
    assert f"eval.json: {results['test']['t2i/R@1']:.3f}" in text


def test_ablations_notebook_runs(tmp_path, monkeypatch):
    s = sweep_grid.Sweep(axes=(sweep_grid.axis("loss", ["softmax", "sigmoid"], key="loss.name"),
                               sweep_grid.axis("batch_size", [16, 64], key="train.batch_size")),
                         seeds=(0, 1), metrics=("test/t2i/R@1",),
                         plots=(sweep_grid.Plot(x="batch_size", metric="test/t2i/R@1", logx=True),))
    root = tmp_path / "sw"
    runs = sweep_grid.expand(s)
    sweep.write_definition(root, {"config": "loss_batch.py", "config_arg": None, "overrides": [],
                                  "sweep": s.to_json(), "runs": [r.name for r in runs]})
    values = np.linspace(0.1, 0.8, len(runs))
    for run, value in zip(runs, values):
        (root / "runs" / run.name).mkdir(parents=True)
        (root / "runs" / run.name / "eval.json").write_text(json.dumps({"test": {"t2i/R@1": value}}))
    nb = _execute("ablations.ipynb", monkeypatch, {"PRODCLIP_SWEEP_DIR": str(root)})
    tables = "".join(o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown"))
    by_name = dict(zip((r.name for r in runs), values))
    softmax_16 = [by_name[f"loss=softmax__batch_size=16__seed={s}"] for s in (0, 1)]
    assert f"| softmax | 16 | 2/2 | {np.mean(softmax_16):.3f} ± {np.std(softmax_16, ddof=1):.3f} |" in tables
    assert len(_outputs(nb, "image/png")) == 2
    assert (root / "results.csv").exists()  # rebuilt from the runs by the notebook
