"""One BLAS thread while psmi_dask projects, in every thread that does.

OpenBLAS gives products whose last bits depend on its number of threads,
so every projection runs with one BLAS thread, whichever process and
thread runs it: the user's, with the threaded scheduler, or a worker's.
Chunks already run in parallel, one per core.

Recent OpenBLAS builds keep the thread count per calling thread, so the
limit is set in the thread that projects. A pool thread (Dask's, or a
worker's) keeps the limit once set, so that it is not set again for every
chunk; the main thread gets its own setting back on leaving.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["single_threaded_blas"]

_lock = threading.Lock()
_controller: Any = None
_pinned = threading.local()


def _limit() -> Any:
    global _controller
    with _lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold BLAS to one thread in this thread for the duration."""
    if getattr(_pinned, "done", False):
        yield
        return
    limiter = _limit()
    if threading.current_thread() is not threading.main_thread():
        _pinned.done = True
        yield
        return
    try:
        yield
    finally:
        limiter.restore_original_limits()
