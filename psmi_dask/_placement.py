"""Where the work runs, and how the data gets there.

With a distributed client (the current one, as dask-ml's estimators find
it), blocks run on its workers: numpy features are scattered once, in runs
of chunks, one run per worker thread, and dask features are persisted when
they fit in the workers' memory, so no block's graph carries the data.
Without a client, blocks run on Dask's threaded scheduler in this process
and chunks are views.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np

from psmi_dask._blocks import ChunkedData
from psmi_dask._controller import Backend, LocalBackend
from psmi_dask.exceptions import SchedulerLostError, WorkersLostError

__all__ = [
    "DistributedBackend",
    "SchedulerLostError",
    "WorkersLostError",
    "backend_for",
    "chunk_ranges",
    "current_client",
    "default_in_flight",
    "ensure_a_running_worker",
    "place",
    "run_with_retries",
    "as_dask",
    "share",
]

logger = logging.getLogger(__name__)

# Dask features are persisted on the cluster when they take at most this
# fraction of the workers' memory; larger ones are read anew by each block.
_PERSIST_FRACTION = 0.25


def current_client() -> Any:
    """The current distributed client, or None.

    A client can only exist once ``distributed`` is imported; not importing
    it here saves half a second on every cold start without a cluster.

    A fit inside a task on a worker runs in that task, on the worker's own
    threads: waiting there for blocks of its own would hold the very thread
    they need, and a worker of one thread would wait forever. A task that
    has left the worker's pool (``distributed.worker_client`` or
    ``secede``) may use the cluster like any client.
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import get_client

    if _in_a_worker_task():
        return None
    try:
        return get_client()
    except ValueError:
        return None


def _in_a_worker_task() -> bool:
    from distributed import get_worker
    from distributed.threadpoolexecutor import thread_state

    try:
        get_worker()
    except ValueError:
        return False
    # The worker's pool sets ``proceed`` on its threads; secede clears it.
    return bool(getattr(thread_state, "proceed", True))


def ensure_a_running_worker() -> None:
    """On a cluster, wait for a worker that can take tasks (see below)."""
    client = current_client()
    if client is not None:
        _wait_for_a_running_worker(client)


def _wait_for_a_running_worker(client: Any) -> None:
    """Return once a worker can take tasks; raise TimeoutError if none does.

    With no worker, or with every worker paused (its memory past the pause
    threshold), submitted blocks would wait forever. Workers still starting
    are waited for as long as a connection would be.
    """
    import dask
    from dask.utils import parse_timedelta

    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info()["workers"].values()
        if any(worker.get("status") == "running" for worker in workers):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    address = client.scheduler.address if client.scheduler else "unknown"
    if not workers:
        raise TimeoutError(
            f"the Dask cluster at {address} has no workers (waited {timeout:g} "
            f"s); start some, such as `dask worker {address}`, or connect to "
            "another scheduler."
        )
    raise TimeoutError(
        f"every worker of the Dask cluster at {address} is paused (waited "
        f"{timeout:g} s): its memory is past the pause threshold of its "
        "limit (distributed.worker.memory.pause), so it runs no task; give "
        "the workers more memory, or restart them."
    )


class DistributedBackend:
    """Blocks as futures on a distributed cluster.

    Per-sample state is merged by small tasks on the workers; only the
    block fits (directions and Gaussians) and scalars reach the client.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        _wait_for_a_running_worker(client)
        nthreads = client.nthreads()
        self.n_threads = max(1, sum(nthreads.values()))
        # Results straight from the workers when they are surely reachable:
        # through the scheduler, every byte is received and sent once more.
        self.direct = _direct(client, list(nthreads))
        self._futures: list[Any] = []

    def submit(self, graphs: Sequence[Any]) -> Any:
        head, per_chunk = graphs
        # A new scheduler generation per block, so that blocks run in the
        # order they were submitted: block b finishes first instead of all
        # blocks in flight finishing together, and the next one is submitted
        # while a thread still has work.
        return self.client.compute([head, *per_chunk], fifo_timeout=0)

    def wait(self, handle: Any) -> Any:
        return self.client.gather(handle[0], direct=self.direct), handle[1:]

    def start(self, graph: Any) -> Any:
        """Compute ``graph`` now; a block's graph can take the future."""
        return self.client.compute(graph, fifo_timeout=0)

    def cancel(self, handle: Any) -> None:
        # Releasing, rather than Client.cancel, lets the scheduler forget
        # tasks not yet run, without racing the graph's own registration.
        for future in handle:
            future.release()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        future = self.client.submit(function, *args, priority=10)
        self._futures.append(future)
        return future

    def fetch(self, reference: Any) -> Any:
        return reference.result() if hasattr(reference, "result") else reference

    def gather(self, references: Sequence[Any]) -> list[Any]:
        return list(self.client.gather(list(references), direct=self.direct))

    def close(self) -> None:
        # Dropping the last reference to a future releases it on the cluster.
        self._futures.clear()


