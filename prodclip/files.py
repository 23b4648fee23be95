"""Files written whole or not at all: write to a temporary name beside the target, then rename.

A reader (a cache, a store) that finds the file can then trust it is complete, even after a run
was killed mid-write; the temporary name carries the process id, so two writers never share it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable

import numpy as np


def temporary_path(path: pathlib.Path) -> pathlib.Path:
    """'.<name>.<pid>.tmp' beside `path`: hidden, and never the name of a finished file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one `temporary_path` makes (a write that has not finished)."""
    return name.startswith(".") and name.endswith(".tmp")


def write_text(path: str | pathlib.Path, text: str | Iterable[str]) -> None:
    """Writes `text` (a string, or pieces written one after another) to `path`, atomically."""
    path = pathlib.Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as f:
            f.writelines([text] if isinstance(text, str) else text)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a killed process leaves it; an exception need not
        raise
    os.replace(tmp, path)


def save_npy(path: str | pathlib.Path, array: np.ndarray) -> None:
    """np.save(path, array), atomically (the file appears complete or not at all)."""
    path = pathlib.Path(path)
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:  # a file object: np.save would append '.npy' to a path
        np.save(f, array)
    os.replace(tmp, path)
