"""Benchmark: PSMI of a zarr array larger than the workers' memory.

Writes (once) a zarr group holding X, float32 of shape (rows, features), and
labels y of ``classes`` classes; then, on a LocalCluster of two workers with
a memory limit of 2 GiB each, times

1. a plain Dask pass over X (``X.sum().compute()``), the reading baseline;
2. PSMI with a fixed number of directions (500 by default), computing
   psmi_mean and psmi_std (psmi_full stays lazy);

while a thread polls the resident memory of every worker process. It
prints the peak memory of each worker, checks that no worker restarted and
that the peak stayed under the limit, and prints the throughput of PSMI
against the plain pass. It exits with status 1 if a check fails.

The full size (2,000,000 x 1,024 float32, about 8 GB) takes a while to
write; try it smaller first::

    python tests/benchmarks/bench_out_of_core.py --rows 200000

The array is kept for later runs at ``--path`` (by default under /tmp) and
rewritten only if its shape differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import psutil
import zarr
from dask.utils import format_bytes, parse_bytes
from distributed import Client, LocalCluster

from psmi_dask import PSMI
from psmi_dask.io import open_features, package_versions


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--path", type=Path, default=Path("/tmp/psmi_dask_bench_out_of_core.zarr")
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=1_024)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--directions", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--memory-limit", default="2GiB")
    parser.add_argument(
        "--stored-rows", type=int, default=16_384, help="rows per stored chunk"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=None, help="rows per dask chunk to read"
    )
    parser.add_argument("--interval", type=float, default=0.25, help="poll seconds")
    return parser.parse_args()


def write_data(args: argparse.Namespace) -> None:
    """Write a Gaussian mixture to ``args.path``, one stored chunk at a time."""
    group = zarr.open_group(str(args.path), mode="w")
    X = group.create_array(
        "X",
        shape=(args.rows, args.features),
        chunks=(args.stored_rows, args.features),
        dtype="float32",
    )
    y = group.create_array(
        "y", shape=(args.rows,), chunks=(args.stored_rows,), dtype="int32"
    )
    centres = np.random.default_rng(0).standard_normal((args.classes, args.features))
    centres = (0.1 * centres).astype(np.float32)
    started = time.perf_counter()
    for index, start in enumerate(range(0, args.rows, args.stored_rows)):
        stop = min(start + args.stored_rows, args.rows)
        rng = np.random.default_rng([1, index])
        labels = rng.integers(0, args.classes, size=stop - start)
        values = rng.standard_normal((stop - start, args.features), dtype=np.float32)
        values += centres[labels]
        X[start:stop] = values
        y[start:stop] = labels
        if index % 20 == 0:
            print(f"  wrote {stop:,} / {args.rows:,} rows", flush=True)
    group.attrs["complete"] = True
    print(f"wrote {args.path} in {time.perf_counter() - started:.0f} s")


def data_present(args: argparse.Namespace) -> bool:
    if not args.path.exists():
        return False
    try:
        group = zarr.open_group(str(args.path), mode="r")
        shape = group["X"].shape
        complete = bool(group.attrs.get("complete", False))
    except (KeyError, FileNotFoundError, ValueError):
        return False
    return complete and shape == (args.rows, args.features)


def worker_rss() -> int:
    return psutil.Process().memory_info().rss


class MemoryPoller:
    """Poll every worker's resident memory in a thread; keep the peaks."""

    def __init__(self, client: Client, interval: float) -> None:
        self.client = client
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.pids: dict[str, set[int]] = {}
        self.seen_workers: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.client.run(worker_rss)
                pids = self.client.run(os.getpid)
            except Exception:  # a worker going away mid-poll; next poll sees it
                rss, pids = {}, {}
            for worker, value in rss.items():
                self.peaks[worker] = max(self.peaks.get(worker, 0), value)
            for worker, pid in pids.items():
                self.pids.setdefault(worker, set()).add(pid)
            self.seen_workers.update(rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def timed(label: str, function: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.1f} s", flush=True)
    return value, seconds


def main() -> int:
    args = parse_args()
    if not data_present(args):
        size = format_bytes(args.rows * args.features * 4)
        print(
            f"writing {args.rows:,} x {args.features} float32 ({size}) to {args.path}"
        )
        write_data(args)

    X = open_features(args.path, dataset="X", chunk_rows=args.chunk_rows)
    y = zarr.open_group(str(args.path), mode="r")["y"][...]
    limit = parse_bytes(args.memory_limit)
    print(
        f"X {X.shape} {X.dtype}, {format_bytes(X.nbytes)}, dask chunks of "
        f"{X.chunks[0][0]:,} rows; {args.workers} workers x "
        f"{args.threads_per_worker} threads, memory_limit={args.memory_limit}; "
        f"{args.directions} directions"
    )
    print(f"versions: {package_versions(('zarr',))}")

    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        start_pids = client.run(os.getpid)
        with MemoryPoller(client, args.interval) as poller:
            _, plain_first = timed("plain pass X.sum() (first)", X.sum().compute)
            _, plain = timed("plain pass X.sum() (second)", X.sum().compute)
            estimator = PSMI(n_estimators=args.directions, random_state=0)

            def fit() -> Any:
                psmi_mean, psmi_std, _ = estimator.fit_transform(X, y)
                return dask.compute(psmi_mean, psmi_std)

            (psmi_mean, _), fitted = timed("PSMI fit + psmi_mean/std", fit)
            _, plain_after = timed("plain pass X.sum() (after)", X.sum().compute)
        end_pids = client.run(os.getpid)

    # A restarted worker comes back with a new process id and a new address.
    restarted = (
        start_pids != end_pids
        or any(len(pids) > 1 for pids in poller.pids.values())
        or len(poller.seen_workers) != args.workers
    )
    peak = max(poller.peaks.values())
    gigabytes = X.nbytes / 1e9
    print()
    for worker, value in sorted(poller.peaks.items()):
        share = f"{value / limit:.0%} of the limit"
        print(f"peak memory {worker}: {format_bytes(value)} ({share})")
    print(f"worker restarted: {'YES' if restarted else 'no'}")
    print(f"plain pass: {gigabytes / plain:.2f} GB/s ({args.rows / plain:,.0f} rows/s)")
    print(
        f"PSMI, {args.directions} directions: {gigabytes / fitted:.2f} GB/s "
        f"({args.rows / fitted:,.0f} rows/s), {fitted / plain:.1f} x the plain "
        f"pass (plain passes: {plain_first:.1f} s first, {plain:.1f} s second, "
        f"{plain_after:.1f} s after)"
    )
    print(
        f"psmi_mean: finite {np.isfinite(psmi_mean).all()}, mean {psmi_mean.mean():.4f}"
    )

    failed = restarted or peak >= limit or not np.isfinite(psmi_mean).all()
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
