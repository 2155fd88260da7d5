"""PSMI on a Dask cluster that is already running, given its address.

Start a scheduler and workers first, for example on this machine::

    dask scheduler --port 8786 &
    dask worker tcp://127.0.0.1:8786 --nworkers 2 &

then run::

    python examples/scheduler_address.py tcp://127.0.0.1:8786

Every block of directions runs on the cluster's workers; the script only
sends the data once and receives the per-sample results. Any deployment
that gives a scheduler address works the same way (dask-jobqueue,
the Dask Kubernetes operator, dask-gateway; see ``deploy/``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from distributed import Client

from psmi_dask import PSMI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="scheduler address, such as tcp://host:8786")
    parser.add_argument("--timeout", default="10s", help="how long to try connecting")
    args = parser.parse_args()

    try:
        client = Client(args.address, timeout=args.timeout)
    except OSError as error:
        raise SystemExit(
            f"could not reach a scheduler at {args.address} ({error}); "
            f"start one with `dask scheduler` or check the address."
        ) from error

    with client:
        workers = client.scheduler_info()["workers"]
        print(f"connected to {args.address}: {len(workers)} workers")
        rng = np.random.default_rng(0)
        y = rng.integers(0, 5, size=20_000)
        centres = rng.standard_normal((5, 128))
        X = rng.standard_normal((20_000, 128)) + centres[y]

        start = time.perf_counter()
        estimator = PSMI(max_n_estimators=10_000, random_state=0)
        psmi_mean, _, _ = estimator.fit_transform(X, y)
        seconds = time.perf_counter() - start

    print(
        f"{estimator.n_estimators_} directions, rule met: {estimator.converged_}, "
        f"{seconds:.1f} s"
    )
    print(f"mean PSMI {psmi_mean.mean():.4f} nats; lowest: {np.argsort(psmi_mean)[:5]}")


if __name__ == "__main__":
    main()
