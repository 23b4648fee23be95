"""prodclip/files.py: a file is written whole or not at all."""

import numpy as np
import pytest

from prodclip import files
from prodclip.evaluate import store as store_lib


def test_a_finished_write_leaves_only_the_file(tmp_path):
    files.write_text(tmp_path / "a.json", "{}")
    files.write_text(tmp_path / "b.jsonl", (f"{i}\n" for i in range(3)))
    files.save_npy(tmp_path / "c.npy", np.arange(4, dtype=np.int32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl", "c.npy"]
    assert (tmp_path / "b.jsonl").read_text() == "0\n1\n2\n"
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.arange(4))


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "items.jsonl"
    files.write_text(path, "old\n")

    def lines():
        yield "new\n"
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        files.write_text(path, lines())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["items.jsonl"]


def test_a_store_directory_with_an_unfinished_write_is_still_a_store(tmp_path):
    files.temporary_path(tmp_path / store_lib.HEADER).write_text("{")
    store_lib.check_store_dir(tmp_path)  # the leftover of a killed start: not someone else's files
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(store_lib.StoreError, match="notes.txt"):
        store_lib.check_store_dir(tmp_path)
