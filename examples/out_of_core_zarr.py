"""PSMI of features stored in zarr, without loading them into memory.

Writes a zarr array of Gaussian-mixture features (10 classes) if it is not
there yet, opens it lazily with :func:`psmi_dask.io.open_features`, fits PSMI
with a fixed number of directions on a LocalCluster of two workers with a
memory limit, and writes psmi_mean, psmi_std and psmi_full to a zarr group
chunk by chunk: no process ever holds the features or psmi_full whole.

Run it with::

    python examples/out_of_core_zarr.py --rows 200000 --features 256

It needs the ``io`` extra: ``pip install 'psmi_dask[io]'``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zarr
from distributed import Client, LocalCluster

from psmi_dask import PSMI
from psmi_dask.io import open_features, save_results


def write_features(path: Path, rows: int, features: int, chunk_rows: int) -> None:
    """Write features and labels, one stored chunk at a time."""
    group = zarr.open_group(str(path), mode="w")
    X = group.create_array(
        "X", shape=(rows, features), chunks=(chunk_rows, features), dtype="float32"
    )
    y = group.create_array("y", shape=(rows,), chunks=(chunk_rows,), dtype="int64")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, features)).astype(np.float32)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        labels = rng.integers(0, 10, size=stop - start)
        noise = rng.standard_normal((stop - start, features), dtype=np.float32)
        X[start:stop] = centres[labels] * 0.3 + noise
        y[start:stop] = labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("psmi_example_data.zarr"))
    parser.add_argument("--out", type=Path, default=Path("psmi_example_results.zarr"))
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--directions", type=int, default=1_000)
    parser.add_argument("--memory-limit", default="2GiB")
    args = parser.parse_args()

    if not args.data.exists():
        print(f"writing {args.rows:,} x {args.features} float32 to {args.data}")
        write_features(args.data, args.rows, args.features, chunk_rows=10_000)

    X = open_features(args.data, dataset="X")
    y = zarr.open_group(str(args.data), mode="r")["y"][...]
    print(
        f"X: {X.shape}, chunks of {X.chunks[0][0]:,} rows ({X.nbytes / 2**30:.2f} GiB)"
    )

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, memory_limit=args.memory_limit
        ) as cluster,
        Client(cluster) as client,
    ):
        print(f"dashboard: {client.dashboard_link}")
        start = time.perf_counter()
        estimator = PSMI(n_estimators=args.directions, random_state=0)
        psmi_mean, psmi_std, psmi_full = estimator.fit_transform(X, y)
        save_results(args.out, psmi_mean, psmi_std, psmi_full, overwrite=True)
        seconds = time.perf_counter() - start

    stored = zarr.open_group(str(args.out), mode="r")
    print(f"wrote {args.out}: psmi_full {stored['psmi_full'].shape} in {seconds:.1f} s")
    print(f"lowest PSMI samples: {np.argsort(stored['psmi_mean'][...])[:10]}")


if __name__ == "__main__":
    main()
