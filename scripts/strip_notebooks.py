"""Strips outputs, execution counts and run metadata from notebooks, in place.

    python scripts/strip_notebooks.py notebooks/*.ipynb          # before committing
    python scripts/strip_notebooks.py --check notebooks/*.ipynb  # exit 1 listing notebooks with outputs

Notebooks are stored without outputs so diffs show code only; tests/test_notebooks.py
executes them and checks that the stored copies are stripped.
"""

from __future__ import annotations

import argparse
import sys

import nbformat


def strip(nb: nbformat.NotebookNode) -> bool:
    """Removes outputs and execution data from `nb`; True when anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
        for key in ("execution", "collapsed", "scrolled"):
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("widgets", "papermill"):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook has outputs")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    if args.check and dirty:
        print("notebooks with outputs (run python scripts/strip_notebooks.py on them):", *dirty, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
