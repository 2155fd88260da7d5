"""Where chunks go on a cluster: contiguous runs, one per worker thread."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest
from distributed.comm.core import CommClosedError

from psmi_dask._placement import _scheduler_gone, chunk_ranges


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


class _Client:
    """A client that notices its scheduler went away ``after`` seconds late."""

    def __init__(self, after):
        self.lost_at = time.monotonic() + after

    @property
    def status(self):
        return "connecting" if time.monotonic() >= self.lost_at else "running"


def test_a_comm_error_just_before_the_client_notices_is_a_lost_scheduler():
    # Gathering asks the scheduler where results are; that call can fail on
    # the closed connection before the client leaves the "running" state.
    error = CommClosedError("in <TCP (closed) ConnectionPool.who_has>")
    assert _scheduler_gone(_Client(after=0.3), error)


def test_a_comm_error_with_the_scheduler_still_there_is_not():
    assert not _scheduler_gone(_Client(after=60), CommClosedError("worker gone"))
    assert not _scheduler_gone(_Client(after=0), ValueError("bad input"))


def test_an_error_reading_a_file_is_not_waited_on():
    started = time.monotonic()
    assert not _scheduler_gone(_Client(after=60), FileNotFoundError("X.zarr"))
    assert time.monotonic() - started < 1
