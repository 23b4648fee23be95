"""Parameter trees: a leaf's key path as a string; content hashes of a tree and of a file."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Callable

import jax
import numpy as np


def path_str(path) -> str:
    """'text_tower/encoder/blocks/0/attn/query/kernel' for a tree_map_with_path key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def path_keys(path) -> tuple:
    """('text_tower', 'encoder', 'blocks', 0, ...): a key path as plain dict keys and list indices."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def hash_tree(h, tree: Any, keep: Callable[[tuple], bool] | None = None) -> None:
    """Feeds every leaf of `tree` (key path, dtype, shape, bytes) into the hashlib object `h`, in key order;
    with `keep`, only the leaves whose key path it accepts."""
    leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
              if keep is None or keep(path)]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        array = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())


def block_index(path: tuple) -> int | None:
    """i of the first 'blocks/<i>' in a key path (e.g. text_tower/blocks/5/attn/...), or None."""
    keys = path_keys(path)
    for name, index in zip(keys, keys[1:]):
        if name == "blocks":
            return int(index)
    return None


def file_sha256(path: str | pathlib.Path) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
