"""PSMI on distributed clusters: the same bits as on the threaded scheduler."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import (  # noqa: F401 - pytest fixtures
    cleanup,
    client,
    cluster_fixture,
    loop,
    loop_in_thread,
)
from numpy.testing import assert_array_equal

from psmi_dask import PSMI, ConvergenceWarning, SchedulerLostError

KWARGS = dict(min_n_estimators=60, random_state=3, chunk_size=256)


def _data(seed=0, n=1500, d=12, n_classes=4, gap=0.4):
    rng = np.random.default_rng(seed)
    y = rng.integers(n_classes, size=n)
    return rng.normal(size=(n, d)) + gap * y[:, None], y


def _weak_data():
    return _data(seed=1, gap=0.01)


@pytest.fixture(scope="module")
def reference():
    X, y = _data()
    return X, y, PSMI(**KWARGS, max_n_estimators=1200).fit_transform(X, y)


FIXED = dict(KWARGS, n_estimators=150)


def _fitted(est):
    return est.directions_, est.projection_means_, est.projection_stds_


@pytest.fixture(scope="module")
def fixed_reference():
    """A fixed-mode fit, without scores, on the threaded scheduler."""
    X, y = _data()
    return _fitted(PSMI(**FIXED).fit(X, y))


def _assert_same(got, expected):
    for a, b in zip(got, expected):
        assert_array_equal(np.asarray(a), b)


def test_utils_test_client_gives_the_threaded_bits(client, reference):  # noqa: F811
    X, y, expected = reference
    _assert_same(PSMI(**KWARGS, max_n_estimators=1200).fit_transform(X, y), expected)


@pytest.mark.parametrize("n_workers, threads", [(1, 1), (2, 1), (1, 2)])
def test_local_clusters_give_the_threaded_bits(
    reference, fixed_reference, n_workers, threads
):
    X, y, expected = reference
    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=threads, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        est = PSMI(**KWARGS, max_n_estimators=1200)
        _assert_same(est.fit_transform(X, y), expected)
        _assert_same(est.transform(X, y), expected)
        _assert_same(_fitted(PSMI(**FIXED).fit(X, y)), fixed_reference)
        _wait_no_tasks(c)


def _fit_in_a_task(X, y):
    return PSMI(**KWARGS, max_n_estimators=1200).fit_transform(X, y)


def _fit_having_seceded(X, y):
    from distributed import worker_client

    from psmi_dask._placement import current_client

    with worker_client():
        assert current_client() is not None  # the blocks go to the cluster
        return _fit_in_a_task(X, y)


@pytest.mark.parametrize("task", [_fit_in_a_task, _fit_having_seceded])
def test_a_fit_inside_a_task_on_a_worker_of_one_thread_finishes(reference, task):
    # Waiting in the task for blocks of its own once held the only thread.
    X, y, expected = reference
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        futures = [c.submit(task, X, y, pure=False) for _ in range(2)]
        for future in futures:
            _assert_same(future.result(timeout=60), expected)


@pytest.mark.parametrize("paused", [False, True])
def test_a_cluster_with_no_worker_able_to_run_is_a_clear_error(paused):
    # No worker, or only paused ones: blocks once waited forever (or failed
    # on an empty max()).
    X, y = _data(n=200)
    config = {"distributed.comm.timeouts.connect": "2s"}
    if paused:  # every worker past its pause threshold from the start
        config["distributed.worker.memory.pause"] = 0.01
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=int(paused), memory_limit="1GiB", dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        while paused and not all(
            worker["status"] == "paused"
            for worker in c.scheduler_info()["workers"].values()
        ):
            time.sleep(0.05)
        started = time.monotonic()
        match = "is paused" if paused else "has no workers"
        with pytest.raises(TimeoutError, match=rf"Dask cluster at .* {match}"):
            PSMI(n_estimators=50).fit(X, y)
        assert time.monotonic() - started < 30


def test_data_lost_on_every_attempt_is_one_clear_error():
    # Workers restarted over and over (memory) once ended in a raw
    # FutureCancelledError traceback.
    from distributed.client import FutureCancelledError

    from psmi_dask import WorkersLostError
    from psmi_dask._placement import run_with_retries

    attempts = []

    def work(backend):
        attempts.append(backend)
        raise FutureCancelledError("block-0", "already forgotten")

    with (
        LocalCluster(n_workers=1, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        with pytest.raises(WorkersLostError, match=r"lost data of this run 3 times"):
            run_with_retries(work, 2)
    assert len(attempts) == 3


def test_two_workers_give_the_threaded_bits_with_directions_sent_between_them():
    # Blocks of 100 directions over 16 features: where a worker's copy of
    # another's directions, misaligned in memory, once changed the bits.
    rng = np.random.default_rng(5)
    y = rng.integers(4, size=2000)
    X = rng.normal(size=(2000, 16)) + 0.4 * y[:, None]
    kwargs = dict(n_estimators=600, min_n_estimators=100, random_state=0)
    expected = PSMI(**kwargs, chunk_size=500).fit_transform(X, y)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        _assert_same(PSMI(**kwargs, chunk_size=500).fit_transform(X, y), expected)


@pytest.mark.parametrize("auto", [False, True])
def test_data_too_small_for_float64_is_one_error_and_no_worker_tracebacks(auto, capfd):
    X, y = _data(seed=4, n=600)
    kwargs = {"min_n_estimators": 20, "random_state": 0}
    if not auto:
        kwargs["n_estimators"] = 80
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        with pytest.raises(ValueError, match="multiply X by a large constant"):
            PSMI(**kwargs).fit_transform(X * 1e-158, y)
        time.sleep(0.5)  # let the workers' stderr reach the test
    assert "Compute Failed" not in capfd.readouterr().err


def _wait_no_tasks(c, timeout=10.0):
    # The scheduler forgets a task before the worker holding its result
    # hears of it, so both are waited for.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        held = c.run(lambda dask_worker: len(dask_worker.data))
        if n == 0 and not any(held.values()):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"{n} tasks left on the scheduler and results held on the workers "
        f"({held}) after fit returned"
    )


def test_cancelled_blocks_leave_nothing_and_history_matches_logs(reference, caplog):
    X, y, expected = reference
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        est = PSMI(**KWARGS, max_n_estimators=1200, max_blocks_in_flight=4)
        with caplog.at_level(logging.INFO, logger="psmi_dask"):
            _assert_same(est.fit_transform(X, y), expected)
        _wait_no_tasks(c)
    lines = [r.getMessage() for r in caplog.records if "block" in r.getMessage()]
    done = [line for line in lines if " done: " in line]
    assert len(done) == est.n_blocks_ == len(est.history_)
    for line, record in zip(done, est.history_):
        assert line.startswith(f"block {record['block']} done: ")
        assert f"{record['n_estimators']} directions" in line
        if record["variation"] is not None:
            assert f"variation {record['variation']:.4g}" in line
    assert any(r.getMessage().startswith("stopped") for r in caplog.records)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def tcp_cluster():
    """A scheduler and two workers, each its own process, over TCP."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _dask(
        "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"
    )
    workers = [
        _dask("worker", address, "--nthreads", "1", "--no-dashboard", "--no-nanny")
        for _ in range(2)
    ]
    try:
        yield address, scheduler, workers
    finally:
        for process in [*workers, scheduler]:
            process.kill()
            process.wait(timeout=30)


