"""Preloaded into the local workers the command line starts.

A terminal's Ctrl-C reaches every process of its group; the command closes
its cluster on it, so workers leave it alone instead of each printing a
KeyboardInterrupt traceback of its own.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
