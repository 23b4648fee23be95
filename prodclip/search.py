"""Search an embedding store with a text or an image query; show the results as HTML or PNG.

    prodclip search "navy striped shirt" --store STORE --workdir RUN [-k 10] [--html out.html | --png out.png]
    prodclip search --image photo.jpg     --store STORE --workdir RUN

Scores are cosine similarities (store rows and queries are L2-normalised). The
store is scanned shard by shard with `ranking.chunked_top_k`, so memory is
bounded by one gallery chunk per step, never the whole store. A store embedded with
embed.querybank_k > 0 answers text queries with querybank normalisation: rows ranked by
cosine - 0.5 * density (evaluate/querybank.py) over a pool of rows by cosine that
`querybank_candidates` widens until that order is exact.

Behaviour on bad input:
  - a text query longer than the context length is truncated the way training
    titles are (tokenizer.truncation, default: keep the start) with a warning that
    shows its first ECHO_CHARS characters;
  - a text query none of whose tokens is in the vocabulary ("!!!", emoji) is answered
    with a warning that the ranking carries no information about it;
  - an image that fails to decode, an empty or incomplete store, and a store
    embedded by another model (fingerprint mismatch) raise SearchError/StoreError.
"""

from __future__ import annotations

import base64
import html
import logging
import pathlib
from typing import Callable, Sequence

import numpy as np

from prodclip import errors
from prodclip.data.catalog import png_bytes
from prodclip.evaluate import querybank, ranking
from prodclip.evaluate.store import Store, StoreError
from prodclip.models import inference

log = logging.getLogger("prodclip")

# A re-ranker: (query, hits) -> hits in a new order with new scores, e.g. `fusion_reranker`.
Reranker = Callable[[dict, list[dict]], list[dict]]
# Rows beyond k by cosine that querybank normalisation first re-orders (`querybank_candidates` widens the
# pool until the order is exact): on Myntra val 100 already holds the exact top 10 of nearly every full
# title and of 96-98% of the short queries against a mix store (docs/search.md).
QUERYBANK_POOL = 100
# The widest pool `querybank_candidates` asks for: each widening is another search of the store, and a
# store with one outlier of very low density could otherwise widen towards a full sort.
QUERYBANK_MAX_POOL = 3200


class SearchError(errors.QueryError):
    """A query that cannot be run; the message says why."""


def querybank_train_source(run, workdir: str | pathlib.Path):
    """The run's own train split, whose distinct titles are the querybank of `prodclip embed` (its saved data
    config, `catalog_eval.run_train_source`). Raises StoreError when it cannot be read or holds fewer
    distinct titles than embed.querybank_k; checked before anything is embedded."""
    from prodclip import catalog_eval
    from prodclip.data import pipeline

    k = run.config.embed.querybank_k
    vocab = {label: stats["names"] for label, stats in (run.label_stats or {}).items()}
    train = catalog_eval.run_train_source(pathlib.Path(workdir), run.config, vocab)
    if train is None or not len(train):
        raise StoreError(f"embed.querybank_k={k} needs the run's own train split (its titles are the bank) and it "
                         "cannot be read; make it readable or pass --config.embed.querybank_k=0")
    distinct = len(querybank.bank_titles(pipeline.source_titles(train)))
    if distinct < k:
        raise StoreError(f"embed.querybank_k={k} is more than the {distinct} distinct titles of the run's train "
                         f"split; pass a smaller --config.embed.querybank_k")
    return train


