"""A PSMI fit across three hosts made of network namespaces (issue #5).

One namespace runs ``dask scheduler``, two run a ``dask worker`` each; the
test process, in the root namespace, fits through the scheduler's address
only, and must get exactly what a local run gets. Needs root and iproute2's
``ip``; skips with the reason otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dask
import numpy as np
import pytest
from _netns import DaskHosts, NetnsHosts, recipe_path_env, unavailable_reason

from psmi_dask import PSMI
from psmi_dask.io import open_features

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HOST_NAMES = ("sched", "w1", "w2")
RECIPE = Path(__file__).resolve().parents[1] / "deploy" / "hosts" / "psmi-hosts.sh"
BLAS_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WAIT = 30.0
FIT_TIMEOUT = 60.0
CLIENT_CONFIG = {
    "distributed.comm.timeouts.connect": "10s",
    "distributed.comm.timeouts.tcp": "12s",
}
# Fixed mode, many small blocks: the fit is still running well after its
# first blocks, when the second test cuts a host off.
PARAMS = {
    "n_estimators": 3000,
    "min_n_estimators": 100,
    "random_state": 0,
    "chunk_size": 500,
}


@pytest.fixture
def start_hosts(request, tmp_path):
    """Build the three hosts and start Dask in them; torn down at the end."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)

    def start(recipe=None):
        network = NetnsHosts(HOST_NAMES)
        log_dir = tmp_path / "hosts"
        log_dir.mkdir()
        # The scheduler runs _task_counts, so this module must import there.
        cluster = DaskHosts(network, log_dir, pythonpath=(str(Path(__file__).parent),))

        def teardown():
            cluster.stop()
            errors = network.teardown()
            assert not errors, "test network teardown failed:\n" + "\n".join(errors)

        request.addfinalizer(teardown)
        network.build()
        cluster.start(timeout=WAIT, recipe=recipe)
        return cluster

    return start


@pytest.fixture
def hosts(start_hosts):
    return start_hosts()


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, size=2000)
    X = rng.normal(size=(2000, 16)) + 0.4 * y[:, None]
    return X, y


@contextmanager
def logs_on_failure(cluster):
    """Print the hosts' logs when the block fails, for the test report."""
    try:
        yield
    except BaseException:
        print(cluster.logs())
        raise


def fit_outputs(X, y):
    """psmi_mean, psmi_std and psmi_full, on the current client if any."""
    outputs = PSMI(**PARAMS).fit_transform(X, y)
    return tuple(np.asarray(output) for output in dask.compute(*outputs))


def local_outputs(X, y):
    """The reference: no client, Dask's threaded scheduler, this process."""
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:
        client = None
    assert client is None, f"the local reference would run on {client}"
    return fit_outputs(X, y)


def _connect(cluster):
    from distributed import Client

    client = Client(cluster.scheduler_address, timeout=WAIT)
    client.wait_for_workers(len(cluster.worker_hosts), timeout=WAIT)
    return client


def _worker_hosts(client):
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {info["host"] for info in workers}


def _task_counts(dask_scheduler):
    """Per worker host: tasks processing and tasks held, on the scheduler."""
    return {
        ws.host: (len(ws.processing), len(ws.has_what))
        for ws in dask_scheduler.workers.values()
    }


def _wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


class BlocksDone(logging.Handler):
    """Counts the controller's one INFO line per finished block."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self._lock_count = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("block "):
            with self._lock_count:
                self.count += 1


@contextmanager
def counting_blocks():
    logger = logging.getLogger("psmi_dask")
    handler, level = BlocksDone(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def assert_same_outputs(got, expected):
    for got_array, expected_array in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_array, expected_array)


def test_fit_across_hosts_equals_local_run(hosts, data):
    X, y = data
    expected = local_outputs(X, y)

    with (
        logs_on_failure(hosts),
        dask.config.set(CLIENT_CONFIG),
        _connect(hosts) as client,
    ):
        assert _worker_hosts(client) == {h.address for h in hosts.worker_hosts}
        got = fit_outputs(X, y)
        assert set(client.run_on_scheduler(_task_counts)) <= {
            h.address for h in hosts.worker_hosts
        }

    assert_same_outputs(got, expected)


def test_fit_survives_a_host_cut_off(hosts, data, tmp_path):
    # Features in a file that every host sees at the same path, as on a
    # shared file system: chunks lost with the host are read again.
    X, y = data
    path = tmp_path / "features.npy"
    np.save(path, X)
    features = open_features(path, chunk_rows=PARAMS["chunk_size"])
    expected = local_outputs(features, y)
    victim, survivor = hosts.worker_hosts

    with (
        logs_on_failure(hosts),
        dask.config.set(CLIENT_CONFIG),
        _connect(hosts) as client,
        counting_blocks() as blocks,
        ThreadPoolExecutor(1) as pool,
    ):
        running = pool.submit(fit_outputs, features, y)

        def under_way():
            busy, _ = client.run_on_scheduler(_task_counts).get(victim.address, (0, 0))
            return blocks.count >= 2 and busy > 0 and not running.done()

        _wait_until(under_way, WAIT, f"blocks done and work on {victim.address}")
        blocks_before_cut = blocks.count
        hosts.network.cut(victim.name)
        got = running.result(timeout=FIT_TIMEOUT)
        _wait_until(
            lambda: _worker_hosts(client) == {survivor.address},
            WAIT,
            f"the scheduler dropping {victim.address}",
        )

    assert blocks_before_cut < PARAMS["n_estimators"] // PARAMS["min_n_estimators"]
    assert_same_outputs(got, expected)


def test_hosts_recipe_runs_a_fit_with_the_cli(start_hosts, data, tmp_path):
    """deploy/hosts/psmi-hosts.sh starts the hosts and runs psmi-dask run."""
    zarr = pytest.importorskip("zarr")
    env = {**os.environ, **recipe_path_env(), **BLAS_ONE_THREAD}
    for program in ("dask", "psmi-dask"):
        if shutil.which(program, path=env["PATH"]) is None:
            pytest.skip(f"no {program} script beside {sys.executable}")
    hosts = start_hosts(recipe=RECIPE)
    X, y = data
    features, labels = tmp_path / "features.npy", tmp_path / "labels.npy"
    np.save(features, X)
    np.save(labels, y)
    options = ["--n-estimators", "1000", "--block-size", "100", "--seed", "0"]
    options += ["--chunk-rows", str(PARAMS["chunk_size"])]

    def run(argv):
        result = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=FIT_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"

    with logs_on_failure(hosts):
        run(
            [
                "psmi-dask",
                "run",
                str(features),
                str(labels),
                "-o",
                str(tmp_path / "local.zarr"),
            ]
            + options
        )
        with dask.config.set(CLIENT_CONFIG), _connect(hosts):
            pass  # both workers are up before the fit starts
        address = hosts.scheduler_address
        run(
            ["bash", str(RECIPE), "run", address, str(features), str(labels)]
            + [str(tmp_path / "remote.zarr"), *options]
        )

    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    remote = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")
    for name in ("psmi_mean", "psmi_std"):
        np.testing.assert_array_equal(remote[name][...], local[name][...])
