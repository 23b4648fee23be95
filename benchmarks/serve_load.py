"""Load test of `prodclip serve` on loopback: concurrent clients against a large store, then every bad request.

    python benchmarks/serve_load.py --workdir RUN [--items 100000 --clients 16 --seconds 60] [--out load.json]

1. Store: the run embeds its own train split (a few hundred real embeddings), and the
   benchmark writes a store of --items rows around them: row i = normalise(base[i % B] +
   noise * g_i), g_i ~ N(0, I/D). Every row is a near-copy of a real product embedding, so the
   store keeps real embeddings' neighbourhood structure (tight clusters of --items/B rows
   around each product) at catalog size. Titles repeat the base titles; the store carries the
   run's fingerprint, so the server accepts it. Only the first B rows have catalog images.
2. Server: `prodclip serve` as a subprocess on 127.0.0.1 at a free port (after `--index KIND`
   built a FAISS index in the store, when given); the benchmark waits for /api/health.
3. Load: --clients threads, each with its own HTTP connection, send queries back to back for
   --seconds (and at most --max-requests in all): text queries drawn from the titles (a
   base title, or its first three words), one in --photo-every a photo upload of a catalog
   image, k drawn from {5, 10, 20}. Reported: p50/p90/p99/max latency (client-side, request
   sent to body read), requests/s, errors (non-200 or no answer).
4. Bad requests: each must get its 4xx with a one-line JSON reason, then health and a good
   query must still answer. A store from another model must stop `prodclip serve` at startup
   with exit code 2 and one line.

The clients run in this process and share the CPU with the server: on a 2-core machine the
numbers are the server's under full load of the box, not an isolated server's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_UPLOAD_BYTES = 8 * 2 ** 20


def build_store(workdir: pathlib.Path, out: pathlib.Path, items: int, noise: float, seed: int) -> dict:
    """Writes the --items store described in the module docstring into `out`; returns its header."""
    from prodclip import config_loading
    from prodclip import run as run_lib
    from prodclip import search
    from prodclip.evaluate import store as store_lib

    config = config_loading.load(workdir)
    run = run_lib.load_run(workdir, config, ["train"])
    graphdef, params, tokenizer, sources = run.graphdef, run.params, run.tokenizer, run.sources
    base_dir = out.parent / "base_store"
    store_lib.embed_catalog(graphdef, params, sources["train"], tokenizer, config, base_dir, split="train",
                            workdir=workdir, progress=False)
    base = store_lib.open_store(base_dir)
    base_rows = np.concatenate([np.asarray(s) for s in base.shards])
    num_base, dim = base_rows.shape
    rng = np.random.default_rng(seed)
    shard_size = 50_000
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, items, shard_size)):
        rows = base_rows[np.arange(start, min(start + shard_size, items)) % num_base].astype(np.float64)
        rows += noise * rng.standard_normal(rows.shape) / np.sqrt(dim)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        np.save(out / "shards" / f"emb_{index:05d}.npy", rows.astype(np.float32))
    with open(out / store_lib.ITEMS, "w") as f:
        for i in range(items):
            f.write(json.dumps({"id": i, "title": base.titles[i % num_base]}) + "\n")
    header = {**base.header, "num_items": items, "shard_size": shard_size, "dim": dim,
              "synthetic": f"{num_base} embeddings of the run's train split + noise {noise}, seed {seed}"}
    (out / store_lib.HEADER).write_text(json.dumps(header, indent=2))
    images = search.store_images(base, list(range(min(num_base, 32))))
    return {"header": header, "titles": base.titles, "images": [im for im in images if im is not None]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: pathlib.Path, store: pathlib.Path, port: int, log_path: pathlib.Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "prodclip.cli", "serve", "--workdir", str(workdir),
                             "--store", str(store), "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base_url: str, proc, timeout_s: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering")
        try:
            return httpx.get(base_url + "/api/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /api/health in {timeout_s} s")


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def load(base_url: str, titles: list[str], photos: list[bytes], *, clients: int, seconds: float,
         max_requests: int, photo_every: int, seed: int) -> dict:
    """Runs the clients; returns latencies (ms), counts and errors."""
    import httpx

    deadline = time.monotonic() + seconds
    budget = threading.Semaphore(max_requests)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    kinds = [{"text": 0, "photo": 0} for _ in range(clients)]

    def client(c: int) -> None:
        rng = np.random.default_rng([seed, c])
        with httpx.Client(base_url=base_url, timeout=30) as http:
            n = 0
            while time.monotonic() < deadline and budget.acquire(blocking=False):
                n += 1
                k = int(rng.choice([5, 10, 20]))
                start = time.perf_counter()
                try:
                    if photos and n % photo_every == 0:
                        kinds[c]["photo"] += 1
                        photo = photos[int(rng.integers(len(photos)))]
                        r = http.post("/api/search/image", files={"file": ("q.png", photo, "image/png")},
                                      data={"k": str(k)})
                    else:
                        kinds[c]["text"] += 1
                        title = titles[int(rng.integers(len(titles)))]
                        q = title if rng.random() < 0.5 else " ".join(title.split()[:3])
                        r = http.post("/api/search", json={"q": q, "k": k})
                    body = r.json()
                    if r.status_code != 200 or len(body["hits"]) != k:
                        errors[c].append(f"{r.status_code} {body}")
                except Exception as e:  # counted, not raised: the load test reports errors
                    errors[c].append(f"{type(e).__name__}: {e}")
                latencies[c].append(1000 * (time.perf_counter() - start))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    lat = np.concatenate([np.asarray(x) for x in latencies])
    errs = [e for x in errors for e in x]
    return {"clients": clients, "seconds": round(wall, 2), "requests": int(len(lat)),
            "text_requests": sum(k["text"] for k in kinds), "photo_requests": sum(k["photo"] for k in kinds),
            "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p90_ms": round(float(np.percentile(lat, 90)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(lat.max()), 1),
            "errors": len(errs), "error_examples": errs[:5]}


def bad_requests(base_url: str, items: int) -> list[dict]:
    """Sends every bad request; returns one row per request with its status and reason."""
    import httpx

    cases = [
        ("empty query", "get", "/api/search", {"params": {"q": "", "k": 5}}, 400),
        ("blank query (POST)", "post", "/api/search", {"json": {"q": "   ", "k": 5}}, 400),
        ("all-unknown-token query", "get", "/api/search", {"params": {"q": "\u2603\u2603 \u2603", "k": 5}}, 400),
        ("k = 0", "get", "/api/search", {"params": {"q": "shirt", "k": 0}}, 400),
        ("k = -3", "post", "/api/search", {"json": {"q": "shirt", "k": -3}}, 400),
        ("k > store", "get", "/api/search", {"params": {"q": "shirt", "k": items + 1}}, 400),
        ("k not a number", "get", "/api/search", {"params": {"q": "shirt", "k": "ten"}}, 422),
        ("non-image upload", "post", "/api/search/image",
         {"files": {"file": ("a.txt", b"not a photo", "text/plain")}}, 415),
        ("oversized upload", "post", "/api/search/image",
         {"files": {"file": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 2 ** 17), "image/png")}}, 413),
        ("unknown item image", "get", f"/api/items/{items}/image.png", {}, 404),
    ]
    rows = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for name, method, url, kwargs, want in cases:
            r = getattr(http, method)(url, **kwargs)
            reason = r.json().get("error", "")
            rows.append({"request": name, "status": r.status_code, "expected": want,
                         "ok": r.status_code == want and bool(reason) and "\n" not in reason, "reason": reason})
        still = http.get("/api/search", params={"q": "shirt", "k": 5})
        rows.append({"request": "good query afterwards", "status": still.status_code, "expected": 200,
                     "ok": still.status_code == 200 and len(still.json()["hits"]) == 5, "reason": ""})
    return rows


def other_model_store_refused(workdir: pathlib.Path, store: pathlib.Path, tmp: pathlib.Path) -> dict:
    """A copy of the store's header and items under another fingerprint: `prodclip serve` must exit 2."""
    other = tmp / "other_model_store"
    (other / "shards").mkdir(parents=True)
    header = json.loads((store / "store.json").read_text())
    header["fingerprint"] = "0123456789abcdef"
    (other / "store.json").write_text(json.dumps(header))
    shutil.copy(store / "items.jsonl", other / "items.jsonl")
    for shard in (store / "shards").iterdir():
        (other / "shards" / shard.name).symlink_to(shard)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "prodclip.cli", "serve", "--workdir", str(workdir), "--store",
                           str(other), "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prodclip:")]
    return {"request": "store from another model (at startup)", "status": f"exit {proc.returncode}",
            "expected": "exit 2", "ok": proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr,
            "reason": lines[0] if lines else proc.stderr[-300:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path, help="a trained run")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--noise", type=float, default=0.3, help="noise norm around each base embedding")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests in all")
    p.add_argument("--photo-every", type=int, default=8, help="every n-th request of a client is a photo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", type=pathlib.Path, default=None, help="where to write the store (default: a temp dir)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON here")
    p.add_argument("--index", default=None, help="build this FAISS index kind in the store first (prodclip index)")
    args = p.parse_args(argv)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="serve_load_"))
    store = args.store or tmp / "store"
    t0 = time.perf_counter()
    made = build_store(args.workdir, store, args.items, args.noise, args.seed)
    print(f"store: {args.items} items, dim {made['header']['dim']} in {time.perf_counter() - t0:.1f} s ({store})")
    photos = [png_bytes(image) for image in made["images"]]
    if args.index:
        from prodclip import index as index_lib

        t0 = time.perf_counter()
        index_lib.build_index(store, args.index)
        print(f"index {args.index} built in {time.perf_counter() - t0:.1f} s")

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = start_server(args.workdir, store, port, tmp / "server.log")
    try:
        t0 = time.perf_counter()
        health = wait_healthy(base_url, proc, timeout_s=600)
        startup_s = time.perf_counter() - t0
        print(f"server up in {startup_s:.1f} s: {health}")
        result = load(base_url, made["titles"], photos, clients=args.clients, seconds=args.seconds,
                      max_requests=args.max_requests, photo_every=args.photo_every, seed=args.seed)
        bad = bad_requests(base_url, args.items)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    bad.append(other_model_store_refused(args.workdir, store, tmp))
    report = {"index": args.index, "items": args.items, "dim": made["header"]["dim"], "store": made["header"]["synthetic"],
              "search": health["search"], "startup_s": round(startup_s, 1), "load": result,
              "bad_requests": bad, "server_alive_after_bad_requests": alive}
    print(json.dumps(report["load"], indent=2))
    print("| request | status | expected | ok | reason |\n|---|---|---|---|---|")
    for row in bad:
        print(f"| {row['request']} | {row['status']} | {row['expected']} | {row['ok']} | {row['reason'][:120]} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.store is None:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = result["errors"] == 0 and all(row["ok"] for row in bad) and alive
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
