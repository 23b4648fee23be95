"""grain worker processes without their set-up rules leaking to users.

grain's worker processes (`mp_prefetch`) are started with the `spawn` method and read absl
flags. Left alone, that means (1) an UnparsedFlagAccessError unless the program parsed absl
flags, and (2) every worker re-running the user's main script unless it sits under
`if __name__ == "__main__":`. prodclip's pipeline pickles only prodclip functions (and
cloudpickle sends functions defined in `__main__` by value), so the workers never need the
main script: `spawn_without_main()` tells multiprocessing not to re-run it.

`ResumableIterator` wraps a grain iterator: it starts workers under these rules, exposes
`get_state()` / `set_state()` (JSON-able dicts) for checkpoints, and stops its workers on
`close()` or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.machinery
import sys
import weakref
from typing import Any, Iterator

import grain

_open_iterators: "weakref.WeakSet[ResumableIterator]" = weakref.WeakSet()


def ensure_absl_flags_parsed() -> None:
    """Marks absl flags parsed (with their defaults) when the program never parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@contextlib.contextmanager
def spawn_without_main():
    """While active, processes started with `spawn` do not re-import the `__main__` module."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = main.__dict__.get("__spec__")
    # multiprocessing skips re-importing a main module whose spec is named "__main__"
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = saved


class ResumableIterator(Iterator[Any]):
    """A grain DatasetIterator that is safe to run with worker processes and to checkpoint.

    `iterator` is the wrapped grain iterator (for orbax: grain.checkpoint.CheckpointSave(it.iterator)).
    """

    def __init__(self, dataset: grain.IterDataset, uses_workers: bool):
        self.uses_workers = uses_workers
        if uses_workers:
            ensure_absl_flags_parsed()
        self.iterator = iter(dataset)
        _open_iterators.add(self)

    def __next__(self):
        if not self.uses_workers:
            return next(self.iterator)
        with spawn_without_main():
            return next(self.iterator)

    def get_state(self) -> dict:
        """The position in the stream, a JSON-able dict; `set_state` on a fresh iterator resumes there."""
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        with spawn_without_main():
            self.iterator.set_state(state)

    def close(self) -> None:
        """Stops worker processes; the iterator cannot be used afterwards."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
        _open_iterators.discard(self)


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_open_iterators):
        it.close()
