"""The search server: every endpoint and bad request through FastAPI's TestClient, concurrent clients,
a store from another model refused at startup, and the page in headless Chromium against a real server."""

import concurrent.futures
import io
import json
import os
import pathlib
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from fastapi import testclient as fastapi_testclient
from PIL import Image

from prodclip import cli, errors, search, serve
from prodclip import config_loading
from prodclip.data import synthetic
from test_search import TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]
K = 5


@pytest.fixture(scope="module")
def run_and_store(tmp_path_factory):
    """A tiny trained run and its 256-item train store: (workdir, store dir, config)."""
    base = tmp_path_factory.mktemp("serve")
    workdir, store_dir = base / "run", base / "store"
    assert cli.main(["train", "--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(workdir),
                     *TINY]) == 0
    assert cli.main(["embed", "--workdir", str(workdir), "--out", str(store_dir), "--split", "train",
                     "--config.embed.shard_size=100"]) == 0
    config = config_loading.load(workdir)
    return workdir, store_dir, config


@pytest.fixture(scope="module")
def service(run_and_store):
    workdir, store_dir, config = run_and_store
    return serve.load_service(config, workdir, store_dir)


@pytest.fixture(scope="module")
def client(service):
    return fastapi_testclient.TestClient(serve.create_app(service))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_hits(service, text: str, k: int) -> list[dict]:
    emb = search.encode_text_queries(service.graphdef, service.params, service.tokenizer, [text])
    return search.search(service.store, emb, k)[0]


def _same_hits(got: list[dict], want: list[dict]) -> None:
    assert [h["index"] for h in got] == [h["index"] for h in want]
    assert [h["rank"] for h in got] == list(range(1, len(want) + 1))
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-6)


def test_health_and_page(client, service):
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "items": 256, "model": service.store.header["fingerprint"],
                      "search": service.search_kind, "fusion": False, "audit": False}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="query"', 'id="photo"', 'id="grid"', "256 items"):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    assert "/audit" not in page.text


def test_text_search_matches_direct_search(client, service):
    title = service.store.titles[7]
    want = _reference_hits(service, title, K)
    got_get = client.get("/api/search", params={"q": title, "k": K}).json()
    got_post = client.post("/api/search", json={"q": title, "k": K}).json()
    for got in (got_get, got_post):
        assert got["k"] == K and got["rerank"] is False and got["query"] == title
        _same_hits(got["hits"], want)
        assert all(h["title"] == service.store.titles[h["index"]] and h["id"] == service.store.ids[h["index"]]
                   for h in got["hits"])
        assert got["hits"][0]["thumbnail"] == f"/api/items/{got['hits'][0]['index']}/image.png"
    assert title in [h["title"] for h in got_get["hits"]]


