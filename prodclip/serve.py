"""A search server: JSON endpoints and one web page over an embedding store.

    prodclip serve --workdir RUN --store STORE [--host 127.0.0.1 --port 8000] [--audit REPORT_DIR]

The model, tokenizer and store load once at startup (`load_service`), and the
jitted encoders are compiled then by one warm-up query of each kind, so the first
request is as fast as the others. A store embedded by another model is refused at
startup (StoreError, exit 2).

Endpoints (all JSON except the page and the images):

    GET  /                         the search page (search box, photo upload, result grid)
    GET  /api/health               {"status": "ok", "items", "model", "search", "fusion", "audit"}
    GET  /api/search?q=..&k=10&rerank=false
    POST /api/search               {"q": "...", "k": 10, "rerank": false}
    POST /api/search/image         multipart: file=<image>, k, rerank
    GET  /api/items/{index}/image.png   a store item's catalog image as PNG
    GET  /audit                    the catalog audit report (audit.html), when one was found

A search answers {"query", "k", "rerank", "search", "took_ms", "hits": [{"rank", "index",
"id", "title", "score", "thumbnail"}]}, best first; scores are cosines, for text queries on a store
with querybank densities the normalised scores (each hit then also keeps its "cosine"; "search" says
so), or the fusion head's scores when re-ranked (then each hit also keeps
"two_tower_rank"/"two_tower_score").

A bad request gets a 4xx and {"error": "<one line>"}, and the server carries on: an
empty query or one of only unknown tokens (400), k <= 0 or larger than the store or
MAX_K (400), an upload that is not a decodable image (415) or is larger than
max_upload_bytes (413), re-ranking asked of a model without a fusion head (400), an
unknown item (404).

Concurrency: uvicorn runs the endpoints in a thread pool; one lock serialises the
model and the search (the CPU has few cores, so queueing is as fast as interleaving
and keeps memory flat), while parsing, validation and JSON encoding run outside it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import pathlib
import threading
import time
from typing import Callable

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from prodclip import errors, search
from prodclip.evaluate import store as store_lib
from prodclip.models import inference
from prodclip.serve_page import PAGE

log = logging.getLogger("prodclip")

MAX_K = 1000
# The exact scan compiles once per k, so a request's k is rounded up to one of these and the
# hits cut back: a handful of compilations at warm-up instead of one per new k under load.
K_BUCKETS = (16, 64, 256, 1024)
MAX_UPLOAD_BYTES = 8 * 2 ** 20
# Text queries waiting while the model is busy are answered together, up to this many per batch:
# one padded encoder call and one scan of the store for all of them.
MAX_TEXT_BATCH = 16
THUMBNAIL_CACHE = 256  # PNGs kept in memory (a few MB at catalog image sizes)

# (query embeddings [Q, D] float32, k) -> per query, the top-k hits
# [{"rank", "index", "id", "title", "score"}], best first.
Searcher = Callable[..., list[list[dict]]]  # (query_emb [Q, D], k, *, text: bool) -> hits per query


@dataclasses.dataclass
class _TextRequest:
    """A text query waiting for a batch: filled with `hits` or `error`, then `done` is set."""

    text: str
    fetch: int
    rerank: bool
    hits: list[dict] | None = None
    error: Exception | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class RequestError(errors.QueryError):
    """A request the server refuses; `status` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def make_searcher(store: store_lib.Store, config) -> tuple[Searcher, str]:
    """How the server searches `store`, and a name for it: the store's FAISS index when it has
    one (`prodclip index`; opened and checked against the store here, at startup), else the exact
    scan. Text queries use the store's querybank densities when it has them (search.search).
    Raises StoreError for an index that does not fit the store."""
    index = search.store_index(store)

    def searcher(query_emb: np.ndarray, k: int, *, text: bool = False) -> list[list[dict]]:
        return search.search(store, query_emb, k, chunk_size=config.embed.chunk_size, index=index,
                             densities=store.densities if text else None)

    kind = "exact scan" if index is None else f"faiss {index.kind}"
    if store.densities is not None:
        kind += f", querybank k={store_lib.querybank_record(store.path)['k']} for text"
    return searcher, kind