def default_in_flight() -> int:
    """Blocks kept in flight when the user does not say.

    One per core without a cluster. On a cluster, two per worker thread:
    each block waits on the scheduler between its passes, and a second one
    keeps the thread busy meanwhile.
    """
    client = current_client()
    if client is None:
        return os.cpu_count() or 1
    return 2 * max(1, sum(client.nthreads().values()))


def backend_for(max_in_flight: int) -> Backend:
    """The backend blocks run on: the current client's cluster, or local."""
    client = current_client()
    if client is None:
        return LocalBackend(max_in_flight)
    return DistributedBackend(client)


_ATTEMPTS = 3


def _lost_data(error: BaseException) -> bool:
    try:
        from distributed.client import FutureCancelledError
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(error, FutureCancelledError)


def _scheduler_gone(client: Any, error: BaseException) -> bool:
    """Whether ``error`` came of the client losing its scheduler.

    A call to the scheduler (gathering results asks it where they are) can
    fail on the closed connection a moment before the client notices and
    leaves the "running" state; such an error waits for it, briefly. Other
    OSErrors (a file a task could not read) are not waited on.
    """
    from distributed.comm.core import CommClosedError

    if not (_lost_data(error) or isinstance(error, OSError)):
        return False
    if "connection-lost" in str(error):
        return True
    wait = 5.0 if isinstance(error, CommClosedError) else 0.0
    deadline = time.monotonic() + wait
    while True:
        if client.status != "running":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def run_with_retries(work: Callable[[Backend], Any], max_in_flight: int) -> Any:
    """Run ``work(backend)``, again from the start if the cluster lost data.

    A worker that dies takes scattered chunks and per-sample state with it;
    since every result is a pure function of the data, the parameters and
    the seed, running the work again gives the same bits. A scheduler that
    goes away ends the run with a SchedulerLostError.
    """
    for attempt in range(1, _ATTEMPTS + 1):
        backend = backend_for(max_in_flight)
        try:
            return work(backend)
        except Exception as error:
            if not isinstance(backend, DistributedBackend):
                raise
            client = backend.client
            if _scheduler_gone(client, error):
                raise SchedulerLostError(
                    f"Lost the connection to the Dask scheduler at "
                    f"{client.scheduler.address if client.scheduler else 'unknown'} "
                    "during the run; the estimator is left as it was before. "
                    "Connect a new Client and run again."
                ) from error
            if not _lost_data(error):
                raise
            if attempt == _ATTEMPTS:
                raise WorkersLostError(
                    f"the cluster lost data of this run {_ATTEMPTS} times: its "
                    "workers died or were restarted (a worker past its memory "
                    "limit is restarted; its log says so). Give the workers "
                    "more memory, or lower min_n_estimators or chunk_size, "
                    f"and run again ({error})."
                ) from error
            logger.warning(
                "the cluster lost data of this run (%s); running it again "
                "(attempt %d of %d)",
                error,
                attempt + 1,
                _ATTEMPTS,
            )
        finally:
            backend.close()
    raise AssertionError("unreachable")  # pragma: no cover


def as_dask(backend: Backend, values: np.ndarray, sizes: Sequence[int]) -> da.Array:
    """A dask array of ``values`` in chunks of ``sizes`` along axis 0.

    On a cluster the chunks are scattered, so that the array's graph holds
    futures, not the data.
    """
    if not isinstance(backend, DistributedBackend):
        return da.from_array(values, chunks=(tuple(sizes),) + values.shape[1:])
    starts = np.cumsum([0, *sizes[:-1]])
    parts = backend.client.scatter(
        [values[s : s + n] for s, n in zip(starts, sizes)], hash=False
    )
    return da.concatenate(
        [
            da.from_delayed(part, shape=(n, *values.shape[1:]), dtype=values.dtype)
            for part, n in zip(parts, sizes)
        ]
    )


def share(backend: Backend, value: Any) -> Any:
    """``value`` as an argument of many tasks: scattered once on a cluster."""
    if not isinstance(backend, DistributedBackend):
        return value
    [future] = backend.client.scatter([value], broadcast=True, hash=False)
    return future


def _rechunked(features: Any, rows: int) -> da.Array | np.ndarray:
    if isinstance(features, da.Array):
        return features.rechunk({0: rows, 1: -1})
    return features


def _bounds(n_samples: int, rows: int) -> tuple[list[int], list[int]]:
    starts = list(range(0, n_samples, rows))
    sizes = [min(rows, n_samples - start) for start in starts]
    return starts, sizes


def _worker_memory(client: Any) -> float:
    limits = [
        w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()
    ]
    return float(sum(limits)) or float("inf")


