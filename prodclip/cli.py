"""`prodclip train | eval`: the command line.

    prodclip train --config configs/quickstart.py --workdir runs/qs [--config.train.num_steps=100 ...]
    prodclip eval  --workdir runs/qs [--config.eval.batch_size=512 ...]
    prodclip export --workdir runs/qs --out exports/qs [--best]

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


def cmd_export(args, overrides) -> int:
    from prodclip import checkpoint, train

    config = _load_config(args, overrides)
    step = checkpoint.Checkpointer(args.workdir, config).best_step() if args.best else None
    if args.best and step is None:
        print("prodclip: --best needs checkpoint.best_metric set and a checkpoint saved after an eval",
              file=sys.stderr)
        return 1
    _, params, _, _, meta = train.load_trained(config, args.workdir, {}, step=step)
    out = checkpoint.export(args.out, params, config, pathlib.Path(args.workdir) / "tokenizer", meta["step"])
    print(f"exported the params of step {meta['step']} to {out} (prodclip eval --workdir {out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prodclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model, then evaluate it")
    p.add_argument("--config", required=True, help="python config file defining get_config()")
    p.add_argument("--config-arg", default=None, help="argument passed to get_config(arg)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir whose checkpoints were written with a different model/data config")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="re-evaluate a finished run from its workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="default: the config saved in the workdir")
    p.add_argument("--config-arg", default=None)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write an inference-only export (params, config, tokenizer) of a run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="a new directory; `prodclip eval --workdir OUT` reads it")
    p.add_argument("--best", action="store_true", help="export the best checkpoint by checkpoint.best_metric")
    p.add_argument("--config", default=None, help="default: the config saved in the workdir")
    p.add_argument("--config-arg", default=None)
    p.set_defaults(fn=cmd_export)

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