def test_item_image_is_the_catalog_image(client, service):
    want = search.store_images(service.store, [7])[0]
    response = client.get("/api/items/7/image.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content))), want)
    for index in (-1, 256):
        response = client.get(f"/api/items/{index}/image.png")
        assert response.status_code == 404 and "no item" in response.json()["error"]


def test_image_upload_finds_its_item(client, service):
    photo = _png(search.store_images(service.store, [7])[0])
    got = client.post("/api/search/image", files={"file": ("q.png", photo, "image/png")}, data={"k": K}).json()
    want = search.search(service.store, search.encode_image_queries(
        service.graphdef, service.params, search.decode_query_image(photo, service.config)[None], service.config), K)[0]
    _same_hits(got["hits"], want)
    assert 7 in [h["index"] for h in got["hits"]]


def test_rerank_reorders_through_the_reranker(client, service):
    # This run has no fusion head: asking for a re-rank is a clear 400 ...
    response = client.get("/api/search", params={"q": service.store.titles[3], "k": K, "rerank": "true"})
    assert response.status_code == 400 and "fusion" in response.json()["error"]
    # ... and with one, the server passes the top hits through it and keeps the first k.
    reverse = lambda query, hits: [{**h, "rank": r + 1} for r, h in enumerate(hits[::-1])]  # noqa: E731
    service.reranker = reverse
    try:
        got = client.post("/api/search", json={"q": service.store.titles[3], "k": 2, "rerank": True}).json()
    finally:
        service.reranker = None
    fetched = _reference_hits(service, service.store.titles[3], max(2, service.config.eval.rerank_k))
    assert got["rerank"] is True
    assert [h["index"] for h in got["hits"]] == [h["index"] for h in fetched[::-1][:2]]


BAD_REQUESTS = [
    ("empty GET query", "get", "/api/search", {"params": {"q": "", "k": 3}}, 400, "empty query"),
    ("blank POST query", "post", "/api/search", {"json": {"q": "   ", "k": 3}}, 400, "empty query"),
    ("unknown tokens", "get", "/api/search", {"params": {"q": "\u2603\u2603 \u2603", "k": 3}}, 400, "vocabulary"),
    ("k = 0", "get", "/api/search", {"params": {"q": "shirt", "k": 0}}, 400, "k must be between 1 and 256"),
    ("k < 0", "post", "/api/search", {"json": {"q": "shirt", "k": -4}}, 400, "k must be between"),
    ("k > store", "get", "/api/search", {"params": {"q": "shirt", "k": 257}}, 400, "the store has 256 items"),
    ("k not a number", "get", "/api/search", {"params": {"q": "shirt", "k": "ten"}}, 422, "k:"),
    ("body not JSON", "post", "/api/search", {"content": b"{nope", "headers": {"Content-Type": "application/json"}},
     422, ""),
    ("not an image", "post", "/api/search/image", {"files": {"file": ("a.txt", b"hello, not a photo", "text/plain")}},
     415, "not an image this server can read"),
    ("empty upload", "post", "/api/search/image", {"files": {"file": ("a.png", b"", "image/png")}}, 415,
     "not an image this server can read"),
    ("oversized upload", "post", "/api/search/image",
     {"files": {"file": ("big.png", b"\0" * (serve.MAX_UPLOAD_BYTES + 2 ** 17), "image/png")}}, 413, "larger than"),
    ("no file", "post", "/api/search/image", {"data": {"k": 3}}, 422, "file"),
    ("image k = 0", "post", "/api/search/image", {"files": {"file": ("a.txt", b"x", "text/plain")}, "data": {"k": 0}},
     400, "k must be"),
]


@pytest.mark.parametrize("name,method,url,kwargs,status,reason", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_a_4xx_with_one_line(client, service, name, method, url, kwargs, status, reason):
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert reason in message and "\n" not in message and "Traceback" not in message
    # The server still answers.
    assert client.get("/api/search", params={"q": service.store.titles[0], "k": 1}).status_code == 200


def test_upload_limit_is_checked_after_reading_too(service):
    # A client that sends no Content-Length still meets the limit when the endpoint reads the file.
    with pytest.raises(serve.RequestError, match="larger than") as caught:
        service.check_image(b"\0" * (service.max_upload_bytes + 1))
    assert caught.value.status == 413


def test_concurrent_clients_get_the_serial_answers(client, service):
    titles = [service.store.titles[i] for i in range(0, 256, 16)]  # 16 distinct queries
    serial = {t: [h["index"] for h in _reference_hits(service, t, K)] for t in titles}
    photo = _png(search.store_images(service.store, [11])[0])

    def one(i: int):
        if i % 8 == 5:  # a bad query inside a batch fails alone
            r = client.post("/api/search", json={"q": "\u2603 \u2603", "k": K})
            return "bad", r.status_code, r.json()["error"]
        if i % 4 == 3:
            r = client.post("/api/search/image", files={"file": ("q.png", photo, "image/png")}, data={"k": K})
            return "photo", r.status_code, [h["index"] for h in r.json()["hits"]]
        t = titles[i % len(titles)]
        r = client.post("/api/search", json={"q": t, "k": K})
        return t, r.status_code, [h["index"] for h in r.json()["hits"]]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(64)))
    photo_hits = {tuple(hits) for query, _, hits in results if query == "photo"}
    assert all(status == 400 and "vocabulary" in hits for q, status, hits in results if q == "bad")
    assert all(status == 200 for q, status, _ in results if q != "bad")
    assert all(hits == serial[q] for q, _, hits in results if q not in ("photo", "bad"))
    assert len(photo_hits) == 1 and 11 in next(iter(photo_hits))


