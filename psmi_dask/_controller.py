"""The controller: which blocks exist, where they run, when to stop.

Blocks are submitted to a backend, several at once, and consumed strictly
in block order, so every decision is the one the sequential algorithm
would take, however many blocks ran ahead. Per-sample state is merged
through the backend too, so that on a cluster it stays on the workers and
the controller only ever receives a few scalars per block.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import dask
import numpy as np

from psmi_dask._numerics import SampleMoments, merge_sample_moments
from psmi_dask._stopping import (
    Candidates,
    StoppingRule,
    chunk_candidates,
    mean_variation,
    merge_candidates,
)

__all__ = ["Backend", "LocalBackend", "SampleAccumulator", "run_blocks"]

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Where blocks and the small merges between them run."""

    n_threads: int

    def submit(self, graphs: Sequence[Any]) -> Any: ...

    def start(self, graph: Any) -> Any: ...

    def wait(self, handle: Any) -> Any: ...

    def cancel(self, handle: Any) -> None: ...

    def call(self, function: Callable[..., Any], *args: Any) -> Any: ...

    def fetch(self, reference: Any) -> Any: ...

    def gather(self, references: Sequence[Any]) -> list[Any]: ...

    def close(self) -> None: ...


_POOL_LOCK = threading.Lock()
_COMPUTE_POOL: ThreadPoolExecutor | None = None


def _compute_pool() -> ThreadPoolExecutor:
    # One pool for every block of every fit, so that several blocks in
    # flight share the machine's cores instead of each taking all of them.
    global _COMPUTE_POOL
    with _POOL_LOCK:
        if _COMPUTE_POOL is None:
            _COMPUTE_POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="psmi-dask"
            )
        return _COMPUTE_POOL


class LocalBackend:
    """Blocks on Dask's threaded scheduler, in this process."""

    def __init__(self, max_in_flight: int) -> None:
        pool = _compute_pool()
        self.n_threads = pool._max_workers
        self._pool = pool
        self._blocks = ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="psmi-dask-block"
        )

    def _compute(self, graphs: Sequence[Any]) -> tuple[Any, ...]:
        # An Executor as the scheduler runs the graph on its threads, and
        # spares the import of distributed that scheduler="threads" costs.
        return dask.compute(*graphs, scheduler=self._pool)

    def submit(self, graphs: Sequence[Any]) -> Future:
        return self._blocks.submit(self._compute, graphs)

    def wait(self, handle: Future) -> Any:
        return handle.result()

    def start(self, graph: Any) -> Any:
        # Threads have no start-up to hide: the graph runs within its block.
        return graph

    def cancel(self, handle: Future) -> None:
        handle.cancel()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)

    def fetch(self, reference: Any) -> Any:
        return reference

    def gather(self, references: Sequence[Any]) -> list[Any]:
        return list(references)

    def close(self) -> None:
        # Blocks already running finish (at most max_in_flight - 1 of them);
        # the threaded scheduler cannot interrupt a task.
        self._blocks.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class ChunkState:
    """Per-sample moments of one chunk over all blocks so far (``current``)
    and over the blocks up to the milestone (``milestone``, None before the
    milestone holds a block)."""

    current: SampleMoments
    milestone: SampleMoments | None


def _advance(
    state: ChunkState | None, scored: tuple[SampleMoments, Any], *folded: Any
) -> ChunkState:
    """Add a block's scores to a chunk's state; fold blocks into the milestone."""
    moments = scored[0]
    if state is None:
        current, milestone = moments, None
    else:
        current, milestone = (
            merge_sample_moments(state.current, moments),
            state.milestone,
        )
    for block in folded:
        milestone = (
            block[0] if milestone is None else merge_sample_moments(milestone, block[0])
        )
    return ChunkState(current, milestone)


def _chunk_lowest(state: ChunkState, start: int, n_lowest: int) -> Candidates:
    if state.milestone is None:
        raise ValueError("the milestone holds no block yet")
    return chunk_candidates(state.current.mean, state.milestone.mean, start, n_lowest)


def _merge_lowest(n_lowest: int, last: bool, *parts: Candidates) -> Any:
    """Merge candidates; the last merge returns the rule's variation."""
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_candidates(merged, part, n_lowest)
    return mean_variation(merged) if last else merged


# Candidates merged per task: few hops from the chunks to the variation.
_FAN_IN = 32


