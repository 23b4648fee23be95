"""An embedding store: a catalog split embedded once, searched many times.

Layout of a store directory:

    store.json          header: format version, model fingerprint, dim, num_items, shard_size,
                        mode (image | text | mix), image_weight, the catalog pointer
                        (the run's `data` config + split, to re-open images) and the workdir
    items.jsonl         one {"id", "title"} per item, in store order
    shards/emb_00000.npy  [<= shard_size, D] rows, L2-normalised, in store order, kept as the
                        header's dtype: float32, float16 or int8 (see store_codec.py)
    shards/scale_00000.npy  int8 stores only: [<= shard_size] float32 per-row scales
    shards/emb_00000.json {"rows", "dim", "bytes", "sha256"[, "scale_sha256"]} of that shard's files
    querybank.npy       optional (embed.querybank_k > 0): [num_items] float32, each item's mean top-k
                        cosine to the run's train titles, which text queries subtract half of
                        (evaluate/querybank.py); querybank.json {"k", "bank_titles", "bank_sha256",
                        "rows", "sha256", "store"} is written after it, "store" being `content_digest`
                        of the rows it was computed from (a re-embedded store no longer matches it)

Shards are written to a temporary name and renamed, then their record is written. A shard
counts as done only when its record exists and the file's size and SHA-256 match it: re-running
`prodclip embed` with the same model and settings skips the done shards and redoes a missing,
truncated or altered one (resume), and opening a store for search verifies every shard the same
way. A store made by a different model (fingerprint), mode, weight or shard size is refused with
an error rather than mixed, and so is an --out folder that holds other files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from typing import Any

import ml_collections
import numpy as np

from prodclip import errors, files, trees
from prodclip.data.sources import RowRange
from prodclip.evaluate import store_codec
from prodclip.models import inference

STORE_VERSION = 2
HEADER = "store.json"
ITEMS = "items.jsonl"
QUERYBANK = "querybank.npy"
QUERYBANK_RECORD = "querybank.json"

log = logging.getLogger("prodclip")

class StoreError(errors.StoreError):
    """A store that cannot be written, read or used with this model; the message says why."""


def model_fingerprint(params: Any, tokenizer, config: ml_collections.ConfigDict) -> str:
    """16 hex chars identifying what maps inputs to embeddings.

    A SHA-256 over every parameter (path, dtype, shape, bytes), the tokenizer's
    vocabulary and context length, the image input size and resize mode, and the test-time flip.
    """
    h = hashlib.sha256()
    trees.hash_tree(h, params)
    h.update(json.dumps(sorted(tokenizer.hf.get_vocab().items())).encode())
    h.update(f"{tokenizer.context_length}:{tokenizer.lowercase}:{config.data.image_size}:{config.data.resize}".encode())
    if config.model.image.test_time_flip:  # appended only when on: stores embedded without it keep their fingerprint
        h.update(b":test_time_flip")
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


def _shard_path(store: pathlib.Path, index: int) -> pathlib.Path:
    return store / "shards" / f"emb_{index:05d}.npy"


def _scale_path(store: pathlib.Path, index: int) -> pathlib.Path:
    return store / "shards" / f"scale_{index:05d}.npy"


def _record_path(store: pathlib.Path, index: int) -> pathlib.Path:
    return _shard_path(store, index).with_suffix(".json")


def write_shard(store: pathlib.Path, index: int, rows: np.ndarray, dtype: str) -> None:
    """Writes shard `index` of `store` from [n, D] float32 rows, encoded as `dtype`, then its record.

    Each file is written to a temporary name and renamed; the record (rows, dim, bytes, SHA-256 of
    the rows file and, for int8, of the scales file) comes last, so a shard with a record is complete.
    """
    stored, scales = store_codec.encode_rows(rows, dtype)
    record = {"rows": int(rows.shape[0]), "dim": int(rows.shape[1])}
    if scales is not None:
        files.save_npy(_scale_path(store, index), scales)
        record["scale_sha256"] = trees.file_sha256(_scale_path(store, index))
    path = _shard_path(store, index)
    files.save_npy(path, stored)
    record.update(bytes=path.stat().st_size, sha256=trees.file_sha256(path))
    files.write_text(_record_path(store, index), json.dumps(record))


def shard_problem(store: pathlib.Path, index: int, rows: int | None = None) -> str | None:
    """Why shard `index` of `store` cannot be used (missing, no record, wrong size or checksum), or None."""
    path, record_path = _shard_path(store, index), _record_path(store, index)
    if not path.exists():
        return f"{path.name} is missing"
    if not record_path.exists():
        return f"{path.name} has no record {record_path.name} (its write did not finish)"
    record = json.loads(record_path.read_text())
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path.name} is {size} bytes, {record['bytes']} were written (truncated or replaced)"
    if rows is not None and record["rows"] != rows:
        return f"{path.name} holds {record['rows']} rows, {rows} expected"
    if trees.file_sha256(path) != record["sha256"]:
        return f"{path.name} does not match its SHA-256 checksum (altered or damaged)"
    if "scale_sha256" in record:
        scale = _scale_path(store, index)
        if not scale.exists() or trees.file_sha256(scale) != record["scale_sha256"]:
            return f"{scale.name} is missing or does not match its SHA-256 checksum"
    return None


# Files a store directory may hold before its header exists (an embed killed while starting).
_STORE_FILES = {HEADER, ITEMS, "shards", "skipped_rows.jsonl", QUERYBANK, QUERYBANK_RECORD}


def check_store_dir(store: str | pathlib.Path) -> None:
    """Raises StoreError if `store` exists holding files that are not an embedding store's; writes nothing."""
    store = pathlib.Path(store)
    if store.exists() and not store.is_dir():
        raise StoreError(f"--out {store} is a file; give a new or existing store directory")
    if not store.is_dir() or (store / HEADER).exists():
        return
    others = sorted(p.name for p in store.iterdir() if p.name not in _STORE_FILES
                    and not files.is_temporary(p.name))
    if others:
        raise StoreError(f"--out {store} is not empty and is not an embedding store (it holds "
                         f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); give a new directory")


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
    check_store_dir(store)
    if (store / HEADER).exists():
        _check_same_settings(store / HEADER, json.loads((store / HEADER).read_text()), header)
        return
    (store / "shards").mkdir(parents=True, exist_ok=True)
    remove_querybank(store)  # left by an earlier store in this folder: computed from other rows
    titles = source.titles if hasattr(source, "titles") else [source[i]["title"] for i in range(len(source))]
    files.write_text(store / ITEMS, (json.dumps({"id": item_id, "title": title}) + "\n"
                                     for item_id, title in zip(_source_ids(source), titles)))
    files.write_text(store / HEADER, json.dumps(header, indent=2))  # last: a store with a header is whole