def find_audit_report(store_dir: pathlib.Path, audit_dir: str | pathlib.Path | None) -> pathlib.Path | None:
    """The audit.html to link: in --audit DIR (must exist), else beside the store ("audit/" next to it)."""
    if audit_dir is not None:
        report = pathlib.Path(audit_dir) / "audit.html"
        if not report.is_file():
            raise errors.DataError(f"--audit {audit_dir}: no audit.html there; make one with `prodclip audit "
                                   "--out DIR` or leave --audit out")
        return report
    for candidate in (store_dir / "audit" / "audit.html", store_dir.parent / "audit" / "audit.html"):
        if candidate.is_file():
            return candidate
    return None


@dataclasses.dataclass
class SearchService:
    """A loaded model and store, answering queries; safe to call from many threads."""

    graphdef: object
    params: object
    tokenizer: object
    config: object
    store: store_lib.Store
    searcher: Searcher
    search_kind: str = "exact scan"
    audit_report: pathlib.Path | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES

    def __post_init__(self):
        self.lock = threading.Lock()  # held while the model, the search or the catalog runs
        self._pending: list[_TextRequest] = []
        self._pending_lock = threading.Lock()
        self.fingerprint = self.store.header["fingerprint"]
        fusion = self.config.model.fusion.enabled
        self.reranker = (search.fusion_reranker(self.graphdef, self.params, self.tokenizer, self.store, self.config)
                         if fusion else None)
        self.catalog = search.open_store_catalog(self.store)
        hf = self.tokenizer.hf
        self._unknown_id = hf.unk_token_id
        self._special_ids = set(hf.all_special_ids) - {self._unknown_id}
        self.thumbnail_png = functools.lru_cache(maxsize=THUMBNAIL_CACHE)(self._thumbnail_png)

    # --------------------------------------------------------------- checks (no model, no lock)

    def check_k(self, k) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise RequestError(f"k must be an integer, got {k!r}") from None
        limit = min(len(self.store), MAX_K)
        if k < 1 or k > limit:
            raise RequestError(f"k must be between 1 and {limit} (the store has {len(self.store)} items, "
                               f"at most {MAX_K} per request), got {k}")
        return k

    def check_rerank(self, rerank: bool) -> bool:
        if rerank and self.reranker is None:
            raise RequestError("rerank needs a model with a fusion head (model.fusion.enabled); this one has none")
        return bool(rerank)

    def check_text(self, text) -> str:
        if not isinstance(text, str) or not text.strip():
            raise RequestError("empty query: type some words, e.g. 'navy striped shirt'")
        return text.strip()

    def check_vocabulary(self, text: str) -> None:
        """Refuses a query of unknown tokens only. Call with the lock held: a fast tokenizer's
        truncation settings are shared state that a concurrent call would change."""
        ids = self.tokenizer.hf(text.lower() if self.tokenizer.lowercase else text)["input_ids"]
        content = [i for i in ids if i not in self._special_ids]
        if not content or all(i == self._unknown_id for i in content):
            raise RequestError(f"query {text[:80]!r} has no word the model's vocabulary knows; "
                               "try other words")

    def check_image(self, data: bytes) -> np.ndarray:
        if len(data) > self.max_upload_bytes:
            raise RequestError(f"upload is larger than {self.max_upload_bytes} bytes", status=413)
        try:
            return search.decode_query_image(data, self.config, label="upload")
        except search.SearchError as e:
            reason = getattr(e.__cause__, "reason", "corrupt_image")
            raise RequestError(f"the upload is not an image this server can read ({reason}); "
                               "send a JPEG, PNG or WebP photo", status=415) from None

    # --------------------------------------------------------------- queries

    def text_search(self, text, k, rerank: bool = False) -> dict:
        """A text query. Queries that arrive while the model is busy wait in a queue; whichever
        request gets the lock next answers up to MAX_TEXT_BATCH of them in one batch."""
        text, k, rerank = self.check_text(text), self.check_k(k), self.check_rerank(rerank)
        start = time.perf_counter()
        request = _TextRequest(text, max(k, self.config.eval.rerank_k) if rerank else k, rerank)
        with self._pending_lock:
            self._pending.append(request)
        while not request.done.is_set():
            with self.lock:
                if request.done.is_set():
                    break
                with self._pending_lock:
                    batch = self._pending[:MAX_TEXT_BATCH]
                    del self._pending[:MAX_TEXT_BATCH]
                self._answer_texts(batch)
        if request.error is not None:
            raise request.error
        return self._response(text, k, rerank, request.hits, start)

    def _answer_texts(self, batch: list[_TextRequest]) -> None:
        """Answers a batch of text requests (lock held): one encoder call, one search."""
        try:
            valid = []
            for request in batch:
                try:
                    self.check_vocabulary(request.text)
                    valid.append(request)
                except RequestError as e:
                    request.error = e
            if valid:
                encode = inference.title_encoder(self.graphdef, self.params, self.tokenizer, batch_size=MAX_TEXT_BATCH)
                query_emb = encode([r.text for r in valid])
                # A fixed query count: the exact scan compiles once per (queries, k), not per batch size.
                query_emb = np.concatenate([query_emb, np.repeat(query_emb[-1:], MAX_TEXT_BATCH - len(valid), 0)])
                hits = self.searcher(query_emb, self.k_bucket(max(r.fetch for r in valid)), text=True)
                for request, found in zip(valid, hits):
                    found = found[:request.fetch]
                    request.hits = self.reranker({"text": request.text}, found) if request.rerank else found
        except Exception as e:  # the waiting requests must not hang: each gets the error
            for request in batch:
                if request.hits is None and request.error is None:
                    request.error = e
        finally:
            for request in batch:
                request.done.set()

    def image_search(self, data: bytes, k, rerank: bool = False) -> dict:
        k, rerank = self.check_k(k), self.check_rerank(rerank)
        image = self.check_image(data)
        return self._run({"image": image}, k, rerank, lambda: search.encode_image_queries(
            self.graphdef, self.params, image[None], self.config), label="image upload")

    def _run(self, query: dict, k: int, rerank: bool, encode, label: str) -> dict:
        start = time.perf_counter()
        fetch = max(k, self.config.eval.rerank_k) if rerank else k
        with self.lock:
            query_emb = encode()
            hits = self.searcher(query_emb, self.k_bucket(fetch))[0][:fetch]
            if rerank:
                hits = self.reranker(query, hits)
        return self._response(label, k, rerank, hits, start)

    def _response(self, label: str, k: int, rerank: bool, hits: list[dict], start: float) -> dict:
        hits = hits[:k]
        for hit in hits:
            hit["thumbnail"] = f"/api/items/{hit['index']}/image.png"
        return {"query": label, "k": k, "rerank": rerank, "search": self.search_kind,
                "took_ms": round(1000 * (time.perf_counter() - start), 3), "hits": hits}

    def k_bucket(self, k: int) -> int:
        """The k the searcher is asked for: k rounded up to a K_BUCKETS entry, at most the store size."""
        return min(next((b for b in K_BUCKETS if b >= k), k), len(self.store))

    def warm_up(self) -> None:
        """Compiles the encoders, the search for every k bucket, and the fusion head."""
        size = self.config.data.image_size
        probe = self.store.titles[0]
        blank = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (size, size), (255, 255, 255)).save(blank, format="PNG")
        for rerank in ([False, True] if self.reranker is not None else [False]):
            try:
                self.text_search(probe, 1, rerank)
            except RequestError:  # a title of unknown words only: the text tower compiles anyway
                pass
            self.image_search(blank.getvalue(), 1, rerank)
        query_emb = search.encode_text_queries(self.graphdef, self.params, self.tokenizer, [probe])
        for k in sorted({self.k_bucket(k) for k in (*K_BUCKETS, MAX_K)}):
            self.searcher(query_emb, k)  # image queries
            self.searcher(np.repeat(query_emb, MAX_TEXT_BATCH, axis=0), k, text=True)  # text batches

    def _thumbnail_png(self, index: int) -> bytes | None:
        if self.catalog is None:
            return None
        with self.lock:  # sources are not promised to be thread-safe
            image = search.store_images(self.store, [index], self.catalog)[0]
        if image is None:
            return None
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    def health(self) -> dict:
        return {"status": "ok", "items": len(self.store), "model": self.fingerprint, "search": self.search_kind,
                "fusion": self.reranker is not None, "audit": self.audit_report is not None}


