"""C19 at full size: tall projections on two workers of 1 GiB each.

    python tests/benchmarks/bench_c19.py [--rows 400000]

A dask X of 400,000 x 256 float32 in chunks of 20,000 rows, 2,000
directions, a LocalCluster of two single-thread workers with a 1 GiB memory
limit each (the full 400,000 x 2,000 float64 psmi matrix would take 6.4 GB).
Fits and computes psmi_mean and psmi_std, keeps psmi_full lazy, and prints
the wall time, the peak memory of each worker and whether any restarted;
then the same with X chunked along features too, and the largest relative
difference between the two.
"""

from __future__ import annotations

import argparse
import threading
import time

import dask.array as da
import numpy as np
import psutil
from distributed import Client, LocalCluster

from psmi_dask import PSMI


def features(rows: int, chunks: tuple[int, int]) -> da.Array:
    rng = da.random.default_rng(19)
    X = rng.standard_normal((rows, 256), chunks=(20_000, 256), dtype=np.float32)
    return X.rechunk(chunks)


def rss() -> int:
    return psutil.Process().memory_info().rss


def run(client: Client, X: da.Array, y: np.ndarray) -> tuple[float, np.ndarray, dict]:
    peaks: dict[str, int] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for worker, value in client.run(rss).items():
                peaks[worker] = max(peaks.get(worker, 0), value)
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    mean, std, full = PSMI(n_estimators=2000, random_state=0).fit_transform(X, y)
    mean, std = mean.compute(), std.compute()
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    assert isinstance(full, da.Array)
    return seconds, np.stack([mean, std]), peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    args = parser.parse_args()
    y = np.random.default_rng(19).integers(10, size=args.rows)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="1GiB",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(lambda: psutil.Process().pid)
        results = {}
        for name, chunks in [
            ("samples", (20_000, 256)),
            ("features too", (20_000, 64)),
        ]:
            seconds, values, peaks = run(client, features(args.rows, chunks), y)
            results[name] = values
            shown = ", ".join(f"{p / 2**30:.2f} GiB" for p in peaks.values())
            print(f"chunked along {name}: {seconds:.1f} s, peak worker memory {shown}")
        restarted = client.run(lambda: psutil.Process().pid) != pids
    a, b = results.values()
    print(f"largest relative difference: {np.max(np.abs(a - b) / np.abs(a)):.2e}")
    print(f"worker restarted: {restarted}")


if __name__ == "__main__":
    main()
