"""An embedding store: a catalog split embedded once, searched many times.

Layout of a store directory:

    store.json          header: format version, model fingerprint, dim, num_items, shard_size,
                        mode (image | text | mix), image_weight, the catalog pointer
                        (the run's `data` config + split, to re-open images) and the workdir
    items.jsonl         one {"id", "title"} per item, in store order
    shards/emb_00000.npy  [<= shard_size, D] rows, L2-normalised, in store order, kept as the
                        header's dtype: float32, float16 or int8 (see store_codec.py)
    shards/scale_00000.npy  int8 stores only: [<= shard_size] float32 per-row scales

Shards are written to a temporary name and renamed, so a shard that exists is
complete: re-running `prodclip embed` with the same model and settings skips them
(resume). A store made by a different model (fingerprint), mode, weight or
shard size is refused with an error rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from prodclip.evaluate import store_codec

STORE_VERSION = 1
HEADER = "store.json"
ITEMS = "items.jsonl"


class StoreError(ValueError):
    """A store that cannot be written, read or used with this model; the message says why."""


def model_fingerprint(params: Any, tokenizer, config: ml_collections.ConfigDict) -> str:
    """16 hex chars identifying what maps inputs to embeddings.

    A SHA-256 over every parameter (path, dtype, shape, bytes), the tokenizer's
    vocabulary and context length, and the image input size and resize mode.
    """
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        array = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(json.dumps(sorted(tokenizer.hf.get_vocab().items())).encode())
    h.update(f"{tokenizer.context_length}:{tokenizer.lowercase}:{config.data.image_size}:{config.data.resize}".encode())
    return h.hexdigest()[:16]


def product_vectors(image_emb: np.ndarray, text_emb: np.ndarray, mode: str, image_weight: float) -> np.ndarray:
    """[N, D] image and title embeddings -> [N, D] float32 store rows, L2-normalised.

    mode 'image' | 'text' keeps one; 'mix' is normalise(w * image + (1 - w) * text).
    """
    if mode == "image":
        rows = image_emb
    elif mode == "text":
        rows = text_emb
    elif mode == "mix":
        rows = image_weight * image_emb.astype(np.float64) + (1.0 - image_weight) * text_emb
    else:
        raise ValueError(f"embed mode {mode!r} is not one of image, text, mix")
    norm = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.maximum(norm, 1e-12)).astype(np.float32)


class _Rows:
    """Rows start..stop-1 of a source, as a source."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        return self.source[self.start + int(i)]


def _shard_path(store: pathlib.Path, index: int) -> pathlib.Path:
    return store / "shards" / f"emb_{index:05d}.npy"


def _scale_path(store: pathlib.Path, index: int) -> pathlib.Path:
    return store / "shards" / f"scale_{index:05d}.npy"


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def write_shard(store: pathlib.Path, index: int, rows: np.ndarray, dtype: str) -> None:
    """Writes shard `index` of `store` from [n, D] float32 rows, encoded as `dtype`.

    The scales (int8) are written before the rows, so a shard whose rows exist is complete.
    """
    stored, scales = store_codec.encode_rows(rows, dtype)
    if scales is not None:
        _save_atomic(_scale_path(store, index), scales)
    _save_atomic(_shard_path(store, index), stored)


def _source_ids(source) -> list:
    raw = getattr(source, "raw_ids", None)
    ids = raw if raw is not None else getattr(source, "ids", None)
    if ids is None:
        ids = [source[i]["id"] for i in range(len(source))]
    return [x.item() if isinstance(x, np.generic) else x for x in ids]


def _check_same_settings(path: pathlib.Path, old: dict, new: dict) -> None:
    old = {"dtype": "float32", **old}  # stores written before the dtype option are float32
    for key in ("version", "fingerprint", "mode", "image_weight", "shard_size", "num_items", "catalog", "dtype"):
        if old.get(key) != new.get(key):
            raise StoreError(
                f"{path} was made with {key}={old.get(key)!r}, but this run has {key}={new.get(key)!r}; "
                "use a new --out directory (or --overwrite) rather than mixing embeddings")


def embed_catalog(graphdef, params, source, tokenizer, config: ml_collections.ConfigDict,
                  store_dir: str | pathlib.Path, *, split: str, workdir: str | pathlib.Path,
                  progress: bool = True) -> dict:
    """Embeds every item of `source` into `store_dir`; skips shards already written. Returns the header."""
    mode = config.embed.mode
    return embed_catalog_views(graphdef, params, source, tokenizer, config, {mode: store_dir}, split=split,
                               workdir=workdir, progress=progress)[mode]


