"""JAX's persistent compilation cache: compiled train/eval steps reused across runs and resumes.

The cache is keyed by the program, the devices and the JAX/XLA versions, so a stale entry is
never used; it is only ever a cache. The default directory is a per-user cache directory
(`$XDG_CACHE_HOME/prodclip/jax`, i.e. `~/.cache/prodclip/jax`), shared by every run of the
user, so a second run of the same config (new workdir or resume) skips the compile.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

log = logging.getLogger("prodclip")

# Compilations faster than this are not written: they would cost more to read than to redo.
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/prodclip/jax`, or `~/.cache/prodclip/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "prodclip" / "jax"


def enable(cache_dir: str | os.PathLike = "", min_compile_seconds: float = MIN_COMPILE_SECONDS) -> pathlib.Path:
    """Points JAX's persistent compilation cache at `cache_dir` (empty: `default_dir()`); returns the dir in use.

    Process-wide, and JAX opens its cache once per process: when a directory is already set
    (an earlier call, `jax.config`, or the JAX_COMPILATION_CACHE_DIR environment variable),
    that one stays in use, with its own settings, and is returned.
    """
    path = pathlib.Path(cache_dir).expanduser() if cache_dir else default_dir()
    current = jax.config.jax_compilation_cache_dir
    if current and pathlib.Path(current) != path:
        log.info("compilation cache: %s (set before prodclip's %s)", current, path)
        return pathlib.Path(current)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("compilation cache: %s", path)
    return path
