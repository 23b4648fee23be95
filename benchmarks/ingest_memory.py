"""Peak memory of `prodclip data build` and `prodclip embed` as the catalog grows (streaming ingestion).

    python benchmarks/ingest_memory.py --sizes 50000 500000 --json out.json

Catalog: a parquet manifest with embedded images (8x8 PNGs, 512 distinct ones cycled, so
the run measures row handling rather than image decoding), a title and a split column
naming every row's split "catalog" (one split holding all items). Each command runs in its
own fresh process through the CLI, exactly as a user runs it, and reports its own peak RSS
(ru_maxrss): `data build` in its JSON report, `embed` on its last line. The embed model is
the quickstart ViT shrunk to a toy (2 training steps: memory does not depend on weights),
reading the prepared TFDS dataset.

Streaming means the growth from the smallest to the largest size stays under a bound
(200 MB for 50k -> 500k items) instead of growing with the catalog.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--config.data.image_size=32", "--config.model.image.patch_size=8", "--config.model.image.depth=1",
    "--config.model.text.depth=1", "--config.model.image.width=32", "--config.model.text.width=32",
    "--config.model.embed_dim=32", "--config.model.image.num_heads=2", "--config.model.text.num_heads=2",
    "--config.tokenizer.vocab_size=300", "--config.train.progress_bar=False",
]
COLOURS = ["red", "navy", "black", "white", "green", "grey", "pink", "olive"]
TYPES = ["shirt", "dress", "sneaker", "watch", "handbag", "jeans", "cap", "scarf"]


def write_catalog(path: pathlib.Path, n: int, batch: int = 50_000) -> None:
    """A parquet catalog of n rows (id, image bytes, title, split), written batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(512):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("title", pa.string()), ("split", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, batch):
            ids = np.arange(start, min(start + batch, n))
            writer.write_table(pa.table({
                "id": ids, "image": [pngs[i % 512] for i in ids],
                "title": [f"{COLOURS[i % 8]} {TYPES[(i // 8) % 8]} number {i}" for i in ids],
                "split": ["catalog"] * len(ids)}, schema=schema), row_group_size=4096)


def run(cmd: list[str]) -> tuple[str, float]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prodclip.cli", *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 500_000])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="ingest_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    if not (run_dir / "labels.json").exists():
        run(["train", "--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(run_dir), *TINY_MODEL,
             "--config.data.num_train=64", "--config.data.num_val=16", "--config.data.num_test=16",
             "--config.data.num_compositional=16", "--config.train.batch_size=16", "--config.train.num_steps=2",
             "--config.train.eval_every=0", "--config.eval.batch_size=16", "--config.optim.warmup_steps=1"])
    rows = []
    for n in args.sizes:
        catalog, data_dir, store = root / f"catalog_{n}.parquet", root / f"tfds_{n}", root / f"store_{n}"
        t = time.perf_counter()
        write_catalog(catalog, n)
        print(f"[{n}] catalog written in {time.perf_counter() - t:.0f} s", flush=True)
        out, build_s = run(["data", "build", "product_catalog", "--data-dir", str(data_dir),
                            f"--config.data.path={catalog}", "--config.data.split_column=split",
                            "--config.data.label_columns=()", "--config.data.title_template={title}"])
        report = json.loads(out[out.index("{\n"):out.rindex("}") + 1])
        out, embed_s = run(["embed", "--workdir", str(run_dir), "--out", str(store), "--split", "catalog",
                            "--config.data.name=tfds", "--config.data.tfds_name=product_catalog",
                            f"--config.data.data_dir={data_dir}", "--config.data.label_columns=()",
                            "--config.data.id_column=product_id", "--config.eval.batch_size=256",
                            "--config.embed.shard_size=65536"])
        embed_peak = float(re.search(r"peak RSS (\d+) MB", out).group(1))
        rows.append({"items": n, "build_peak_rss_mb": report["peak_rss_mb"], "build_s": build_s,
                     "pairs": report["split_counts"]["catalog"]["pairs"], "embed_peak_rss_mb": embed_peak,
                     "embed_s": embed_s})
        print(json.dumps(rows[-1]), flush=True)
        for path in (catalog, data_dir, store):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    growth = {"build_growth_mb": rows[-1]["build_peak_rss_mb"] - rows[0]["build_peak_rss_mb"],
              "embed_growth_mb": rows[-1]["embed_peak_rss_mb"] - rows[0]["embed_peak_rss_mb"]}
    print(json.dumps(growth))
    print("| items | data build peak RSS MB | build s | embed peak RSS MB | embed s |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['items']:,} | {r['build_peak_rss_mb']:.0f} | {r['build_s']:.0f} | {r['embed_peak_rss_mb']:.0f} | "
              f"{r['embed_s']:.0f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, **growth,
                                                       "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
