"""`prodclip train | eval | convert`: the command line.

    prodclip train --config configs/quickstart.py --workdir runs/qs [--config.train.num_steps=100 ...]
    prodclip eval  --workdir runs/qs [--config.eval.batch_size=512 ...]
    prodclip convert import HF_CLIP_DIR --out runs/clip   |   prodclip convert export runs/qs --out HF_DIR
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
    results = train.train_and_evaluate(config, args.workdir)
    print(suite.format_table(results))
    print(f"\ntrained in {results['train_seconds']:.0f} s; results in {args.workdir}/eval.json")
    return 0


def cmd_eval(args, overrides) -> int:
    from prodclip import train
    from prodclip.evaluate import suite

    config = _load_config(args, overrides)
    splits = dict.fromkeys(config.data.eval_splits)
    graphdef, params, tokenizer, split_sources, meta = train.load_trained(config, args.workdir, splits)
    results = suite.evaluate_all(graphdef, params, split_sources, tokenizer, config)
    suite.write_results(args.workdir, results, step=meta.get("step"), name="reeval")
    print(suite.format_table(results))
    return 0


def cmd_convert(args, overrides) -> int:
    from prodclip import config as config_lib
    from prodclip import convert

    try:
        if args.direction == "import":
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prodclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model, then evaluate it")
    p.add_argument("--config", required=True, help="python config file defining get_config()")
    p.add_argument("--config-arg", default=None, help="argument passed to get_config(arg)")
    p.add_argument("--workdir", required=True)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="re-evaluate a finished run from its workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="default: the config saved in the workdir")
    p.add_argument("--config-arg", default=None)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("convert", help="import a HF / OpenAI CLIP directory, or export a run as one")
    p.add_argument("direction", choices=("import", "export"))
    p.add_argument("source", help="import: a HF CLIP dir (config.json + model.safetensors); export: a workdir")
    p.add_argument("--out", required=True, help="import: the new workdir; export: the HF dir to write")
    p.add_argument("--step", type=int, default=None, help="export: the checkpoint step (default: latest)")
    p.add_argument("--config", default=None, help="import: a config file for the non-model fields")
    p.add_argument("--config-arg", default=None)
    p.set_defaults(fn=cmd_convert)

    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from prodclip.config import ConfigError
    try:
        return args.fn(args, overrides)
    except ConfigError as e:
        print(f"prodclip: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