@dataclass
class SampleAccumulator:
    """Per-sample PSMI moments, merged block after block, in block order.

    Keeps one state per chunk (see ``ChunkState``) and the scores of the
    blocks the milestone has not reached yet. Each block adds one task per
    chunk and a few merges of candidates, which run where the data is.
    """

    backend: Backend
    starts: Sequence[int]
    rule: StoppingRule | None
    keep_columns: bool
    n_samples: int
    states: list[Any] = field(default_factory=list)
    pending: deque = field(default_factory=deque)
    columns: list[list[Any]] = field(default_factory=list)
    fetched: list[Future] = field(default_factory=list)
    _fetcher: ThreadPoolExecutor | None = None
    states_after: list[list[Any]] = field(default_factory=list)
    n_blocks: int = 0
    n_milestone: int = 0

    def add(self, scored: Sequence[Any]) -> float | None:
        """Merge one block's per-chunk scores; return the rule's variation.

        Returns None in fixed mode, and while the milestone holds no block.
        """
        return self.variation_of(self.extend(scored))

    def extend(self, scored: Sequence[Any]) -> Any:
        """Submit the merges of one block's scores, without waiting.

        Which blocks the milestone holds after k blocks depends on k alone,
        so on a cluster the merges of a block can be submitted with the
        block itself, ahead of any decision; ``keep`` later drops what the
        blocks after the stopping one added. Returns a reference to the
        rule's variation, or None.
        """
        call = self.backend.call
        self.n_blocks += 1
        if self.keep_columns:
            self.columns.append(list(scored))
        folded: list[list[Any]] = []
        if self.rule is not None:
            self.pending.append(list(scored))
            target = self.rule.milestone_blocks(self.n_blocks)
            while self.n_milestone < target:
                folded.append(self.pending.popleft())
                self.n_milestone += 1
        previous = self.states or [None] * len(scored)
        self.states = [
            call(_advance, state, s, *(block[i] for block in folded))
            for i, (state, s) in enumerate(zip(previous, scored))
        ]
        self.states_after.append(self.states)
        if self.rule is None or self.n_milestone == 0:
            return None
        n_lowest = self.rule.n_lowest(self.n_samples)
        level = [
            call(_chunk_lowest, state, start, n_lowest)
            for state, start in zip(self.states, self.starts)
        ]
        while True:
            last = len(level) <= _FAN_IN
            level = [
                call(_merge_lowest, n_lowest, last, *level[i : i + _FAN_IN])
                for i in range(0, len(level), _FAN_IN)
            ]
            if last:
                return level[0]

    def variation_of(self, reference: Any) -> float | None:
        """The variation behind a reference from ``extend``."""
        if reference is None:
            return None
        return float(self.backend.fetch(reference))

    def keep(self, n_blocks: int) -> None:
        """Keep the first ``n_blocks`` blocks only, dropping those run ahead."""
        self.states = self.states_after[n_blocks - 1]
        self.states_after = self.states_after[:n_blocks]
        self.columns = self.columns[:n_blocks]
        self.fetched = self.fetched[:n_blocks]
        self.n_blocks = n_blocks
        self.pending.clear()

    def moments(self) -> list[SampleMoments]:
        """The per-chunk moments over every block added."""
        return [state.current for state in self.backend.gather(self.states)]

    def fetch_ahead(self, n_blocks: int) -> None:
        """Start bringing the columns of the first ``n_blocks`` blocks here.

        A consumed block is final, so on a cluster its columns can travel
        while later blocks compute, rather than all of them at the end.
        """
        if self._fetcher is None:
            # One thread: blocks arrive in block order, one gather at a time.
            self._fetcher = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="psmi-dask-fetch"
            )
        while len(self.fetched) < min(n_blocks, len(self.columns)):
            block = self.columns[len(self.fetched)]
            self.fetched.append(self._fetcher.submit(self.backend.gather, block))

    def close(self) -> None:
        """Stop fetching: wait for the gather under way, drop the others."""
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True, cancel_futures=True)
            self._fetcher = None

    def column_blocks(self) -> Iterator[list[np.ndarray]]:
        """Per block, per chunk, the pmi columns kept, one block at a time.

        Each block is dropped once yielded, so that the caller can copy the
        columns out without holding them twice.
        """
        columns: list[Any] = self.columns
        fetched: list[Any] = self.fetched
        self.columns, self.fetched = [], []
        for i in range(len(columns)):
            if i < len(fetched):
                parts = fetched[i].result()
                fetched[i] = None
            else:
                parts = self.backend.gather(columns[i])
            columns[i] = None
            yield [scored[1] for scored in parts]


@dataclass
class BlockRecord:
    """One line of ``history_``: a block and the decision taken after it."""

    block: int
    n_estimators: int
    variation: float | None
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "n_estimators": self.n_estimators,
            "variation": self.variation,
            "seconds": self.elapsed,
        }


def run_blocks(
    backend: Backend,
    build: Callable[[int], Sequence[Any]],
    n_blocks: int,
    max_in_flight: int,
    consume: Callable[[int, Any], bool],
    on_submit: Callable[[int, Any], None] | None = None,
) -> int:
    """Run up to ``n_blocks`` blocks, consuming them in order.

    ``build(b)`` returns the graphs of block ``b``; ``on_submit(b, handle)``,
    if given, sees each block as it is submitted, in block order;
    ``consume(b, result)`` takes its computed result and returns True to
    stop. Blocks still in flight when the run stops are cancelled. Returns
    the number of blocks consumed. The loop runs at most ``n_blocks`` times.
    """
    in_flight: deque[tuple[int, Any]] = deque()
    submitted = 0
    consumed = 0

    def submit() -> None:
        nonlocal submitted
        handle = backend.submit(build(submitted))
        if on_submit is not None:
            on_submit(submitted, handle)
        in_flight.append((submitted, handle))
        submitted += 1

    try:
        while submitted < min(n_blocks, max_in_flight):
            submit()
        for _ in range(n_blocks):
            block, handle = in_flight.popleft()
            result = backend.wait(handle)
            consumed += 1
            if consume(block, result):
                break
            if submitted < n_blocks:
                submit()
    finally:
        for _, handle in in_flight:
            backend.cancel(handle)
    return consumed


def log_block(record: BlockRecord, threshold: float | None) -> None:
    if record.variation is None:
        logger.info(
            "block %d done: %d directions, %.2f s",
            record.block,
            record.n_estimators,
            record.elapsed,
        )
    else:
        logger.info(
            "block %d done: %d directions, variation %.4g (threshold %.4g), %.2f s",
            record.block,
            record.n_estimators,
            record.variation,
            threshold,
            record.elapsed,
        )
