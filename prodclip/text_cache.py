"""LiT text cache: a locked text tower's embedding of every distinct title, computed once.

With `optim.lock_text` the text tower never changes, so the embedding of a title is the same
at every step. When the titles are not augmented either (no title-word dropout), each
distinct tokenized title is embedded once before training; every batch then carries its
rows of the cache as `text_emb` and the step runs only the image tower (train.py's `embed`).

A cache lives in `<train.text_cache_dir or workdir/text_cache>/<key>/`:

    token_ids.npy   [N, L] int32    the distinct tokenized titles (sorted rows)
    text_emb.npy    [N, D] float32  their L2-normalised embeddings, memory-mapped when read

`key` is a SHA-256 over the text tower's weights, the tokenizer's vocabulary and settings,
and the text model's config, so runs (e.g. seeds) sharing a locked tower share its cache,
and a different tower or tokenizer never reads another's. Files are written to a temporary
name and renamed, so a cache that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from prodclip import config as config_lib, trees
from prodclip.data import pipeline
from prodclip.models import inference

log = logging.getLogger("prodclip")


class TextCacheMiss(KeyError):
    """A batch holds a title the cache has no embedding for."""


def cache_key(text_params: Any, tokenizer, config: ml_collections.ConfigDict) -> str:
    """16 hex chars identifying what maps token ids to text embeddings (weights, tokenizer, text config)."""
    h = hashlib.sha256()
    trees.hash_tree(h, text_params)
    h.update(json.dumps(sorted(tokenizer.hf.get_vocab().items())).encode())
    h.update(f"{tokenizer.context_length}:{tokenizer.lowercase}:{tokenizer.pad_id}".encode())
    h.update(json.dumps({"text": config.model.text.to_dict(), "embed_dim": config.model.embed_dim,
                         "dtype": config.model.dtype}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class TextCache:
    """Looks up the cached embedding of each tokenized title.

    token_ids: [N, L] int32 distinct rows; text_emb: [N, D] float32 (a memmap is fine).
    """

    def __init__(self, token_ids: np.ndarray, text_emb: np.ndarray, directory: pathlib.Path | None = None):
        self.token_ids = token_ids
        self.text_emb = text_emb
        self.directory = directory
        self.index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(token_ids, np.int32))}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        """[B, L] int32 -> [B, D] float32. Raises TextCacheMiss naming the first unknown row."""
        rows = []
        for i, row in enumerate(np.ascontiguousarray(token_ids, np.int32)):
            j = self.index.get(row.tobytes())
            if j is None:
                raise TextCacheMiss(f"batch row {i}: token ids {row.tolist()} are not in the text cache "
                                    f"{self.directory}; titles must come from the train split, unaugmented "
                                    f"(set train.text_cache='off' otherwise)")
            rows.append(j)
        return np.asarray(self.text_emb[np.asarray(rows)], np.float32)

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch plus 'text_emb' [B, D] float32 for its token_ids (and 'negative_text_emb' for its
        negative_token_ids, which it then drops)."""
        out = {**batch, "text_emb": self.lookup(batch["token_ids"])}
        if "negative_token_ids" in out:
            out["negative_text_emb"] = self.lookup(out.pop("negative_token_ids"))
        return out


def embed_by_length(encode_text, token_ids: np.ndarray, batch_size: int, pad_id: int | None,
                    multiple: int = 8) -> np.ndarray:
    """[N, L] int32 -> [N, D] float32, each title run with its trailing padding cut to a multiple of `multiple`.

    Both text towers mask padding keys and pool over real tokens only, so a row's embedding does
    not depend on how much padding follows it (tested); most titles are far shorter than L, and
    the tower's cost grows with the padded length. One compilation per distinct cut length.
    pad_id None: no cut, every row runs at L.
    """
    token_ids = np.asarray(token_ids, np.int32)
    if pad_id is None:
        cut = np.full(len(token_ids), token_ids.shape[1])
    else:
        lengths = np.sum(token_ids != pad_id, axis=1)
        cut = np.minimum(-(-np.maximum(lengths, 1) // multiple) * multiple, token_ids.shape[1])
    out = None
    for width in np.unique(cut):
        rows = np.flatnonzero(cut == width)
        blocks = inference.batched(encode_text, (np.ascontiguousarray(token_ids[rows, :width]),), batch_size)
        emb = np.concatenate([b[0] for b in blocks]).astype(np.float32)
        if out is None:
            out = np.zeros((len(token_ids), emb.shape[1]), np.float32)
        out[rows] = emb
    return out if out is not None else np.zeros((0, 0), np.float32)


def build_or_load(directory: str | pathlib.Path, token_ids: np.ndarray, encode_text, batch_size: int,
                  pad_id: int | None = None) -> TextCache:
    """The cache in `directory` if it covers every row of `token_ids`, else one extended by the missing rows.

    token_ids: [M, L] int32 (duplicates allowed). encode_text: [b, L'] int32 -> [b, D] float32
    for b = batch_size (the last chunk is padded to it, so one compilation serves each L'). With
    `pad_id`, rows are cut to their length (`embed_by_length`), L' <= L; without, L' = L. Only
    rows the stored cache lacks are embedded; the stored rows are kept as they are.
    """
    directory = pathlib.Path(directory)
    distinct = np.unique(np.asarray(token_ids, np.int32), axis=0)
    ids_path, emb_path = directory / "token_ids.npy", directory / "text_emb.npy"
    stored_ids, stored_emb = distinct[:0], None
    if ids_path.is_file() and emb_path.is_file():
        cache = TextCache(np.load(ids_path), np.load(emb_path, mmap_mode="r"), directory)
        missing = np.asarray([row.tobytes() not in cache.index for row in distinct], bool)
        if not missing.any():
            log.info("text cache: %d titles read from %s", len(cache), directory)
            return cache
        stored_ids, stored_emb, distinct = cache.token_ids, np.asarray(cache.text_emb, np.float32), distinct[missing]
    t0 = time.time()
    new_emb = embed_by_length(encode_text, distinct, batch_size, pad_id)
    num_new = len(distinct)
    distinct, order = np.unique(np.concatenate([stored_ids, distinct]), axis=0, return_index=True)
    text_emb = (new_emb if stored_emb is None else np.concatenate([stored_emb, new_emb]))[order].astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    for path, array in ((emb_path, text_emb), (ids_path, distinct)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    log.info("text cache: embedded %d new distinct titles in %.1f s into %s (%d in all)", num_new, time.time() - t0,
             directory, len(distinct))
    return TextCache(np.load(ids_path), np.load(emb_path, mmap_mode="r"), directory)


def for_run(config: ml_collections.ConfigDict, workdir: pathlib.Path, graphdef, params: Any, tokenizer,
            train_source, titles: Sequence[str] | None = None) -> TextCache | None:
    """The run's text cache, built from `titles` (default: the train split's), or None when
    `config.text_cache_on(config)` is False."""
    if not config_lib.text_cache_on(config):
        return None
    encode = inference.feature_encoders(graphdef)[1]  # the text head runs in the step
    key = cache_key(params["text_tower"], tokenizer, config)
    root = pathlib.Path(config.train.text_cache_dir) if config.train.text_cache_dir else workdir / "text_cache"
    token_ids = tokenizer(list(titles) if titles is not None else pipeline.source_titles(train_source))
    return build_or_load(root / key, token_ids, lambda t: encode(params, t), config.eval.batch_size,
                         pad_id=tokenizer.pad_id)