def test_separate_processes_over_tcp_give_the_threaded_bits(
    reference, fixed_reference, tcp_cluster
):
    X, y, expected = reference
    address, _, _ = tcp_cluster
    with Client(address, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        _assert_same(
            PSMI(**KWARGS, max_n_estimators=1200).fit_transform(X, y), expected
        )
        _assert_same(_fitted(PSMI(**FIXED).fit(X, y)), fixed_reference)


def _fit_in_thread(est, X, y):
    out = {}

    def run():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                out["result"] = est.fit_transform(X, y)
        except Exception as error:  # reported by the test
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait_for_blocks(c, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        if n > 20:
            return
        time.sleep(0.05)
    raise AssertionError("the fit never started")


def test_a_worker_killed_mid_fit_changes_nothing():
    X, y = _weak_data()
    kwargs = dict(KWARGS, max_n_estimators=1500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        expected = PSMI(**kwargs).fit_transform(X, y)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        thread, out = _fit_in_thread(PSMI(**kwargs), X, y)
        _wait_for_blocks(c)
        victim = list(c.scheduler_info()["workers"])[0]
        pid = c.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=240)
        assert not thread.is_alive()
        assert "error" not in out, out.get("error")
        _assert_same(out["result"], expected)


def test_a_scheduler_that_goes_away_gives_a_clear_error(tcp_cluster, reference):
    X, y = _weak_data()
    address, scheduler, _ = tcp_cluster
    est = PSMI(**KWARGS, max_n_estimators=6000)
    with Client(address, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        thread, out = _fit_in_thread(est, X, y)
        _wait_for_blocks(c)
        started = time.monotonic()
        scheduler.kill()
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert time.monotonic() - started < 120
    assert isinstance(out.get("error"), SchedulerLostError), out
    assert "Connect a new Client" in str(out["error"])
    assert not est.fitted
    X, y, expected = reference
    with LocalCluster(n_workers=1, dashboard_address=None) as cluster, Client(cluster):
        _assert_same(est.fit_transform(X, y), expected)


def test_c16_fitted_estimator_pickles_and_transforms_without_cluster(
    tmp_path, reference
):
    X, y, _ = reference
    with LocalCluster(n_workers=2, dashboard_address=None) as cluster, Client(cluster):
        est = PSMI(n_estimators=120, **KWARGS).fit(X, y)
        expected = est.transform(X, y)
    for name, dumps in [("pickle", pickle.dumps), ("cloudpickle", cloudpickle.dumps)]:
        path = tmp_path / f"est.{name}"
        path.write_bytes(dumps(est))
        np.save(tmp_path / "X.npy", X)
        np.save(tmp_path / "y.npy", y)
        script = textwrap.dedent(
            f"""
            import pickle, numpy as np
            from distributed import default_client
            est = pickle.loads(open({str(path)!r}, "rb").read())
            X = np.load({str(tmp_path / "X.npy")!r})
            y = np.load({str(tmp_path / "y.npy")!r})
            np.save({str(tmp_path / "out.npy")!r}, np.stack(est.transform(X, y)[:2]))
            try:
                default_client()
                raise SystemExit("a client exists")
            except ValueError:
                pass
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        got = np.load(tmp_path / "out.npy")
        assert_array_equal(got[0], expected[0])
        assert_array_equal(got[1], expected[1])


def test_c17_script_without_main_guard_fails_fast_with_advice(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(
        textwrap.dedent(
            """
            import numpy as np
            from distributed import Client
            from psmi_dask import PSMI
            client = Client(n_workers=1, threads_per_worker=1, dashboard_address=None)
            X = np.random.default_rng(0).normal(size=(100, 3))
            PSMI(n_estimators=10).fit(X, np.arange(100) % 2)
            """
        )
    )
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - started < 90
    assert run.returncode != 0
    assert "if __name__ == '__main__':" in run.stderr


def test_ctrl_c_on_a_cli_run_with_local_workers_is_one_short_message(tmp_path):
    # A terminal sends SIGINT to the whole process group: once, every worker
    # printed a KeyboardInterrupt traceback of its own.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "X.npy", rng.normal(size=(20_000, 64)))
    np.save(tmp_path / "y.npy", rng.integers(4, size=20_000))
    run = subprocess.Popen(
        [str(Path(sys.executable).with_name("psmi-dask")), "-v", "run", "X.npy"]
        + ["y.npy"]
        + ["-o", "out.zarr", "--workers", "2", "--n-estimators", "200000"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in run.stderr:  # the fit has begun: workers are up
            if "block 0 done" in line:
                break
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    assert "KeyboardInterrupt" not in err, err
    assert "Aborted!" in err
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = subprocess.run(
            ["pgrep", "-a", "-g", str(run.pid)], capture_output=True, text=True
        ).stdout
        if not left:
            break
        time.sleep(0.2)
    assert left == "", left


def test_c17_two_cli_runs_in_a_row_leave_no_port_warning_or_processes(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "X.npy", rng.normal(size=(200, 3)))
    np.save(tmp_path / "y.npy", np.arange(200) % 2)
    script = tmp_path / "two_runs.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing
            from psmi_dask.cli import main

            if __name__ == "__main__":
                for i in range(2):
                    main(
                        ["run", {str(tmp_path / "X.npy")!r},
                         {str(tmp_path / "y.npy")!r},
                         "-o", {str(tmp_path)!r} + f"/out{{i}}.npy",
                         "--n-estimators", "20", "--workers", "2"],
                        standalone_mode=False,
                    )
                print("children", len(multiprocessing.active_children()))
            """
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr
    assert "already in use" not in run.stderr
    assert "children 0" in run.stdout


def _two_workers() -> LocalCluster:
    return LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)


def test_c20_features_travel_once_without_large_graph_warnings():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(100_000, 256))  # 205 MB
    y = rng.integers(2, size=100_000)
    with _two_workers() as cluster, Client(cluster):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = PSMI(min_n_estimators=20, max_n_estimators=60, random_state=0).fit(
                X, y
            )
    assert est.n_blocks_ >= 2


def test_dask_outputs_on_a_cluster_send_small_graphs():
    # 1.5M labels, means and stds are 12 MB each: embedded in the graphs of
    # the outputs they would trigger distributed's "Sending large graph".
    n = 1_500_000
    X = da.random.default_rng(3).standard_normal((n, 2), chunks=(250_000, 2))
    y = np.random.default_rng(3).integers(2, size=n)
    with _two_workers() as cluster, Client(cluster):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mean, std, full = PSMI(
                n_estimators=8, min_n_estimators=8, random_state=0
            ).fit_transform(X, y)
            got = da.compute(mean, std, full[:, 0].sum())
    assert got[0].shape == (n,) and np.isfinite(got[2])
