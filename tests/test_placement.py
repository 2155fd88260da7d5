"""Where chunks go on a cluster: contiguous runs, one per worker thread."""

from __future__ import annotations

from itertools import pairwise

import pytest

from psmi_dask._placement import chunk_ranges


@pytest.mark.parametrize(
    "n_chunks, nthreads",
    [
        (10, {"a": 1}),
        (10, {"a": 1, "b": 1}),
        (7, {"a": 2, "b": 1}),
        (3, {"a": 2, "b": 2}),
        (1, {"a": 1, "b": 1}),
    ],
)
def test_runs_cover_every_chunk_once_in_order(n_chunks, nthreads):
    ranges = chunk_ranges(n_chunks, nthreads)
    bounds = [(first, stop) for _, first, stop in ranges]
    assert bounds[0][0] == 0 and bounds[-1][1] == n_chunks
    assert all(a[1] == b[0] for a, b in pairwise(bounds))
    lengths = [stop - first for first, stop in bounds]
    assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1
    assert len(ranges) == min(n_chunks, sum(nthreads.values()))


def test_runs_follow_the_threads_of_each_worker():
    ranges = chunk_ranges(12, {"b": 1, "a": 2})
    workers = [worker for worker, _, _ in ranges]
    assert sorted(workers) == ["a", "a", "b"]


def test_fewer_chunks_than_threads_still_reach_every_worker():
    ranges = chunk_ranges(2, {"a": 2, "b": 2})
    assert sorted(worker for worker, _, _ in ranges) == ["a", "b"]
