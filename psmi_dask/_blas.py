"""One BLAS thread while psmi_dask projects, and the user's setting after.

OpenBLAS gives products whose last bits depend on its number of threads,
so every projection runs with one BLAS thread, whichever process and
thread runs it: the user's, with the threaded scheduler, or a worker's.
Chunks already run in parallel, one per core.

The thread count of OpenBLAS is global to the process, not per thread. So
the limit is counted: the first thread to enter sets it, the last to leave
gives back what was there before, and in between every projection runs
with one thread. The estimator holds the limit for a whole fit or
transform, so that it is not set and given back between tasks.

threadpoolctl (from 3.8) lets only one "controlling" thread change a
process-wide BLAS pool and silently ignores the others; the first and last
threads here may differ, so control is released around each change.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["single_threaded_blas"]

_lock = threading.Lock()
_controller: Any = None
_holders = 0
_limiter: Any = None


def _enter() -> None:
    global _controller, _holders, _limiter
    with _lock:
        if _holders == 0:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
            _release_control()
            _limiter = _controller.limit(limits=1, user_api="blas")
            _release_control()
        _holders += 1


def _leave() -> None:
    global _holders, _limiter
    with _lock:
        _holders -= 1
        if _holders == 0:
            _release_control()
            _limiter.restore_original_limits()
            _release_control()
            _limiter = None


def _release_control() -> None:
    for library in _controller.lib_controllers:
        release = getattr(type(library), "clear_controlling_thread", None)
        if release is not None:
            release(force=True)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold BLAS to one thread in this process for the duration."""
    _enter()
    try:
        yield
    finally:
        _leave()
