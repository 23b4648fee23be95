"""LiT text cache: a locked text tower's embedding of every distinct title, computed once.

With `optim.lock_text` the text tower never changes, so the embedding of a title is the same
at every step. When the titles are not augmented either (no title-word dropout), each
distinct tokenized title is embedded once before training; every batch then carries its
rows of the cache as `text_emb` and the step runs only the image tower (train.py's `embed`).

A cache lives in `<train.text_cache_dir or workdir/text_cache>/<key>/`:

    token_ids.npy   [N, L] int32    the distinct tokenized titles (sorted rows)
    text_emb.npy    [N, D] float32  their L2-normalised embeddings, memory-mapped when read
    text_tokens.npy [N, L, W] float16  with a fusion encoder only: the tower's token states (zero past
                                       each title's padded length), what the fusion encoder reads
    text_states.npy [N, L, W] float16  instead of both, with optim.unlock_text_blocks = n: the token states
                                       entering the first of the last n blocks, which train; the step
                                       runs those blocks and the pooling on them

`key` is a SHA-256 over the text tower's weights, the tokenizer's vocabulary and settings,
and the text model's config, so runs (e.g. seeds) sharing a locked tower share its cache,
and a different tower or tokenizer never reads another's. Files are written to a temporary
name and renamed, so a cache that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from prodclip import config as config_lib, files, trees
from prodclip.data import pipeline
from prodclip.evaluate import querybank
from prodclip.models import inference

log = logging.getLogger("prodclip")


class TextCacheMiss(KeyError):
    """A batch holds a title the cache has no embedding for."""


CACHED_ARRAYS = ("text_emb", "text_tokens", "text_states")  # what a cache directory may hold besides token_ids


def cache_key(text_params: Any, tokenizer, config: ml_collections.ConfigDict, states_before: int | None = None) -> str:
    """16 hex chars identifying what maps token ids to the cached rows (weights, tokenizer, text config).

    states_before: None (the whole tower's outputs), or a block index: the rows are the states entering
    that block, so only the weights below it count (the blocks from it on train).
    """
    h = hashlib.sha256()
    if states_before is None:
        trees.hash_tree(h, text_params)
    else:
        def before_the_cut(path) -> bool:  # the embeddings and the blocks that run before the cached states
            block = trees.block_index(path)
            return block is None or block < states_before

        trees.hash_tree(h, text_params, keep=before_the_cut)
        h.update(f"states-before-block:{states_before}".encode())
    h.update(json.dumps(sorted(tokenizer.hf.get_vocab().items())).encode())
    h.update(f"{tokenizer.context_length}:{tokenizer.lowercase}:{tokenizer.pad_id}".encode())
    h.update(json.dumps({"text": config.model.text.to_dict(), "embed_dim": config.model.embed_dim,
                         "dtype": config.model.dtype}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class TextCache:
    """Looks up the cached rows of each tokenized title.

    token_ids: [N, L] int32 distinct rows; arrays: {name: [N, ...]} their cached values (memmaps are
    fine), named as a batch carries them: "text_emb" [N, D] float32 (the locked tower's features),
    "text_tokens" [N, L, W] (its final token states, with a fusion encoder) or "text_states" [N, L, W]
    (the states entering the first unlocked block, with optim.unlock_text_blocks).
    """

    def __init__(self, token_ids: np.ndarray, arrays: dict[str, np.ndarray], directory: pathlib.Path | None = None):
        self.token_ids = token_ids
        self.arrays = arrays
        self.directory = directory
        self.index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(token_ids, np.int32))}

    @property
    def text_emb(self) -> np.ndarray | None:
        return self.arrays.get("text_emb")

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        """[B, L] int32 -> [B, D] float32 text_emb. Raises TextCacheMiss naming the first unknown row."""
        return self.read("text_emb", self.rows(token_ids))

    def rows(self, token_ids: np.ndarray) -> np.ndarray:
        """[B, L] int32 -> [B] int64 rows of the cache. Raises TextCacheMiss naming the first unknown row."""
        rows = []
        for i, row in enumerate(np.ascontiguousarray(token_ids, np.int32)):
            j = self.index.get(row.tobytes())
            if j is None:
                raise TextCacheMiss(f"batch row {i}: token ids {row.tolist()} are not in the text cache "
                                    f"{self.directory}; titles must come from the train split, unaugmented "
                                    f"(set train.text_cache='off' otherwise)")
            rows.append(j)
        return np.asarray(rows, np.int64)

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch plus every cached array's rows for its token_ids ('text_emb' [B, D] float32, token
        states [B, L, W]); for its negative_token_ids the same arrays prefixed 'negative_'. The negative
        ids are dropped unless token states need them for the padding mask."""
        rows = self.rows(batch["token_ids"])
        out = {**batch, **{name: self.read(name, rows) for name in self.arrays}}
        if "negative_token_ids" in out:
            negative_rows = self.rows(out["negative_token_ids"])
            out.update({f"negative_{name}": self.read(name, negative_rows) for name in self.arrays})
            if all(a.ndim == 2 for a in self.arrays.values()):
                del out["negative_token_ids"]
        return out

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The cached `name` of `rows` in memory: text_emb as float32, token states in their stored dtype."""
        part = np.asarray(self.arrays[name][rows])
        return part.astype(np.float32) if name == "text_emb" else part


def embed_by_length(encode_text, token_ids: np.ndarray, batch_size: int, pad_id: int | None,
                    multiple: int = 8) -> list[np.ndarray]:
    """[N, L] int32 -> the outputs of `encode_text` for every row: [N, D] float32 and, when it also returns
    token states, [N, L, W] (zero past each row's cut). Each title runs with its trailing padding cut
    to a multiple of `multiple`.

    Both text towers mask padding keys and pool over real tokens only, so a row's embedding does
    not depend on how much padding follows it (tested); most titles are far shorter than L, and
    the tower's cost grows with the padded length. One compilation per distinct cut length.
    pad_id None: no cut, every row runs at L.
    """
    token_ids = np.asarray(token_ids, np.int32)
    length = token_ids.shape[1]
    if pad_id is None:
        cut = np.full(len(token_ids), length)
    else:
        lengths = np.sum(token_ids != pad_id, axis=1)
        cut = np.minimum(-(-np.maximum(lengths, 1) // multiple) * multiple, length)
    out: list[np.ndarray] = []
    for width in np.unique(cut):
        rows = np.flatnonzero(cut == width)
        blocks = inference.batched(encode_text, (np.ascontiguousarray(token_ids[rows, :width]),), batch_size)
        for i in range(len(blocks[0])):
            part = np.concatenate([b[i] for b in blocks])
            states = part.ndim == 3  # token states [n, width, W], kept as [N, L, W] float16
            if len(out) == i:
                shape = (len(token_ids), length, part.shape[2]) if states else (len(token_ids), part.shape[1])
                out.append(np.zeros(shape, np.float16 if states else np.float32))
            if states:
                out[i][rows, :width] = part
            else:
                out[i][rows] = part
    return out or [np.zeros((0, 0), np.float32)]


def build_or_load(directory: str | pathlib.Path, token_ids: np.ndarray, encode_text, batch_size: int,
                  pad_id: int | None = None, names: Sequence[str] = ("text_emb",)) -> TextCache:
    """The cache in `directory` if it covers every row of `token_ids`, else one extended by the missing rows.

    token_ids: [M, L] int32 (duplicates allowed). encode_text: [b, L'] int32 -> one array per name of
    `names` (a tuple, or the array alone): [b, D] float32 or token states [b, L', W]; b = batch_size
    (the last chunk is padded to it, so one compilation serves each L'). With `pad_id`, rows are cut
    to their length (`embed_by_length`), L' <= L; without, L' = L. Only rows the stored cache lacks
    are embedded; the stored rows are kept as they are.
    """
    directory = pathlib.Path(directory)
    distinct = np.unique(np.asarray(token_ids, np.int32), axis=0)
    paths = {name: directory / f"{name}.npy" for name in ("token_ids", *names)}
    stored = None
    cache = load(directory, names) if all(path.is_file() for path in paths.values()) else None
    if cache is not None and all(len(a) == len(cache.token_ids) for a in cache.arrays.values()):
        # an interrupted write leaves other lengths: rebuilt
        missing = np.asarray([row.tobytes() not in cache.index for row in distinct], bool)
        if not missing.any():
            log.info("text cache: %d titles read from %s", len(cache), directory)
            return cache
        stored, distinct = cache, distinct[missing]
    t0 = time.time()
    new = embed_by_length(encode_text, distinct, batch_size, pad_id)
    num_new = len(distinct)
    if stored is not None:
        distinct = np.concatenate([stored.token_ids, distinct])
        new = [np.concatenate([np.asarray(stored.arrays[name]), part]) for name, part in zip(names, new)]
    distinct, order = np.unique(distinct, axis=0, return_index=True)
    arrays = {name: part[order] for name, part in zip(names, new)}
    directory.mkdir(parents=True, exist_ok=True)
    for other in CACHED_ARRAYS:  # arrays of fewer rows than token_ids would be read as the wrong rows
        if other not in names:
            (directory / f"{other}.npy").unlink(missing_ok=True)
    for name in (*names, "token_ids"):  # token_ids last: it marks the rows the others hold
        files.save_npy(paths[name], distinct if name == "token_ids" else arrays[name])
    log.info("text cache: embedded %d new distinct titles in %.1f s into %s (%d in all)", num_new, time.time() - t0,
             directory, len(distinct))
    return load(directory, names)


def load(directory: pathlib.Path, names: Sequence[str] = ("text_emb",)) -> TextCache:
    """The cache stored in `directory`, its `names` memory-mapped."""
    return TextCache(np.load(directory / "token_ids.npy"),
                     {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in names}, directory)


def cache_root(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """The folder that holds the run's text caches: train.text_cache_dir, else <workdir>/text_cache."""
    return pathlib.Path(config.train.text_cache_dir) if config.train.text_cache_dir else pathlib.Path(workdir) / "text_cache"


def for_run(config: ml_collections.ConfigDict, workdir: pathlib.Path, graphdef, params: Any, tokenizer,
            train_source, titles: Sequence[str] | None = None) -> TextCache | None:
    """The run's text cache, built from `titles` (default: the train split's), or None when
    `config.text_cache_on(config)` is False."""
    if not config_lib.text_cache_on(config):
        return None
    first_unlocked = config_lib.first_unlocked_text_block(config)
    if first_unlocked is not None:  # the states entering the unlocked blocks, which run in the step
        names = ("text_states",)
        encode = inference.text_state_encoder(graphdef, first_unlocked)
    elif config.model.fusion.enabled:  # the fusion encoder reads the final token states
        names = ("text_emb", "text_tokens")
        encode = inference.token_state_encoders(graphdef)[1]
    else:  # the text head runs in the step
        names = ("text_emb",)
        encode = inference.feature_encoders(graphdef)[1]
    key = cache_key(params["text_tower"], tokenizer, config, first_unlocked)
    root = cache_root(config, workdir)
    token_ids = tokenizer(list(titles) if titles is not None else pipeline.source_titles(train_source))
    return build_or_load(root / key, token_ids, lambda t: encode(params, t), config.eval.batch_size,
                         pad_id=tokenizer.pad_id, names=names)


def cached_title_features(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, params: Any,
                          tokenizer, titles: Sequence[str]) -> np.ndarray | None:
    """[N, F_t] float32 locked text-tower features of `titles` from the run's text cache, when it holds every one
    of them for these weights; else None. Reads only."""
    if not config_lib.text_cache_on(config) or config_lib.first_unlocked_text_block(config) is not None:
        return None
    key = cache_key(params["text_tower"], tokenizer, config)
    root = cache_root(config, workdir)
    if not ((root / key / "token_ids.npy").is_file() and (root / key / "text_emb.npy").is_file()):
        return None
    cache = load(root / key)
    if len(cache.arrays["text_emb"]) != len(cache.token_ids):  # an interrupted extension: rows would not line up
        return None
    try:
        features = cache.lookup(tokenizer(list(titles)))
    except TextCacheMiss:
        return None
    log.info("%d titles' features read from %s", len(titles), root / key)
    return features


def cached_title_embeddings(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, graphdef, params: Any,
                            tokenizer, titles: Sequence[str]) -> np.ndarray | None:
    """[N, D] float32 embeddings of `titles` through the text head from the run's text cache
    (`cached_title_features`), or None. Evaluation uses it instead of running the locked tower over the
    train titles (the querybank)."""
    features = cached_title_features(config, workdir, params, tokenizer, titles)
    if features is None:
        return None
    return inference.embed_cached_features(graphdef, params, features, config.eval.batch_size, text=True)


def cached_train_titles(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, graphdef, params: Any,
                        tokenizer, train_source) -> np.ndarray | None:
    """The querybank of eval.querybank_k from the run's text cache: `cached_title_embeddings` of the train
    split's distinct titles (querybank.bank_titles); None when the bank is off, there is no train split,
    or the cache lacks them (evaluation then runs the text tower)."""
    if config.eval.querybank_k <= 0 or train_source is None:
        return None
    titles = querybank.bank_titles(pipeline.source_titles(train_source))
    return cached_title_embeddings(config, workdir, graphdef, params, tokenizer, titles)
