"""Where the work runs, and how the data gets there.

Without a distributed client, blocks run on Dask's threaded scheduler in
this process; the features stay where they are and chunks are views.
"""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np

from psmi_dask._blocks import ChunkedData
from psmi_dask._controller import Backend, LocalBackend

__all__ = ["backend_for", "current_threads", "place"]


def current_threads() -> int:
    """Threads available to blocks: the machine's cores."""
    return os.cpu_count() or 1


def backend_for(max_in_flight: int) -> Backend:
    """The backend blocks run on."""
    return LocalBackend(max_in_flight)


def _chunked(features: Any, codes: np.ndarray, rows: int) -> tuple[da.Array, da.Array]:
    if isinstance(features, da.Array):
        X = features.rechunk({0: rows, 1: -1})
    else:
        X = da.from_array(features, chunks=(rows, -1), name=False)
    labels = da.from_array(codes, chunks=(X.chunks[0],), name=False)
    return X, labels


def place(
    backend: Backend,
    features: Any,
    codes: np.ndarray,
    rows: int,
    offset: np.ndarray,
) -> ChunkedData:
    """Split features and codes into chunks of ``rows`` samples."""
    X, labels = _chunked(features, codes, rows)
    sizes = [int(s) for s in X.chunks[0]]
    starts = [int(s) for s in np.cumsum([0, *sizes[:-1]])]
    return ChunkedData(
        features=list(X.to_delayed().ravel()),
        codes=list(labels.to_delayed().ravel()),
        starts=starts,
        sizes=sizes,
        offset=offset,
        n_features=int(X.shape[1]),
    )
