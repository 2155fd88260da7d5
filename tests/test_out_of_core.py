"""C19 at a size CI can afford: tall projections on workers with small memory."""

from __future__ import annotations

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster
from numpy.testing import assert_allclose

from psmi_dask import PSMI

N_SAMPLES, N_FEATURES, N_DIRECTIONS = 60_000, 64, 1200
# The full psmi matrix would take N_SAMPLES x N_DIRECTIONS x 8 = 576 MB, more
# than both workers may hold together. A worker process takes about 100 MiB
# before any task (Python, numpy, distributed): 160 MiB left too little room
# and the nanny sometimes restarted one.
MEMORY_LIMIT = "256MiB"


def _features(chunks):
    rng = da.random.default_rng(19)
    X = rng.standard_normal((N_SAMPLES, N_FEATURES), chunks=(5_000, N_FEATURES))
    return X.astype(np.float32).rechunk(chunks)


def test_c19_tall_projections_finish_within_worker_memory():
    labels = np.random.default_rng(19).integers(10, size=N_SAMPLES)
    kwargs = dict(n_estimators=N_DIRECTIONS, min_n_estimators=200, random_state=0)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=MEMORY_LIMIT,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(lambda: __import__("os").getpid())
        mean, std, full = PSMI(**kwargs).fit_transform(
            _features((5_000, N_FEATURES)), labels
        )
        assert isinstance(full, da.Array) and full.shape == (N_SAMPLES, N_DIRECTIONS)
        mean, std = mean.compute(), std.compute()
        split = PSMI(**kwargs).fit_transform(_features((7_000, 16)), labels)
        assert_allclose(split[0].compute(), mean, rtol=1e-10, atol=0)
        assert_allclose(split[1].compute(), std, rtol=1e-10, atol=0)
        assert client.run(lambda: __import__("os").getpid()) == pids
    assert np.all(np.isfinite(mean)) and np.all(std > 0)