def test_store_from_another_model_is_refused_at_startup(run_and_store, tmp_path, capsys):
    workdir, store_dir, config = run_and_store
    other = tmp_path / "other_store"
    shutil.copytree(store_dir, other)
    header = json.loads((other / "store.json").read_text())
    header["fingerprint"] = "0123456789abcdef"
    (other / "store.json").write_text(json.dumps(header))
    with pytest.raises(errors.StoreError, match="embedded by model 0123456789abcdef"):
        serve.load_service(config, workdir, other, warm_up=False)
    capsys.readouterr()
    assert cli.main(["serve", "--workdir", str(workdir), "--store", str(other), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prodclip: store error: ") and "embedded by model" in err
    assert "\n" not in err and "Traceback" not in err
    assert cli.main(["serve", "--workdir", str(workdir), "--store", str(tmp_path / "nowhere"),
                     "--port", str(_free_port())]) == 2
    assert "no embedding store" in capsys.readouterr().err
    with socket.socket() as busy:  # a port in use: refused before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main(["serve", "--workdir", str(workdir), "--store", str(store_dir),
                         "--port", str(busy.getsockname()[1])]) == 2
    assert "prodclip: config error: cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_audit_report_is_linked_when_present(run_and_store, tmp_path):
    workdir, store_dir, config = run_and_store
    assert serve.find_audit_report(store_dir, None) is None
    with pytest.raises(errors.DataError, match="no audit.html"):
        serve.find_audit_report(store_dir, tmp_path)
    (tmp_path / "audit.html").write_text("<h1>audit of the catalog</h1>")
    report = serve.find_audit_report(store_dir, tmp_path)
    assert report == tmp_path / "audit.html"
    beside = tmp_path / "copy"
    shutil.copytree(store_dir, beside / "store")
    (beside / "audit").mkdir()
    shutil.copy(report, beside / "audit" / "audit.html")
    assert serve.find_audit_report(beside / "store", None) == beside / "audit" / "audit.html"

    service = serve.load_service(config, workdir, store_dir, audit_dir=tmp_path, warm_up=False)
    client = fastapi_testclient.TestClient(serve.create_app(service))
    assert 'href="/audit"' in client.get("/").text
    assert "audit of the catalog" in client.get("/audit").text
    assert client.get("/api/health").json()["audit"] is True