def embed_querybank(run, store_dir: str | pathlib.Path, train_source) -> dict:
    """Writes the store's querybank densities (embed.querybank_k > 0): each store row's mean top-k cosine to
    the distinct titles of `train_source` (`querybank_train_source`; evaluate/querybank.py). Skipped when
    the store already holds them for this k, bank and rows. Returns the store's querybank record."""
    import hashlib

    from prodclip.data import pipeline
    from prodclip.evaluate import store as store_lib
    from prodclip.evaluate import suite

    config, k = run.config, run.config.embed.querybank_k
    titles = querybank.bank_titles(pipeline.source_titles(train_source))
    bank_sha256 = hashlib.sha256("\n".join(titles).encode()).hexdigest()
    old = store_lib.querybank_record(store_dir)
    if old is not None and (old["k"], old["bank_sha256"]) == (k, bank_sha256):
        try:
            store_lib.open_store(store_dir)  # verifies the densities against the rows
            return old
        except StoreError as e:
            log.info("querybank: computed again (%s)", e)
    store_lib.remove_querybank(store_dir)
    store = store_lib.open_store(store_dir)
    bank = suite.title_bank(run.graphdef, run.params, train_source, run.tokenizer, config)
    densities = np.concatenate([querybank.densities(rows, bank, k) for _, rows in store.iter_rows()])
    store_lib.write_querybank(store_dir, densities, k=k, bank_sha256=bank_sha256, bank_titles=len(titles))
    return store_lib.querybank_record(store_dir)


def update_store_querybank(run, store_dir: str | pathlib.Path, train_source) -> str | None:
    """After `prodclip embed` (process 0 only): the store's querybank densities computed (`embed_querybank`)
    when `train_source` is given, else removed if it held some. Returns a line for the user, or None."""
    import jax

    from prodclip.evaluate import store as store_lib

    if jax.process_index() != 0:
        return None
    if train_source is not None:
        record = embed_querybank(run, store_dir, train_source)
        return f"querybank: {record['rows']} densities against {record['bank_titles']} train titles (k {record['k']})\n"
    if store_lib.remove_querybank(store_dir):
        return "querybank: removed (embed.querybank_k=0); text queries rank by the cosine\n"
    return None


def text_query_densities(store: Store, query: dict) -> np.ndarray | None:
    """The store's querybank densities when `query` is a text query ({"text": ...}) and it has them, else None."""
    return store.densities if "text" in query else None