def _open_or_create(store: pathlib.Path, header: dict, source) -> None:
    if (store / HEADER).exists():
        _check_same_settings(store / HEADER, json.loads((store / HEADER).read_text()), header)
        return
    (store / "shards").mkdir(parents=True, exist_ok=True)
    titles = source.titles if hasattr(source, "titles") else [source[i]["title"] for i in range(len(source))]
    with open(store / f"{ITEMS}.tmp", "w") as f:
        for item_id, title in zip(_source_ids(source), titles):
            f.write(json.dumps({"id": item_id, "title": title}) + "\n")
    os.replace(store / f"{ITEMS}.tmp", store / ITEMS)
    (store / f"{HEADER}.tmp").write_text(json.dumps(header, indent=2))
    os.replace(store / f"{HEADER}.tmp", store / HEADER)


def embed_catalog_views(graphdef, params, source, tokenizer, config: ml_collections.ConfigDict,
                        store_dirs: dict[str, str | pathlib.Path], *, split: str, workdir: str | pathlib.Path,
                        progress: bool = True) -> dict[str, dict]:
    """Embeds every item of `source` once into one store per mode (store_dirs: image | text | mix -> dir).

    A shard is computed only when some store lacks it (resume), and both towers run once for
    all the stores. Returns mode -> header.
    """
    from prodclip.evaluate import suite

    num_items = len(source)
    if num_items == 0:
        raise StoreError(f"split {split!r} of data.name={config.data.name!r} has no items: nothing to embed")
    e = config.embed
    if e.get("dtype", "float32") not in store_codec.DTYPES:
        raise StoreError(f"embed.dtype={e.dtype!r} is not one of {', '.join(store_codec.DTYPES)}")
    stores = {mode: pathlib.Path(path) for mode, path in store_dirs.items()}
    fingerprint, headers = model_fingerprint(params, tokenizer, config), {}
    for mode, store in stores.items():
        headers[mode] = {
            "version": STORE_VERSION,
            "fingerprint": fingerprint,
            "mode": mode,
            "image_weight": float(e.image_weight) if mode == "mix" else None,
            "shard_size": int(e.shard_size),
            "dtype": str(e.get("dtype", "float32")),
            "num_items": num_items,
            "catalog": {"split": split, "data": json.loads(config.data.to_json_best_effort())},
            "workdir": str(pathlib.Path(workdir).absolute()),
        }
        _open_or_create(store, headers[mode], source)

    import tqdm

    shard_size = int(e.shard_size)
    num_shards = -(-num_items // shard_size)
    bar = tqdm.tqdm(total=num_items, desc="embed", unit="item", disable=not progress, dynamic_ncols=True)
    dim = None
    for index in range(num_shards):
        start, stop = index * shard_size, min((index + 1) * shard_size, num_items)
        todo = {mode: _shard_path(store, index) for mode, store in stores.items()
                if not _shard_path(store, index).exists()}
        if not todo:
            dim = np.load(_shard_path(next(iter(stores.values())), index), mmap_mode="r").shape[1]
            bar.update(stop - start)
            continue
        image_emb, text_emb = suite.embed_source(graphdef, params, _Rows(source, start, stop), tokenizer, config)
        for mode, path in todo.items():
            rows = product_vectors(image_emb, text_emb, mode, e.image_weight)
            dim = rows.shape[1]
            write_shard(stores[mode], index, rows, headers[mode]["dtype"])
        bar.update(stop - start)
    bar.close()
    for mode, store in stores.items():
        headers[mode]["dim"] = int(dim)
        (store / HEADER).write_text(json.dumps(headers[mode], indent=2))
    return headers


def write_vector_store(store_dir: str | pathlib.Path, chunks, *, fingerprint: str, num_items: int,
                       titles=None, shard_size: int = 65536, dtype: str = "float32") -> dict:
    """A store from vectors made elsewhere (benchmarks, tests): no model, no catalog pointer.

    chunks: an iterable of [n, D] float32 L2-normalised row blocks of any sizes, num_items rows in all.
    titles: num_items strings (default "item <row>"). Returns the header.
    """
    store = pathlib.Path(store_dir)
    (store / "shards").mkdir(parents=True, exist_ok=True)
    with open(store / ITEMS, "w") as f:
        for row in range(num_items):
            f.write(json.dumps({"id": row, "title": titles[row] if titles is not None else f"item {row}"}) + "\n")
    header = {"version": STORE_VERSION, "fingerprint": fingerprint, "mode": "image", "image_weight": None,
              "shard_size": int(shard_size), "dtype": dtype, "num_items": int(num_items), "catalog": None,
              "workdir": None}
    buffer, index, written = [], 0, 0
    for rows in chunks:
        buffer.append(np.asarray(rows, np.float32))
        while sum(len(b) for b in buffer) >= shard_size:
            block = np.concatenate(buffer)
            write_shard(store, index, block[:shard_size], dtype)
            buffer, index, written = [block[shard_size:]], index + 1, written + shard_size
            header["dim"] = int(block.shape[1])
    rest = np.concatenate(buffer) if buffer else np.zeros((0, 0), np.float32)
    if len(rest):
        write_shard(store, index, rest, dtype)
        written += len(rest)
        header["dim"] = int(rest.shape[1])
    if written != num_items:
        raise StoreError(f"write_vector_store: got {written} rows, num_items says {num_items}")
    (store / HEADER).write_text(json.dumps(header, indent=2))
    return header


@dataclasses.dataclass
class Store:
    """An opened store. `shards`: [rows, D] arrays in store order that read as float32 when sliced.

    float32 / float16 stores: memory-mapped arrays; int8 stores: `store_codec.QuantizedShard`s
    over memory-mapped codes. `dtype`: how the rows are kept on disk.
    """

    path: pathlib.Path
    header: dict
    ids: list
    titles: list[str]
    shards: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.titles)

    @property
    def dtype(self) -> str:
        return self.header.get("dtype", "float32")

    @property
    def dim(self) -> int:
        return int(self.shards[0].shape[1])

    def rows(self, indices) -> np.ndarray:
        """[len(indices), D] float32 store vectors of the given store rows (any order)."""
        indices = np.asarray(indices, np.int64)
        shard_size = self.header["shard_size"]
        out = np.empty((len(indices), self.dim), np.float32)
        for shard in np.unique(indices // shard_size):
            where = np.flatnonzero(indices // shard_size == shard)
            out[where] = np.asarray(self.shards[shard][indices[where] - shard * shard_size], np.float32)
        return out

    def iter_rows(self, chunk: int = 65536):
        """Yields (start, [n, D] float32) over the store in order, `chunk` rows at a time at most."""
        start = 0
        for shard in self.shards:
            for a in range(0, len(shard), chunk):
                yield start + a, np.asarray(shard[a:a + chunk], np.float32)
            start += len(shard)


def open_store(store_dir: str | pathlib.Path) -> Store:
    """Opens a finished store (shards memory-mapped, never read whole). Raises StoreError."""
    store = pathlib.Path(store_dir)
    if not (store / HEADER).exists():
        raise StoreError(f"no embedding store at {store} (missing {HEADER}); make one with `prodclip embed`")
    header = json.loads((store / HEADER).read_text())
    if header.get("version") != STORE_VERSION:
        raise StoreError(f"{store / HEADER}: format version {header.get('version')}, expected {STORE_VERSION}")
    items = [json.loads(line) for line in (store / ITEMS).read_text().splitlines() if line]
    num_items, shard_size = header["num_items"], header["shard_size"]
    if num_items == 0 or not items:
        raise StoreError(f"store {store} is empty: nothing to search")
    shards = []
    for index in range(-(-num_items // shard_size)):
        path = _shard_path(store, index)
        if not path.exists():
            raise StoreError(f"store {store} is incomplete: {path.name} is missing; re-run `prodclip embed` "
                             "with the same --out to resume")
        codes = np.load(path, mmap_mode="r")
        if header.get("dtype", "float32") == "int8":
            if not _scale_path(store, index).exists():
                raise StoreError(f"store {store} is incomplete: {_scale_path(store, index).name} is missing; "
                                 "re-run `prodclip embed` with the same --out to resume")
            codes = store_codec.QuantizedShard(codes, np.load(_scale_path(store, index)))
        shards.append(codes)
    if sum(len(s) for s in shards) != num_items or len(items) != num_items:
        raise StoreError(f"store {store}: {sum(len(s) for s in shards)} rows in shards and {len(items)} items, "
                         f"header says {num_items}")
    return Store(store, header, [it["id"] for it in items], [it["title"] for it in items], shards)


def check_fingerprint(store: Store, fingerprint: str) -> None:
    """Raises StoreError if `store` was embedded by a different model than `fingerprint`'s."""
    if store.header["fingerprint"] != fingerprint:
        raise StoreError(
            f"store {store.path} was embedded by model {store.header['fingerprint']} "
            f"(workdir {store.header.get('workdir')}), but the model loaded now is {fingerprint}; "
            "scores between different models are meaningless. Re-embed with this model "
            "(`prodclip embed --workdir RUN --out NEW_STORE`) or search with the run that made the store")