# ----------------------------------------------------------------------------- the page in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ServerThread:
    """uvicorn on 127.0.0.1 in a thread; stops when the block ends."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start in 30 s"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _chromium_driver():
    """Headless Chromium through selenium; fails (or skips, with PRODCLIP_SKIP_BROWSER=1) when absent."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        message = ("the browser test needs Debian's chromium and chromium-driver (`make test` installs them with "
                   "apt-get; or set PRODCLIP_SKIP_BROWSER=1 to skip it)")
        if os.environ.get("PRODCLIP_SKIP_BROWSER") == "1":
            pytest.skip(message)
        pytest.fail(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def test_page_in_headless_chromium(service, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # The page is under test, not the tiny model: the query is the first catalog title whose
    # reference top hit (search.search, not the server) is of the query's product type, and the
    # page must show exactly the reference hits, in order.
    def words(i):
        return synthetic.CATEGORY_SYNONYMS[synthetic.CATEGORIES[service.catalog[i]["category"]]]

    index = next(i for i in range(len(service.store))
                 if any(w in service.store.titles[_reference_hits(service, service.store.titles[i], 1)[0]["index"]]
                        .lower() for w in words(i)))
    query, product_words = service.catalog[index]["title"], words(index)
    assert any(word in query.lower() for word in product_words)
    want = [h["title"] for h in _reference_hits(service, query, min(12, len(service.store)))]
    driver = _chromium_driver()
    try:
        with _ServerThread(serve.create_app(service)) as url:
            driver.get(url + "/")
            box = driver.find_element(By.ID, "query")
            box.clear()
            box.send_keys(query)
            driver.find_element(By.ID, "search-button").click()
            WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR,
                                                                                             "#grid .hit")))
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return [...document.images].every(img => img.complete && img.naturalWidth > 0)"))
            titles = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#grid .hit .title")]
            assert titles == want
            assert any(word in titles[0].lower() for word in product_words), (query, titles[0])
            assert "results for" in driver.find_element(By.ID, "status").text
            driver.save_screenshot(str(tmp_path / "serve_page.png"))
            if os.environ.get("PRODCLIP_SCREENSHOT"):
                shutil.copy(tmp_path / "serve_page.png", os.environ["PRODCLIP_SCREENSHOT"])

            # A bad query shows the server's reason on the page, and the page keeps working.
            box.clear()
            box.send_keys("\u2603")
            driver.find_element(By.ID, "search-button").click()
            WebDriverWait(driver, 30).until(lambda d: "vocabulary" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()
    assert (tmp_path / "serve_page.png").stat().st_size > 5000


def test_serves_through_the_store_index(run_and_store, service, tmp_path):
    from prodclip import index as index_lib

    workdir, store_dir, config = run_and_store
    indexed = tmp_path / "indexed_store"
    shutil.copytree(store_dir, indexed)
    index_lib.build_index(indexed, "flat")
    with_index = serve.load_service(config, workdir, indexed, warm_up=False)
    assert with_index.search_kind == "faiss flat"
    client = fastapi_testclient.TestClient(serve.create_app(with_index))
    for i in (3, 40, 200):
        title = service.store.titles[i]
        got = client.get("/api/search", params={"q": title, "k": K}).json()
        assert got["search"] == "faiss flat"
        _same_hits(got["hits"], _reference_hits(service, title, K))


def test_text_queries_use_the_store_querybank_and_image_queries_do_not(run_and_store, service, tmp_path):
    from prodclip.evaluate import store as store_lib

    workdir, store_dir, config = run_and_store
    banked = tmp_path / "banked_store"
    shutil.copytree(store_dir, banked)
    # Densities that reverse the plain order of a query's hits make the difference visible.
    densities = np.linspace(0.0, 1.5, len(service.store), dtype=np.float32)
    store_lib.write_querybank(banked, densities, k=3, bank_sha256="0" * 64, bank_titles=10)
    with_bank = serve.load_service(config, workdir, banked, warm_up=False)
    client = fastapi_testclient.TestClient(serve.create_app(with_bank))
    title = service.store.titles[40]
    emb = search.encode_text_queries(service.graphdef, service.params, service.tokenizer, [title])
    want = search.search(with_bank.store, emb, K, densities=densities)[0]
    got = client.get("/api/search", params={"q": title, "k": K}).json()["hits"]
    _same_hits(got, want)
    assert [h["index"] for h in want] != [h["index"] for h in _reference_hits(service, title, K)]
    photo = _png(search.store_images(service.store, [7])[0])
    upload = client.post("/api/search/image", files={"file": ("q.png", photo, "image/png")}, data={"k": K}).json()
    plain = search.search(service.store, search.encode_image_queries(
        service.graphdef, service.params, search.decode_query_image(photo, service.config)[None], service.config), K)[0]
    _same_hits(upload["hits"], plain)
