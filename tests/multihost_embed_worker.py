"""One process of a multi-host `embed` + evaluation run, for tests/test_ingest.py.

    python tests/multihost_embed_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR TOKENIZER_DIR

NUM_PROCESSES=1 runs without jax.distributed (the single-host reference). Every process
embeds a 40-item synthetic catalog into OUT_DIR/store (shards of 8 rows, each written by
its owner process), then computes the split's two-way retrieval metrics from embeddings
gathered across processes; process 0 writes them to OUT_DIR/metrics.json. The tokenizer is
loaded from TOKENIZER_DIR (`save_tokenizer`), as a real run loads its workdir's: tokenizer
training is not bit-reproducible across processes.
"""

import json
import os
import pathlib
import sys

NUM_ITEMS = 40


def save_tokenizer(path) -> None:
    """Trains the worker's tokenizer on the catalog's titles and saves it to `path`."""
    from prodclip.data import synthetic
    from prodclip.data import tokenizer as tokenizer_lib

    tokenizer_lib.train_tokenizer(synthetic.make_catalog("test", NUM_ITEMS, image_size=32).titles,
                                  vocab_size=200).save_pretrained(str(path))


def main(port: str, num_processes: str, process_id: str, out_dir: str, tokenizer_dir: str) -> None:
    import jax

    if int(num_processes) > 1:
        from prodclip import parallel

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        parallel.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id), timeout_s=60)
    from prodclip import config as config_lib, config_loading
    from prodclip.models import factory
    from prodclip.data import synthetic
    from prodclip.data import tokenizer as tokenizer_lib
    from prodclip.evaluate import multihost
    from prodclip.evaluate import store as store_lib

    config = config_lib.base_config()
    for key, value in {"data.image_size": 32, "model.image.patch_size": 16, "model.embed_dim": 16,
                       "model.image.width": 16, "model.text.width": 16, "model.image.depth": 1,
                       "model.text.depth": 1, "model.image.num_heads": 2, "model.text.num_heads": 2,
                       "tokenizer.context_length": 12, "eval.batch_size": 8, "embed.shard_size": 8}.items():
        config_loading.set_field(config, key, value)
    catalog = synthetic.make_catalog("test", NUM_ITEMS, image_size=32)
    hf = tokenizer_lib.load_hf_tokenizer(tokenizer_dir)
    tokenizer = tokenizer_lib.TitleTokenizer(hf, context_length=12)
    graphdef, params = factory.create_model(config, tokenizer, seed=0)
    out = pathlib.Path(out_dir)
    store_lib.embed_catalog(graphdef, params, catalog, tokenizer, config, out / "store", split="test",
                            workdir="run", progress=False)
    metrics = multihost.retrieval_metrics_gathered(graphdef, params, catalog, tokenizer, config)
    if jax.process_index() == 0:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if int(num_processes) > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    main(*sys.argv[1:])