def place(
    backend: Backend,
    features: Any,
    codes: np.ndarray,
    rows: int,
    offset: np.ndarray,
) -> ChunkedData:
    """Split features and codes into chunks of ``rows`` samples.

    The chunking depends on ``rows`` only, never on the input's chunks.
    """
    n_samples, n_features = features.shape
    starts, sizes = _bounds(n_samples, rows)
    X = _rechunked(features, rows)
    code_chunks = [codes[s : s + n] for s, n in zip(starts, sizes)]
    if isinstance(backend, DistributedBackend):
        return _place_on_cluster(backend, X, code_chunks, starts, sizes, offset)
    if isinstance(X, da.Array):
        feature_chunks = list(X.to_delayed().ravel())
    else:
        X = da.from_array(X, chunks=(rows, -1), name=False)
        feature_chunks = list(X.to_delayed().ravel())
    return ChunkedData(feature_chunks, code_chunks, starts, sizes, offset, n_features)


def _place_on_cluster(
    backend: DistributedBackend,
    X: Any,
    code_chunks: list[np.ndarray],
    starts: list[int],
    sizes: list[int],
    offset: np.ndarray,
) -> ChunkedData:
    client = backend.client
    if not isinstance(X, da.Array):
        return _scatter_chunks(backend, X, code_chunks, starts, sizes, offset)
    if X.nbytes <= _PERSIST_FRACTION * _worker_memory(client):
        X = client.persist(X)
        # The persisted array owns the futures of its chunks.
        backend._futures.append(X)
    feature_chunks: list[Any] = list(X.to_delayed().ravel())
    code_futures = client.scatter(code_chunks, hash=False)
    [offset_future] = client.scatter([offset], broadcast=True, hash=False)
    backend._futures.extend([*code_futures, offset_future])
    return ChunkedData(
        feature_chunks, code_futures, starts, sizes, offset_future, X.shape[1]
    )


def chunk_ranges(n_chunks: int, nthreads: dict[str, int]) -> list[tuple[str, int, int]]:
    """Contiguous runs of chunks, one per worker thread: (worker, first, stop).

    Runs differ in length by one chunk at most; threads are dealt out across
    workers first, so that with fewer chunks than threads every worker still
    gets a run.
    """
    slots = [
        worker
        for rank in range(max(nthreads.values()))
        for worker in sorted(nthreads)
        if nthreads[worker] > rank
    ]
    n_ranges = min(len(slots), n_chunks)
    bounds = [i * n_chunks // n_ranges for i in range(n_ranges + 1)]
    return [(slots[i], bounds[i], bounds[i + 1]) for i in range(n_ranges)]


def _is_loopback(address: str) -> bool:
    from distributed.comm import get_address_host, parse_address

    if parse_address(address)[0] == "inproc":
        return True
    host = get_address_host(address)
    return host in ("localhost", "::1") or host.startswith("127.")


def _direct(client: Any, workers: Sequence[str]) -> bool:
    """Whether to send data to the workers and fetch results from them
    directly, rather than through the scheduler, which then receives and
    sends every byte once more.

    The client's own setting wins; otherwise only on loopback addresses, the
    one case where the workers are surely reachable from the client (a
    cluster behind a gateway or a firewall often has them unreachable).
    """
    if client.direct_to_workers is not None:
        return bool(client.direct_to_workers)
    return all(_is_loopback(a) for a in [client.scheduler.address, *workers])


def _scatter_chunks(
    backend: DistributedBackend,
    X: np.ndarray,
    code_chunks: list[np.ndarray],
    starts: list[int],
    sizes: list[int],
    offset: np.ndarray,
) -> ChunkedData:
    """Send each run of chunks, with its codes, to the worker that works on it.

    The features and codes of a chunk then sit on the same worker, and a run
    is one task per block with no transfer of features.
    """
    client = backend.client
    ranges = chunk_ranges(len(sizes), client.nthreads())
    workers = sorted({worker for worker, _, _ in ranges})
    direct = backend.direct
    n_chunks = len(sizes)
    futures: list[Any] = [None] * (2 * n_chunks)
    offset_future = None
    for worker in workers:
        ids = [i for w, a, b in ranges if w == worker for i in range(a, b)]
        values = [X[starts[i] : starts[i] + sizes[i]] for i in ids]
        values += [code_chunks[i] for i in ids]
        # The offset goes once, with the first batch: a few kilobytes that
        # the other workers fetch with their first task.
        extra = [offset] if offset_future is None else []
        sent = client.scatter(
            values + extra, workers=[worker], direct=direct, hash=False
        )
        for i, feature, code in zip(ids, sent, sent[len(ids) :]):
            futures[i], futures[n_chunks + i] = feature, code
        if extra:
            offset_future = sent[-1]
        backend._futures.extend(sent)
    return ChunkedData(
        futures[:n_chunks],
        futures[n_chunks:],
        starts,
        sizes,
        offset_future,
        X.shape[1],
        ranges=[(a, b) for _, a, b in ranges],
    )