def embed_catalog_views(graphdef, params, source, tokenizer, config: ml_collections.ConfigDict,
                        store_dirs: dict[str, str | pathlib.Path], *, split: str, workdir: str | pathlib.Path,
                        progress: bool = True) -> dict[str, dict]:
    """Embeds every item of `source` once into one store per mode (store_dirs: image | text | mix -> dir).

    A shard is computed only when some store lacks it (resume), and both towers run once for
    all the stores. Returns mode -> header.
    """
    num_items = len(source)
    if num_items == 0:
        raise StoreError(f"split {split!r} of data.name={config.data.name!r} has no items: nothing to embed")
    e = config.embed
    if e.get("dtype", "float32") not in store_codec.DTYPES:
        raise StoreError(f"embed.dtype={e.dtype!r} is not one of {', '.join(store_codec.DTYPES)}")
    stores = {mode: pathlib.Path(path) for mode, path in store_dirs.items()}
    for store in stores.values():
        check_store_dir(store)
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
    # several processes (multi-host): process 0 creates the stores, each writes the shards it owns
    import jax

    from prodclip.evaluate import multihost

    process, count = jax.process_index(), jax.process_count()
    if process == 0:
        for mode, store in stores.items():
            _open_or_create(store, headers[mode], source)
    multihost.barrier("prodclip-embed-stores-created")
    if process != 0:
        for mode, store in stores.items():
            _check_same_settings(store / HEADER, json.loads((store / HEADER).read_text()), headers[mode])

    import tqdm

    shard_size = int(e.shard_size)
    num_shards = -(-num_items // shard_size)
    bar = tqdm.tqdm(total=num_items, desc="embed", unit="item", disable=not progress, dynamic_ncols=True)
    for index in range(num_shards):
        start, stop = index * shard_size, min((index + 1) * shard_size, num_items)
        todo = {}
        for mode, store in stores.items():
            path = _shard_path(store, index)
            problem = shard_problem(store, index, stop - start)
            if problem is not None:
                if path.exists() and process == 0:
                    log.warning("store %s: %s; embedding that shard again", store, problem)
                todo[mode] = path
        if not todo or multihost.shard_owner(index, count) != process:
            bar.update(stop - start)
            continue
        image_emb, text_emb = inference.embed_source(graphdef, params, RowRange(source, start, stop), tokenizer,
                                                     config)
        for mode in todo:
            rows = product_vectors(image_emb, text_emb, mode, e.image_weight)
            write_shard(stores[mode], index, rows, headers[mode]["dtype"])
        bar.update(stop - start)
    bar.close()
    multihost.barrier("prodclip-embed-shards-written")
    dim = int(np.load(_shard_path(next(iter(stores.values())), 0), mmap_mode="r").shape[1])
    for mode, store in stores.items():
        headers[mode]["dim"] = dim
        if process == 0:
            (store / HEADER).write_text(json.dumps(headers[mode], indent=2))
    multihost.barrier("prodclip-embed-done")
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
    densities: np.ndarray | None = None  # [N] float32 querybank densities for text queries, when embedded

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
    try:
        header = json.loads((store / HEADER).read_text())
        items = [json.loads(line) for line in (store / ITEMS).read_text().splitlines() if line]
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"store {store} is damaged ({type(e).__name__}: {e}); embed it again into a new --out") from e
    if header.get("version") != STORE_VERSION:
        raise StoreError(f"{store / HEADER}: format version {header.get('version')}, expected {STORE_VERSION}; "
                         "embed the catalog again with `prodclip embed` into a new --out")
    num_items, shard_size = header["num_items"], header["shard_size"]
    if num_items == 0 or not items:
        raise StoreError(f"store {store} is empty: nothing to search")
    shards = []
    for index in range(-(-num_items // shard_size)):
        path = _shard_path(store, index)
        problem = shard_problem(store, index, min(shard_size, num_items - index * shard_size))
        if problem is not None:
            raise StoreError(f"store {store}: {problem}; re-run `prodclip embed` with the same --out to redo it")
        codes = np.load(path, mmap_mode="r")
        if header.get("dtype", "float32") == "int8":
            codes = store_codec.QuantizedShard(codes, np.load(_scale_path(store, index)))
        shards.append(codes)
    if sum(len(s) for s in shards) != num_items or len(items) != num_items:
        raise StoreError(f"store {store}: {sum(len(s) for s in shards)} rows in shards and {len(items)} items, "
                         f"header says {num_items}")
    return Store(store, header, [it["id"] for it in items], [it["title"] for it in items], shards,
                 read_querybank(store, header))


def content_digest(store: pathlib.Path, header: dict) -> str:
    """16 hex chars naming a store's rows: its model, mode, weight, dtype and every shard's checksums."""
    h = hashlib.sha256(json.dumps({k: header.get(k) for k in ("fingerprint", "mode", "image_weight", "dtype",
                                                             "num_items", "shard_size")}, sort_keys=True).encode())
    for index in range(-(-header["num_items"] // header["shard_size"])):
        record = _record_path(store, index)
        h.update(record.read_bytes() if record.exists() else b"missing")
    return h.hexdigest()[:16]


def querybank_record(store_dir: str | pathlib.Path) -> dict | None:
    """The store's querybank record ({"k", "bank_titles", "bank_sha256", "rows", "sha256", "store"}), or None."""
    path = pathlib.Path(store_dir) / QUERYBANK_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def write_querybank(store_dir: str | pathlib.Path, densities: np.ndarray, *, k: int, bank_sha256: str,
                    bank_titles: int) -> None:
    """Writes each item's querybank density ([N] float32, store order) of the finished store, then its record."""
    store = pathlib.Path(store_dir)
    header = json.loads((store / HEADER).read_text())
    files.save_npy(store / QUERYBANK, np.asarray(densities, np.float32))
    files.write_text(store / QUERYBANK_RECORD, json.dumps(
        {"k": int(k), "bank_titles": int(bank_titles), "bank_sha256": bank_sha256, "rows": int(len(densities)),
         "sha256": trees.file_sha256(store / QUERYBANK), "store": content_digest(store, header)}))


def remove_querybank(store_dir: str | pathlib.Path) -> bool:
    """Deletes the store's querybank files (record first); True when there were any."""
    store = pathlib.Path(store_dir)
    found = False
    for name in (QUERYBANK_RECORD, QUERYBANK):
        if (store / name).exists():
            (store / name).unlink()
            found = True
    return found


def read_querybank(store: pathlib.Path, header: dict) -> np.ndarray | None:
    """[num_items] float32 densities when the store has them (verified against their record and the store's
    rows), else None. Raises StoreError for densities that are damaged or belong to other rows."""
    record = querybank_record(store)
    if record is None:
        return None
    path = store / QUERYBANK
    if (not path.exists() or record["rows"] != header["num_items"] or trees.file_sha256(path) != record["sha256"]
            or record.get("store") != content_digest(store, header)):
        raise StoreError(f"store {store}: {QUERYBANK} is missing, damaged or was computed for other rows; re-run "
                         f"`prodclip embed` with the same --out to compute it again")
    return np.load(path)


def check_fingerprint(store: Store, fingerprint: str) -> None:
    """Raises StoreError if `store` was embedded by a different model than `fingerprint`'s."""
    if store.header["fingerprint"] != fingerprint:
        raise StoreError(
            f"store {store.path} was embedded by model {store.header['fingerprint']} "
            f"(workdir {store.header.get('workdir')}), but the model loaded now is {fingerprint}; "
            "scores between different models are meaningless. Re-embed with this model "
            "(`prodclip embed --workdir RUN --out NEW_STORE`) or search with the run that made the store")
