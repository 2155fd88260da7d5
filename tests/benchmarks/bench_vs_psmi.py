"""psmi 0.2.0 against psmi_dask, fixed mode, on the same data in one run.

    python tests/benchmarks/bench_vs_psmi.py [--repeats 3]

10,000 samples, 512 features, 10 classes; 500 and 2,000 directions; both
estimators compute ``fit_transform`` with psmi_full as numpy. Each
measurement runs in a fresh process: wall time without tracing, then peak
memory as the peak of traced allocations (numpy reports its buffers to
tracemalloc). Prints both figures and the ratios psmi / psmi_dask.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

N_SAMPLES, N_FEATURES, N_CLASSES = 10_000, 512, 10

CHILD = r"""
import json, sys, time, tracemalloc
import numpy as np
kind, n_estimators, trace = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rng = np.random.default_rng(0)
y = rng.integers({n_classes}, size={n_samples})
X = rng.normal(size=({n_samples}, {n_features})) + 0.05 * y[:, None]
if kind == "psmi":
    from psmi import PSMI
    np.random.seed(0)
    est = PSMI(n_estimators=n_estimators)
else:
    from psmi_dask import PSMI
    est = PSMI(n_estimators=n_estimators, random_state=0)
if trace:
    tracemalloc.start()
start = time.perf_counter()
mean, std, full = est.fit_transform(X, y)
seconds = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1] if trace else 0
assert full.shape == ({n_samples}, n_estimators)
print(json.dumps({{"seconds": seconds, "peak": peak}}))
""".format(n_samples=N_SAMPLES, n_features=N_FEATURES, n_classes=N_CLASSES)


def measure(kind: str, n_estimators: int, trace: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(n_estimators), "1" if trace else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"fixed mode, fit_transform, {N_SAMPLES} x {N_FEATURES}, {N_CLASSES} classes")
    print(
        f"{'directions':>10} {'psmi s':>8} {'ours s':>8} {'speed-up':>9} "
        f"{'psmi MB':>8} {'ours MB':>8} {'mem ratio':>9}"
    )
    for n_estimators in (500, 2000):
        times = {
            kind: min(
                measure(kind, n_estimators, False)["seconds"]
                for _ in range(args.repeats)
            )
            for kind in ("psmi", "psmi_dask")
        }
        peaks = {
            kind: measure(kind, n_estimators, True)["peak"] / 2**20
            for kind in ("psmi", "psmi_dask")
        }
        print(
            f"{n_estimators:>10} {times['psmi']:>8.2f} {times['psmi_dask']:>8.2f} "
            f"{times['psmi'] / times['psmi_dask']:>8.2f}x "
            f"{peaks['psmi']:>8.0f} {peaks['psmi_dask']:>8.0f} "
            f"{peaks['psmi'] / peaks['psmi_dask']:>8.2f}x"
        )


if __name__ == "__main__":
    main()