def load_service(config, workdir: str | pathlib.Path, store_dir: str | pathlib.Path, *,
                 audit_dir: str | pathlib.Path | None = None, warm_up: bool = True) -> SearchService:
    """Loads the run and the store once, refuses a store from another model (StoreError), warms up."""
    from prodclip import run as run_lib

    store = store_lib.open_store(store_dir)
    audit_report = find_audit_report(store.path, audit_dir)
    run = run_lib.load_run(workdir, config)
    graphdef, params, tokenizer = run.graphdef, run.params, run.tokenizer
    store_lib.check_fingerprint(store, store_lib.model_fingerprint(params, tokenizer, config))
    searcher, kind = make_searcher(store, config)
    service = SearchService(graphdef, params, tokenizer, config, store, searcher, kind, audit_report)
    if warm_up:
        start = time.perf_counter()
        service.warm_up()
        log.info("serve: %d items, model %s, search %s, warmed up in %.1f s", len(store), service.fingerprint,
                 kind, time.perf_counter() - start)
    return service


class TextQuery(BaseModel):
    """The body of POST /api/search."""

    q: str = ""
    k: int = 10
    rerank: bool = False


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app over a loaded service."""
    app = FastAPI(title="prodclip search", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException):
        return error(e.status_code, e.detail)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # Refused before the multipart parser reads the body, not after.
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.max_upload_bytes + 65536:
            return error(413, f"request body of {length} bytes is larger than the "
                              f"{service.max_upload_bytes}-byte upload limit")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page():
        audit_link = '<a href="/audit">catalog audit report</a>' if service.audit_report else ""
        return PAGE.replace("{{AUDIT_LINK}}", audit_link).replace("{{ITEMS}}", str(len(service.store))).replace(
            "{{DEFAULT_K}}", str(min(12, len(service.store))))

    @app.get("/api/health")
    def health():
        return service.health()

    @app.get("/api/search")
    def search_get(q: str = "", k: int = 10, rerank: bool = False):
        return service.text_search(q, k, rerank)

    @app.post("/api/search")
    def search_post(body: TextQuery):
        return service.text_search(body.q, body.k, body.rerank)

    @app.post("/api/search/image")
    def search_image(file: UploadFile = File(...), k: int = Form(10), rerank: bool = Form(False)):
        data = file.file.read(service.max_upload_bytes + 1)
        return service.image_search(data, k, rerank)

    @app.get("/api/items/{index}/image.png")
    def item_image(index: int):
        if not 0 <= index < len(service.store):
            return error(404, f"no item {index}: the store has items 0..{len(service.store) - 1}")
        png = service.thumbnail_png(index)
        if png is None:
            return error(404, f"item {index}: its catalog image is unavailable")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/audit")
    def audit():
        if service.audit_report is None:
            return error(404, "no catalog audit report: start the server with --audit REPORT_DIR")
        return FileResponse(service.audit_report, media_type="text/html")

    return app


def check_address(host: str, port: int) -> None:
    """Raises ConfigError when (host, port) cannot be listened on (in use, no permission, bad host),
    before minutes are spent loading a model."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise errors.ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                                 "choose another --port or --host") from None


def serve(service: SearchService, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Runs the app with uvicorn until interrupted."""
    import uvicorn

    log.info("serve: http://%s:%d/", host, port)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