def top_k(store_shards: Sequence[np.ndarray], queries: np.ndarray, k: int, *,
          chunk_size: int = ranking.DEFAULT_CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows over all shards: (scores [Q, k'] float32, indices [Q, k'] int64 into the store).

    queries [Q, D] float32; shards [n_s, D] (memory-mapped is fine). Equal scores go
    to the lower store index, the same rule as `ranking.chunked_top_k`.
    """
    if not store_shards or sum(len(s) for s in store_shards) == 0:
        raise StoreError("empty gallery: the store has no rows to search")
    best_scores, best_index, offset = [], [], 0
    for shard in store_shards:
        scores, index = ranking.chunked_top_k(queries, shard, k, chunk_size=chunk_size,
                                              query_block=min(len(queries), ranking.DEFAULT_QUERY_BLOCK))
        best_scores.append(scores)
        best_index.append(index + offset)
        offset += len(shard)
    if len(best_scores) == 1:
        return best_scores[0], best_index[0]
    scores, index = np.concatenate(best_scores, axis=1), np.concatenate(best_index, axis=1)
    k_eff = min(k, offset)
    order = np.lexsort((index, -scores), axis=1)[:, :k_eff]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(index, order, axis=1)


ECHO_CHARS = 80  # characters of a query shown in a warning


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` itself, or its first `limit` characters and how many more there are."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def known_token_count(tokenizer, text: str) -> int:
    """Tokens of `text` (special tokens excluded) that are in the vocabulary, i.e. not [UNK]."""
    ids = tokenizer.hf(text.lower() if tokenizer.lowercase else text, add_special_tokens=False)["input_ids"]
    return sum(1 for i in ids if i != tokenizer.hf.unk_token_id)


def query_token_count(tokenizer, text: str) -> int:
    """Tokens `text` needs, special tokens included, before truncation."""
    return len(tokenizer.hf(text.lower() if tokenizer.lowercase else text)["input_ids"])


def encode_text_queries(graphdef, params, tokenizer, texts: Sequence[str]) -> np.ndarray:
    """N query strings -> [N, D] float32; warns for each query the context length truncates."""
    for text in texts:
        if not text.strip():
            raise SearchError("empty text query")
        n = query_token_count(tokenizer, text)
        if n > tokenizer.context_length:
            log.warning("query %r is %d tokens; truncated to the context length %d (%s side dropped)",
                        shorten(text), n, tokenizer.context_length,
                        "start" if tokenizer.hf.truncation_side == "left" else "end")
        if known_token_count(tokenizer, text) == 0:
            log.warning("query %r: none of its tokens is in the model's vocabulary; the results are not "
                        "about it (try words from catalog titles)", shorten(text))
    return inference.title_encoder(graphdef, params, tokenizer, batch_size=len(texts))(texts)


def load_query_image(path: str | pathlib.Path, config) -> np.ndarray:
    """An image file -> [S, S, 3] uint8 model input (fitted as eval images are). Raises SearchError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SearchError(f"query image not found: {path}")
    return decode_query_image(path.read_bytes(), config, label=str(path))


def decode_query_image(data: bytes, config, *, label: str = "query image") -> np.ndarray:
    """Image file bytes -> [S, S, 3] uint8 model input (fitted as eval images are). Raises SearchError."""
    from prodclip.data import catalog, pipeline

    try:
        image = catalog.decode_image(data)
    except catalog.ImageError as e:
        raise SearchError(f"query image {label} cannot be used ({e})") from e
    return pipeline.fit_to_square(image, config.data.image_size, config.data.resize)


def encode_image_queries(graphdef, params, images: np.ndarray, config) -> np.ndarray:
    """[N, S, S, 3] uint8 -> [N, D] float32, embedded as the run's stores are (model.image.test_time_flip)."""
    return inference.image_encoder(graphdef, params, bool(config.model.image.test_time_flip))(images)


_OPEN_INDEXES: dict = {}


def store_index(store: Store):
    """The store's FAISS index (prodclip/index.py), opened once per index file; None when it has none."""
    from prodclip import index as index_lib

    path = pathlib.Path(store.path) / index_lib.INDEX_FILE
    if not path.exists():
        return None
    key = (str(path.resolve()), path.stat().st_mtime_ns, id(store))
    if key not in _OPEN_INDEXES:
        _OPEN_INDEXES.clear()
        _OPEN_INDEXES[key] = index_lib.open_index(store.path, store=store)
    return _OPEN_INDEXES[key]


def querybank_candidates(find: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
                         k: int, densities: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines [Q, P], rows [Q, P]) by cosine, best first, from `find(queries, pool)`, with a pool wide enough
    that the top k of them by cos - 0.5 * density are the top k of all `num_rows` rows.

    The pool starts at k + QUERYBANK_POOL and doubles until every query's k-th normalised score beats the
    best one a row outside the pool could have: a cosine no higher than the pool's last and the store's
    smallest density. With the exact scan the result is then exact; with an approximate index, exact over
    what the index returns. A pool stops growing at max(QUERYBANK_MAX_POOL, k + QUERYBANK_POOL) rows,
    where the order is the pool's (logged). densities: [num_rows] the store's (`text_query_densities`).
    """
    densities = np.asarray(densities, np.float32)
    lowest = querybank.DENSITY_WEIGHT * float(densities.min())
    pool = min(num_rows, k + QUERYBANK_POOL)
    widest = min(num_rows, max(QUERYBANK_MAX_POOL, pool))
    while True:
        cosines, rows = find(queries, pool)
        if pool >= num_rows or cosines.shape[1] < pool:
            return cosines, rows
        normalised = cosines - querybank.DENSITY_WEIGHT * densities[rows]
        kth_best = -np.partition(-normalised, k - 1, axis=1)[:, k - 1]
        if np.all(kth_best > cosines[:, -1] - lowest):
            return cosines, rows
        if pool >= widest:
            log.info("querybank: the top %d by the normalised score are taken from the top %d rows by cosine "
                     "(search.QUERYBANK_MAX_POOL); a row beyond them could rank higher", k, pool)
            return cosines, rows
        pool = min(widest, 2 * pool)


def search(store: Store, query_emb: np.ndarray, k: int, *, chunk_size: int = ranking.DEFAULT_CHUNK_SIZE,
           rerank: Reranker | None = None, query: dict | None = None, index="auto",
           rescore: int | None = None, densities: np.ndarray | None = None) -> list[list[dict]]:
    """Per query, the top-k hits [{"rank", "index", "id", "title", "score"}], best first.

    query_emb: [Q, D] float32. `index`: "auto" uses the store's FAISS index when it has one
    (`prodclip index`) and the exact chunked scan otherwise; None forces the exact scan; or
    an opened `index.Index`. `rescore`: re-score rescore * k index candidates with the exact
    store vectors (None: the index's default). `rerank`, when given, re-orders each query's
    hits (the hook for a fusion head); `query` is passed to it as is. `densities`: [N] the store's
    querybank densities (`text_query_densities`); the rows are then ranked by cosine - 0.5 * density
    (evaluate/querybank.py) over a pool of rows by cosine that `querybank_candidates` widens until that
    order is exact, and it is each hit's "score" (its cosine is kept as "cosine").
    """
    dim = store.shards[0].shape[1]
    if query_emb.shape[1] != dim:
        raise StoreError(f"store rows have dim {dim}, the query embedding has dim {query_emb.shape[1]}")
    opened = store_index(store) if isinstance(index, str) and index == "auto" else index

    def find(queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if opened is not None:
            return opened.search(np.asarray(queries, np.float32), n, rescore=rescore)
        return top_k(store.shards, queries, n, chunk_size=chunk_size)
    if densities is None:
        scores, index = find(query_emb, k)
    else:
        cosines, index = querybank_candidates(find, query_emb, k, densities, len(store))
        scores = cosines - querybank.DENSITY_WEIGHT * np.asarray(densities, np.float32)[index]
        order = np.lexsort((index, -scores), axis=1)[:, :min(k, index.shape[1])]
        scores, index, cosines = (np.take_along_axis(a, order, axis=1) for a in (scores, index, cosines))
    out = []
    for q in range(len(query_emb)):
        hits = [{"rank": r + 1, "index": int(i), "id": store.ids[i], "title": store.titles[i], "score": float(s)}
                for r, (s, i) in enumerate(zip(scores[q], index[q]))]
        if densities is not None:  # the fusion re-ranker's two-tower term reads the cosine
            for hit, cosine in zip(hits, cosines[q]):
                hit["cosine"] = float(cosine)
        out.append(rerank(query or {}, hits) if rerank is not None else hits)
    return out


def fusion_reranker(graphdef, params, tokenizer, store: Store, config) -> Reranker:
    """A `Reranker` that re-scores hits with the run's fusion encoder (model.fusion.enabled).

    The query dict holds "text" (a string) or "image" ([S, S, 3] uint8). A text query is
    matched against each hit's catalog image, an image query against each hit's title.
    Scores follow eval.rerank_mode (`rerank.rerank_scores`): the ITM log-odds, or plus
    eval.rerank_itc_weight * logit_scale * the hit's cosine ("itm+itc"). Hits keep "two_tower_rank" and "two_tower_score"; equal scores
    keep the two-tower order. When the store's catalog images cannot be re-opened, the
    hits come back unchanged, with a warning.
    """
    from prodclip import losses
    from prodclip.data import pipeline
    from prodclip.evaluate import rerank as rerank_lib

    itm_fn = inference.fusion_itm_fn(graphdef, params, batch_size=max(1, config.eval.rerank_k), log_odds=True)
    itc_scale = losses.trained_logit_scale(params, config.model.logit_scale_max)
    catalog_source = []  # the store's catalog, opened on the first text query and kept

    def rerank(query: dict, hits: list[dict]) -> list[dict]:
        if not hits:
            return hits
        n = len(hits)
        if "text" in query:
            if not catalog_source:
                catalog_source.append(open_store_catalog(store))
            images = store_images(store, [h["index"] for h in hits], catalog_source[0])
            if any(image is None for image in images):
                log.warning("fusion re-ranking skipped: the store's catalog images are unavailable")
                return hits
            images = np.stack([pipeline.fit_to_square(image, config.data.image_size, config.data.resize)
                               for image in images])
            token_ids = np.repeat(tokenizer([query["text"]]), n, axis=0)
        else:
            images = np.repeat(np.asarray(query["image"])[None], n, axis=0)
            token_ids = tokenizer([str(h["title"]) for h in hits])
        scores = rerank_lib.rerank_scores(itm_fn(images, token_ids).astype(np.float64),
                                          np.asarray([h.get("cosine", h["score"]) for h in hits]),
                                          mode=config.eval.rerank_mode,
                                          itc_scale=itc_scale, itc_weight=config.eval.rerank_itc_weight)
        order = np.lexsort((np.arange(n), -scores))
        return [{**hits[i], "rank": r + 1, "score": float(scores[i]), "two_tower_rank": hits[i]["rank"],
                 "two_tower_score": hits[i]["score"]} for r, i in enumerate(order)]

    return rerank


# ----------------------------------------------------------------------------- showing results


def open_store_catalog(store: Store):
    """The catalog split the store was embedded from (re-opened from its catalog pointer), or None
    with a warning when it cannot be re-opened (moved, deleted)."""
    from prodclip import config as config_lib, config_loading
    from prodclip.data import sources

    pointer = store.header["catalog"]
    config = config_lib.base_config()
    try:
        for key, value in pointer["data"].items():
            config_loading.set_field(config, f"data.{key}", value)
        return sources.make_source(config, pointer["split"])
    except Exception as e:  # a moved or deleted catalog must not stop the ranked list from printing
        log.warning("cannot re-open the store's catalog (%s); showing results without images", e)
        return None


def store_images(store: Store, indices: Sequence[int], source=None) -> list[np.ndarray | None]:
    """The catalog images of store rows; None where unavailable.

    source: the store's catalog if already open (`open_store_catalog`); re-opened when None.
    """
    source = source if source is not None else open_store_catalog(store)
    if source is None:
        return [None] * len(indices)
    images = []
    for i in indices:
        try:
            images.append(np.asarray(source[int(i)]["image"]))
        except Exception as e:
            log.warning("store row %d: image unavailable (%s)", i, e)
            images.append(None)
    return images


def write_html(hits: list[dict], images: list[np.ndarray | None], path: str | pathlib.Path, query: str) -> None:
    """A self-contained HTML grid: each hit's image (inline PNG), rank, score and title."""
    cells = []
    for hit, image in zip(hits, images):
        img = (f'<img src="data:image/png;base64,{base64.b64encode(png_bytes(image)).decode()}" width="128">'
               if image is not None else '<div class="missing">no image</div>')
        cells.append(f'<figure>{img}<figcaption>#{hit["rank"]} &middot; {hit["score"]:.3f}<br>'
                     f'{html.escape(str(hit["title"]))}<br><small>id {html.escape(str(hit["id"]))}</small>'
                     "</figcaption></figure>")
    page = ("<!doctype html><meta charset='utf-8'><title>prodclip search</title><style>"
            "body{font-family:sans-serif}.grid{display:flex;flex-wrap:wrap;gap:12px}"
            "figure{width:160px;margin:0}figcaption{font-size:12px}"
            ".missing{width:128px;height:128px;background:#ddd}</style>"
            f"<h3>{html.escape(query)}</h3><div class='grid'>{''.join(cells)}</div>\n")
    pathlib.Path(path).write_text(page, encoding="utf-8")


def write_png(hits: list[dict], images: list[np.ndarray | None], path: str | pathlib.Path, query: str) -> None:
    """A matplotlib grid of the hits' images with rank, score and title."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, max(1, len(hits)))
    rows = -(-len(hits) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, hit, image in zip(axes.flat, hits, images):
        if image is not None:
            ax.imshow(image)
        caption = f"#{hit['rank']}  {hit['score']:.3f}\n" + textwrap.fill(str(hit["title"]), 28)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(query, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
