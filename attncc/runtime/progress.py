"""What attncc is building and how long it took: logged, and shown on a terminal.

Everything attncc reports goes to the ``attncc`` logger (cache hits and misses, which backend
ran a plan and why the others declined, build times). It is silent unless the application
configures logging or ``ATTNCC_LOG`` names a level (:func:`configure_logging`). Separately, a
slow step (lowering and rendering a pattern's kernels, an nvcc build) shows a spinner and its
time on stderr when stderr is a terminal (``ATTNCC_PROGRESS=0`` hides it), as ``attncc tune``
shows its own progress.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

from attncc import settings

log = logging.getLogger("attncc")

_state = threading.local()  # depth of nested steps in this thread: only the outermost is shown
_handler: logging.Handler | None = None


def configure_logging() -> None:
    """Attach a stderr handler at ``ATTNCC_LOG``'s level to the ``attncc`` logger (once); without
    the setting attncc adds no handler, as a library should, and the application decides."""
    global _handler
    level = settings.log_level()
    if level is None:
        return
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("attncc %(levelname)s: %(message)s"))
        log.addHandler(_handler)
    log.setLevel(level)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Run a slow step: log it (debug when it starts, info with its time when it ends) and, on a
    terminal, show ``what`` with a spinner while it runs and its time after.

    Note [Nested steps]: a rendering inside a lowering, or an nvcc build inside a first call, is
    one step to the user; rich allows one live display at a time, so inner steps only log.
    """
    depth = getattr(_state, "depth", 0)
    console = _console() if depth == 0 else None
    log.debug("%s ...", what)
    start = time.perf_counter()
    _state.depth = depth + 1
    try:
        if console is None:
            yield
        else:
            with console.status(escape(f"attncc: {what}")):
                yield
    finally:
        _state.depth = depth
    took = time.perf_counter() - start
    log.info("%s: %.2f s", what, took)
    if console is not None:
        console.print(f"attncc: {what} ({took:.1f} s)", highlight=False, markup=False)


def _console() -> Console | None:
    if not settings.progress() or not sys.stderr.isatty():
        return None
    return Console(stderr=True)
