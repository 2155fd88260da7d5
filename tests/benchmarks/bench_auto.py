"""Auto mode: psmi 0.2.0 against psmi_dask on a two-worker LocalCluster.

    python tests/benchmarks/bench_auto.py [--psmi-timeout 300] [--repeats 3]
        [--fixed-only]

On scikit-learn's digits and on a 10-class Gaussian mixture of 10,000 x 512,
in one run: wall time and directions used by psmi 0.2.0's auto mode and by
psmi_dask's (orthogonal directions, on a LocalCluster of two single-thread
workers), and the ratios. Then a fixed-mode fit (fit only, as the goal is
stated) of 2,000 and of 10,000 directions on the mixture, on one worker
against two, as the median of --repeats fits.
psmi 0.2.0 runs in a child process stopped after --psmi-timeout seconds
(shown as inf: it had not stopped).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import warnings
from typing import Any

import numpy as np
from distributed import Client, LocalCluster

from psmi_dask import PSMI, ConvergenceWarning


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float64), data.target


def mixture() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(10, size=10_000)
    centres = rng.normal(size=(10, 512)) * 0.35
    return rng.normal(size=(10_000, 512)) + centres[y], y


def _psmi_child(X: np.ndarray, y: np.ndarray, out: Any) -> None:
    import psmi

    np.random.seed(0)
    est = psmi.PSMI()
    start = time.perf_counter()
    est.fit_transform(X, y)
    out.put((time.perf_counter() - start, est.n_estimators))


def run_psmi(X: np.ndarray, y: np.ndarray, timeout: float) -> tuple[float, int]:
    """psmi 0.2.0's auto mode, in a process stopped after ``timeout`` s.

    psmi 0.2.0 has no cap: on weakly separated classes it may never stop.
    """
    queue: Any = multiprocessing.Queue()
    child = multiprocessing.Process(target=_psmi_child, args=(X, y, queue))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return float("inf"), 0
    return queue.get()


def run_ours(
    X: np.ndarray, y: np.ndarray, method: str = "fit_transform", **kwargs: Any
) -> tuple[float, int, object]:
    est = PSMI(random_state=0, **kwargs)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        getattr(est, method)(X, y)
    return time.perf_counter() - start, est.n_estimators_, est.converged_


def cluster(n_workers: int) -> tuple[LocalCluster, Client]:
    c = LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None)
    return c, Client(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--psmi-timeout",
        type=float,
        default=300,
        help="seconds after which psmi 0.2.0's run counts as not stopping",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fixed-mode fits per cluster size; the median is printed",
    )
    parser.add_argument(
        "--fixed-only",
        action="store_true",
        help="only the fixed-mode fits on one worker against two",
    )
    args = parser.parse_args()
    datasets = {"digits": digits(), "mixture 10000x512": mixture()}
    if not args.fixed_only:
        compare_auto(datasets, args.psmi_timeout)
    fixed_speed_up(*datasets["mixture 10000x512"], args.repeats)


def compare_auto(datasets: dict[str, Any], psmi_timeout: float) -> None:
    print(
        f"{'data':>18} {'psmi s':>8} {'psmi dirs':>9} {'ours s':>8} "
        f"{'ours dirs':>9} {'met':>5} {'time ratio':>10} {'dirs ratio':>10}"
    )
    for name, (X, y) in datasets.items():
        psmi_s, psmi_n = run_psmi(X, y, psmi_timeout)
        lc, client = cluster(2)
        with lc, client:
            run_ours(X[:200], y[:200], n_estimators=500)  # warm the workers
            ours_s, ours_n, met = run_ours(X, y)
        # psmi 0.2.0 stopped by the timeout used no known number of directions.
        dirs_ratio = f"{ours_n / psmi_n:>10.2f}" if psmi_n else f"{'n/a':>10}"
        print(
            f"{name:>18} {psmi_s:>8.2f} {psmi_n:>9} {ours_s:>8.2f} {ours_n:>9} "
            f"{met!s:>5} {psmi_s / ours_s:>9.1f}x {dirs_ratio}"
        )


def fixed_speed_up(X: np.ndarray, y: np.ndarray, repeats: int) -> None:
    for n_directions in (2000, 10000):
        seconds = {}
        for n_workers in (1, 2):
            lc, client = cluster(n_workers)
            with lc, client:
                run_ours(X[:200], y[:200], n_estimators=500)
                seconds[n_workers] = float(
                    np.median(
                        [
                            run_ours(X, y, "fit", n_estimators=n_directions)[0]
                            for _ in range(repeats)
                        ]
                    )
                )
        print(
            f"fixed-mode fit, {n_directions} directions (median of {repeats}): "
            f"1 worker {seconds[1]:.2f} s, 2 workers {seconds[2]:.2f} s, "
            f"speed-up {seconds[1] / seconds[2]:.2f}x"
        )


if __name__ == "__main__":
    main()
