"""Reading a config: a python file returning a locked ConfigDict, or a saved config.json, plus CLI overrides.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`, usually
by calling `config.base_config()` and changing fields. The returned config is locked, so
a misspelled key, in the file or on the command line, is an error that lists the
valid keys. Overrides use the JAX research convention:

    prodclip train --config configs/quickstart.py --config.train.num_steps=100

`load` then runs `config_checks.validate` (patch size divides the image size, heads
divide the width, ...) before any compute starts.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
from typing import Any, Sequence

import ml_collections

from prodclip.config import base_config
from prodclip.config_checks import validate
from prodclip.errors import ConfigError


def load_module(path: pathlib.Path, prefix: str):
    """Executes a python file (a config or sweep file) as a fresh module named `<prefix>_<stem>`."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports a python config file and calls its `get_config(arg)`; returns it locked.

    A `.json` file (a run's saved config.json) is read with `load_config_json`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".json":
        return load_config_json(path)
    try:
        module = load_module(path, "prodclip_config")
    except AttributeError as e:  # a locked ConfigDict refusing an unknown key
        raise ConfigError(f"{path}: {e}") from e
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: syntax error: {e.msg}; fix the file and rerun") from e
    except Exception as e:  # noqa: BLE001 - any failure while importing the user's file is a config error
        raise ConfigError(f"{path} could not be imported: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() function")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug in the user's get_config() is reported, not a traceback
        raise ConfigError(f"{path}: get_config() failed: {type(e).__name__}: {e}") from e
    config.lock()
    return config


def load_config_json(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """base_config() updated with every field of a saved config.json; unknown fields are an error."""
    path = pathlib.Path(path)
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    config = base_config()
    config.lock()

    def assign(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                assign(value, f"{prefix}{key}.")
            else:
                try:
                    set_field(config, f"{prefix}{key}", value)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from e
    assign(saved, "")
    return config


def load(source: str | pathlib.Path | None = None, overrides: Sequence[str] = (), *, arg: str | None = None,
         check: bool = True) -> ml_collections.ConfigDict:
    """The one way a command gets its config: a source, then `--config.a.b=value` overrides, then `validate`.

    source: a python config file (`get_config(arg)`), a saved config.json, a run directory
    (its config.json), or None for `base_config()`. Unknown keys, in a saved config.json or
    an override, are a ConfigError that names the key. Returns the config locked.
    """
    if source is None:
        config = base_config()
        config.lock()
    else:
        path = pathlib.Path(source)
        if not path.exists():
            raise ConfigError(f"{path} not found: give a config file (--config FILE) or the directory of a run")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{path} has no config.json: give --config FILE, or a run directory")
            path = path / "config.json"
        config = load_config_file(path, arg)
    apply_overrides(config, overrides)
    if check:
        validate(config)
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys as dotted paths, e.g. ['data.image_size', 'model.embed_dim', ...]."""
    keys = []
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. --config.loss.name=sigmoid


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_field(config: ml_collections.ConfigDict, dotted_key: str, value: Any) -> None:
    """Sets `a.b.c` in a locked config; unknown keys and wrong types raise ConfigError."""
    parts = dotted_key.split(".")
    node = config
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "<top level>"
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            group_prefix = ".".join(parts[:depth]) + "." if depth else ""
            valid = flat_keys(node, group_prefix) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config key '{dotted_key}' ('{part}' is not a field of {here}). "
                f"Valid keys: {', '.join(valid)}"
            )
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"'{dotted_key}' is a group, not a field; set one of: {', '.join(flat_keys(current))}")
    if isinstance(current, tuple) and isinstance(value, list):  # JSON has no tuples: nested lists come back
        value = _as_tuples(value)
    if isinstance(current, tuple) and isinstance(value, str):
        value = tuple(v for v in value.split(",") if v)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"'{dotted_key}' must be a bool (True/False), got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, bool):
        raise ConfigError(f"'{dotted_key}' must be a {type(current).__name__}, got bool {value!r}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"'{dotted_key}' must be an int, got {value!r}")
        value = int(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"'{dotted_key}' has type {type(current).__name__}; cannot set it to {value!r}") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `a.b=value`) strings to a locked config."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if not text.startswith("config.") or "=" not in text:
            raise ConfigError(f"override {item!r} must look like --config.some.field=value")
        key, raw = text[len("config."):].split("=", 1)
        set_field(config, key, _parse_value(raw))
    return config

