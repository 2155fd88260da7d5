"""Tests of the psmi-dask command, through click's CliRunner."""

from __future__ import annotations

import json
import re
import threading
import time

import dask
import numpy as np
import pytest
from click.testing import CliRunner
from numpy.testing import assert_allclose

from psmi_dask import PSMI
from psmi_dask.cli import main

h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")

N_SAMPLES = 150
FIXED = ["--n-estimators", "200", "--block-size", "100", "--seed", "3"]


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(3), N_SAMPLES // 3)
    X = rng.standard_normal((N_SAMPLES, 4)) + 1.5 * y[:, None]
    return X, y


@pytest.fixture(scope="module")
def data(tmp_path_factory, dataset):
    """The dataset as files in every input format."""
    X, y = dataset
    base = tmp_path_factory.mktemp("cli")
    np.save(base / "X.npy", X)
    np.save(base / "y.npy", y)
    np.save(base / "y_short.npy", y[:-1])
    np.save(base / "y_lone.npy", np.r_[y[:-1], 9])
    np.save(base / "X_1d.npy", X[:, 0])
    X_nan = X.copy()
    X_nan[5, 2] = np.nan
    np.save(base / "X_nan.npy", X_nan)
    (base / "y.txt").write_text("".join(f"{label}\n" for label in y))
    (base / "header.txt").write_text("label\n" + "".join(f"{label}\n" for label in y))
    (base / "y.csv").write_text(
        "id,label\n" + "".join(f"{i},{label}\n" for i, label in enumerate(y))
    )
    (base / "X.parquet").write_bytes(b"PAR1")
    group = zarr.open_group(str(base / "data.zarr"), mode="w")
    group.create_array("X", data=X, chunks=(50, 4))
    group.create_array("y", data=y)
    with h5py.File(base / "data.h5", "w") as handle:
        handle.create_dataset("X", data=X, chunks=(25, 4))
        handle.create_dataset("y", data=y)
    return base


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def reference(X, y, **params):
    options = {"n_estimators": 200, "min_n_estimators": 100, "random_state": 3}
    return PSMI(**(options | params)).fit_transform(X, y)


@pytest.mark.parametrize("suffix", [".zarr", ".npy", ".csv"])
def test_run_writes_each_format(data, dataset, tmp_path, suffix):
    out = tmp_path / f"results{suffix}"

    result = invoke("run", data / "X.npy", data / "y.npy", "-o", out, "--full", *FIXED)

    assert result.exit_code == 0, result.output
    mean, std, full = reference(*dataset)
    if suffix == ".zarr":
        group = zarr.open_group(str(out), mode="r")
        stored = [group[name][...] for name in ("psmi_mean", "psmi_std", "psmi_full")]
    elif suffix == ".npy":
        stored = [
            np.load(tmp_path / f"results_{name}.npy")
            for name in ("psmi_mean", "psmi_std", "psmi_full")
        ]
    else:
        table = np.loadtxt(out, delimiter=",", skiprows=1)
        full_table = np.loadtxt(
            tmp_path / "results_psmi_full.csv", delimiter=",", skiprows=1
        )
        stored = [table[:, 2], table[:, 3], full_table[:, 1:]]
    for got, want in zip(stored, (mean, std, full), strict=True):
        assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_run_record(data, tmp_path):
    out = tmp_path / "r.zarr"

    result = invoke("run", data / "X.npy", data / "y.txt", "-o", out, *FIXED)

    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.zarr.json").read_text())
    assert record["command"] == "run"
    assert record["features"]["shape"] == [N_SAMPLES, 4]
    assert record["parameters"]["n_estimators"] == 200
    assert record["parameters"]["min_n_estimators"] == 100
    assert record["parameters"]["random_state"] == 3
    assert record["parameters"]["directions"] == "orthogonal"
    assert record["n_estimators"] == 200
    assert record["n_blocks"] == 2
    assert len(record["history"]) == 2
    assert record["classes"] == [0, 1, 2]
    assert record["cluster"] == {"kind": "threaded"}
    assert set(record["timings"]) >= {"fit_seconds", "write_seconds", "total_seconds"}
    assert set(record["versions"]) >= {"psmi_dask", "dask", "distributed", "numpy"}
    assert record["outputs"] == {"psmi_mean": str(out), "psmi_std": str(out)}
    assert "psmi_full" not in zarr.open_group(str(out), mode="r")


def test_run_summary(data, dataset, tmp_path):
    result = invoke(
        "run", data / "X.npy", data / "y.npy", "-o", tmp_path / "r.csv", *FIXED
    )

    assert result.exit_code == 0, result.output
    assert "samples: 150  features: 4  classes: 3" in result.stdout
    assert "directions used: 200 (orthogonal, 2 blocks)" in result.stdout
    assert "stopping rule: not used" in result.stdout
    assert re.search(r"time: \d+\.\d\d s", result.stdout)
    mean, _, _ = reference(*dataset)
    lowest = np.argsort(mean, kind="stable")[:10]
    table = result.stdout.split("lowest PSMI:\n")[1].splitlines()[1:11]
    assert [int(row.split()[0]) for row in table] == lowest.tolist()


def test_run_auto_mode(data, tmp_path):
    args = ["--block-size", "100", "--max-n-estimators", "600", "--seed", "0"]

    result = invoke(
        "run", data / "X.npy", data / "y.npy", "-o", tmp_path / "a.npy", *args
    )

    assert result.exit_code == 0, result.output
    assert re.search(r"stopping rule: (met|NOT met)", result.stdout)
    record = json.loads((tmp_path / "a.npy.json").read_text())
    assert record["parameters"]["n_estimators"] == "auto"
    assert isinstance(record["converged"], bool)
    assert record["n_estimators"] == 100 * len(record["history"])
    assert [entry["block"] for entry in record["history"]] == list(
        range(len(record["history"]))
    )


@pytest.mark.parametrize(
    ("features", "labels", "extra"),
    [
        ("data.zarr", "data.zarr", ["--dataset", "X", "--labels-dataset", "y"]),
        ("data.zarr:X", "data.zarr:y", []),
        ("data.h5:X", "data.h5:y", ["--chunk-rows", "60"]),
        ("X.npy", "y.csv", ["--labels-column", "label"]),
        ("X.npy", "y.csv:label", ["--directions", "iid"]),
    ],
)
def test_file_inputs_match_numpy(data, dataset, tmp_path, features, labels, extra):
    out = tmp_path / "r.npy"

    result = invoke("run", data / features, data / labels, "-o", out, *FIXED, *extra)

    assert result.exit_code == 0, result.output
    directions = "iid" if "iid" in extra else "orthogonal"
    mean, std, _ = reference(*dataset, directions=directions)
    assert_allclose(np.load(tmp_path / "r_psmi_mean.npy"), mean, rtol=1e-10, atol=1e-12)
    assert_allclose(np.load(tmp_path / "r_psmi_std.npy"), std, rtol=1e-10, atol=1e-12)


def test_run_plot(data, tmp_path):
    plot = tmp_path / "psmi.png"

    result = invoke(
        "run",
        data / "X.npy",
        data / "y.npy",
        "-o",
        tmp_path / "r.npy",
        "--plot",
        plot,
        *FIXED,
    )

    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_overwrite(data, tmp_path):
    out = tmp_path / "r.csv"
    first = invoke("run", data / "X.npy", data / "y.npy", "-o", out, *FIXED)

    again = invoke(
        "run", data / "X.npy", data / "y.npy", "-o", out, "--overwrite", *FIXED
    )

    assert first.exit_code == 0, first.output
    assert again.exit_code == 0, again.output


ERRORS = [
    (
        ["nope.npy", "y.npy"],
        r"features file .*nope\.npy' does not exist; check the path",
    ),
    (["X.npy", "nope.txt"], r"labels file .*nope\.txt' does not exist"),
    (["X.parquet", "y.npy"], r"format psmi_dask does not read; give a zarr"),
    (["X_1d.npy", "y.npy"], r"shape \(150,\), but a 2-D array"),
    (["X.npy", "y_short.npy"], r"holds 149 labels, but FEATURES .* holds 150 samples"),
    (["data.h5", "y.npy"], r"holds datasets \['X', 'y'\]; choose the features"),
    (["data.h5", "y.npy", "--dataset", "Z"], r"has no dataset 'Z'"),
    (["X.npy", "y.csv"], r"has 2 columns; name the label column with --labels-column"),
    (["X.npy", "y.csv:class"], r"has no column 'class'"),
    (["X.npy", "y_lone.npy"], r"at least 2 samples.*\b9\b"),
    (["X_nan.npy", "y.npy"], r"FEATURES must be finite"),
    # Told in the command line's options, not open_features' parameters.
    (["X.npy", "y.npy", "--dataset", "X"], r"so --dataset='X' has no meaning"),
    (["data.zarr:X", "y.npy", "--dataset", "Z"], r"but --dataset='Z' was also"),
    (["X.npy", "data.zarr"], r"choose the labels with --labels-dataset NAME or"),
    (["X.npy", "header.txt"], r"looks like a header; pass --labels-column='label'"),
]


@pytest.mark.parametrize(("args", "match"), ERRORS)
def test_run_input_errors(data, tmp_path, args, match):
    paths = [data / args[0], data / args[1], *args[2:]]

    result = invoke("run", *paths, "-o", tmp_path / "out.zarr", *FIXED)

    assert result.exit_code == 1
    assert re.search(match, result.stderr), result.stderr
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("out", "extra", "match"),
    [
        ("out.parquet", [], r"end it with \.zarr, \.npy or \.csv"),
        (
            "out.zarr",
            ["--plot", "p.xyz"],
            r"--plot .* extension matplotlib cannot write",
        ),
    ],
)
def test_run_output_errors(data, tmp_path, out, extra, match):
    result = invoke("run", data / "X.npy", data / "y.npy", "-o", tmp_path / out, *extra)

    assert result.exit_code == 1
    assert re.search(match, result.stderr), result.stderr
    assert result.stderr.count("\n") == 1


def test_run_refuses_to_overwrite(data, tmp_path):
    out = tmp_path / "r.npy"
    invoke("run", data / "X.npy", data / "y.npy", "-o", out, *FIXED)

    result = invoke("run", data / "X.npy", data / "y.npy", "-o", out, *FIXED)

    assert result.exit_code == 1
    assert re.search(r"already exists; pass --overwrite", result.stderr)


def _contents(folder):
    """Every file's bytes under ``folder``, by top-level name."""
    return {
        path.name: sorted(p.read_bytes() for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.read_bytes()
        for path in folder.iterdir()
    }


@pytest.mark.parametrize(
    "features, labels, out",
    [
        ("X.zarr", "y.npy", "X.zarr"),
        ("group.zarr:X", "group.zarr:y", "group.zarr"),
        ("X.npy", "y.csv", "y.csv"),
    ],
)
def test_run_never_writes_over_its_inputs(data, tmp_path, features, labels, out):
    # With --overwrite, such an -o once replaced the features it was still
    # reading, and wrote a psmi_full computed from the wreck.
    X, y = np.load(data / "X.npy"), np.load(data / "y.npy")
    zarr.create_array(str(tmp_path / "X.zarr"), data=X, chunks=(100, 4))
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("X", data=X, chunks=(100, 4))
    group.create_array("y", data=y)
    np.save(tmp_path / "X.npy", X)
    (tmp_path / "y.csv").write_text("".join(f"{label}\n" for label in y))
    before = _contents(tmp_path)

    result = invoke(
        "run",
        tmp_path / features,
        tmp_path / labels,
        "-o",
        tmp_path / out,
        "--overwrite",
        "--full",
        *FIXED,
    )

    assert result.exit_code == 1
    assert re.search(
        r"would write over (FEATURES|LABELS) .*choose another -o", result.stderr
    )
    assert _contents(tmp_path) == before


def io_loop_threads():
    return sum(thread.name == "IO loop" for thread in threading.enumerate())


def test_run_unreachable_scheduler(data, tmp_path):
    loops = io_loop_threads()
    started = time.perf_counter()

    result = invoke(
        "run",
        data / "X.npy",
        data / "y.npy",
        "-o",
        tmp_path / "r.zarr",
        "--scheduler",
        "tcp://127.0.0.1:1",
        "--connect-timeout",
        "1",
    )

    assert result.exit_code == 1
    assert re.search(
        r"could not reach the Dask scheduler at 'tcp://127\.0\.0\.1:1' within 1 s .*"
        r"check the address",
        result.stderr,
    ), result.stderr
    assert result.stderr.count("\n") == 1
    assert time.perf_counter() - started < 15
    # A failed Client would leave its event-loop thread behind.
    assert io_loop_threads() == loops


def test_run_malformed_scheduler_address(data, tmp_path):
    loops = io_loop_threads()
    result = invoke(
        "run",
        data / "X.npy",
        data / "y.npy",
        "-o",
        tmp_path / "r.zarr",
        "--scheduler",
        "host",
    )

    assert result.exit_code == 1
    assert re.search(r"--scheduler 'host' is not a scheduler address", result.stderr)
    assert io_loop_threads() == loops


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--n-estimators", "many"], r"Invalid value for '--n-estimators'"),
        (["--n-estimators", "0"], r"expected a positive integer or 'auto'"),
        (["--quantile", "0"], r"Invalid value for '--quantile'"),
        (["--directions", "sobol"], r"Invalid value for '--directions'"),
        (
            ["--workers", "2", "--memory-limit", "lots"],
            r"expected a size such as '2GiB'",
        ),
        (
            ["--workers", "2", "--scheduler", "tcp://x:1"],
            r"either --scheduler or --workers",
        ),
        (
            ["--workers", "1", "--memory-limit", "100MB"],
            r"expected at least 256MiB, got '100MB'",
        ),
        (["--threads-per-worker", "2"], r"--threads-per-worker .* give --workers"),
    ],
)
def test_run_option_errors(data, tmp_path, extra, match):
    result = invoke(
        "run", data / "X.npy", data / "y.npy", "-o", tmp_path / "r.zarr", *extra
    )

    assert result.exit_code == 2
    assert re.search(match, result.stderr), result.stderr
    assert "Traceback" not in result.output


def test_run_missing_output_option(data):
    result = invoke("run", data / "X.npy", data / "y.npy")

    assert result.exit_code == 2
    assert re.search(r"Missing option '-o' / '--output'", result.stderr)


@pytest.mark.slow
def test_run_on_a_local_cluster(data, dataset, tmp_path):
    out = tmp_path / "r.zarr"
    cluster = ["--workers", "1", "--threads-per-worker", "2", "--memory-limit", "1GiB"]

    result = invoke(
        "run", data / "data.h5:X", data / "y.npy", "-o", out, "--full", *FIXED, *cluster
    )

    assert result.exit_code == 0, result.output
    mean, _, full = reference(*dataset)
    group = zarr.open_group(str(out), mode="r")
    assert_allclose(group["psmi_mean"][...], mean, rtol=1e-10, atol=1e-12)
    assert_allclose(group["psmi_full"][...], full, rtol=1e-10, atol=1e-12)
    record = json.loads((tmp_path / "r.zarr.json").read_text())
    assert record["cluster"]["kind"] == "local"
    assert record["cluster"]["n_workers"] == 1


@pytest.mark.slow
def test_run_against_a_scheduler_address(data, dataset, tmp_path):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "r.npy"

    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        result = invoke(
            "run",
            data / "X.npy",
            data / "y.npy",
            "-o",
            out,
            "--scheduler",
            cluster.scheduler_address,
            *FIXED,
        )

    assert result.exit_code == 0, result.output
    mean, _, _ = reference(*dataset)
    assert_allclose(np.load(tmp_path / "r_psmi_mean.npy"), mean, rtol=1e-10, atol=1e-12)
    record = json.loads((tmp_path / "r.npy.json").read_text())
    assert record["cluster"]["kind"] == "scheduler"


def test_demo_reduced(tmp_path):
    args = ["--workers", "0", "--samples", "400", "--block-size", "250"]

    result = invoke("demo", "-o", tmp_path, *args, "--max-n-estimators", "1000")

    assert result.exit_code == 0, result.output
    assert "400 samples, 20 labels flipped" in result.stdout
    auroc = float(re.search(r"AUROC .*: (\d\.\d+)", result.stdout).group(1))
    assert auroc > 0.8
    assert len(result.stdout.split("ten lowest PSMI samples:\n")[1].splitlines()) >= 11
    assert (tmp_path / "digits_psmi.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "digits_psmi.csv.json").read_text())
    assert record["auroc"] == pytest.approx(auroc, abs=1e-4)
    assert len(record["data"]["flipped"]) == 20


@pytest.mark.filterwarnings("ignore::psmi_dask.ConvergenceWarning")
def test_demo_runs_on_the_fewest_samples_it_accepts(tmp_path):
    args = ["--workers", "0", "--block-size", "20", "--max-n-estimators", "100"]
    result = invoke("demo", "-o", tmp_path, "--samples", "24", *args)
    assert result.exit_code == 0, result.output
    assert "24 samples, 1 labels flipped" in result.stdout

    result = invoke("demo", "-o", tmp_path, "--samples", "23", *args)
    assert result.exit_code == 2
    assert "23 is not in the range x>=24" in result.stderr


def test_run_refuses_an_output_folder_that_does_not_exist_before_computing(tmp_path):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).normal(size=(40, 3)))
    np.save(tmp_path / "y.npy", np.arange(40) % 2)
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(tmp_path / "X.npy"),
            str(tmp_path / "y.npy"),
            "-o",
            str(tmp_path / "missing" / "out.npy"),
        ],
    )
    assert result.exit_code == 1
    assert "does not exist; create it" in result.output


def test_run_refuses_workers_paused_from_the_start(data, tmp_path):
    # A worker over its pause threshold runs no task: the fit would wait
    # forever. Here every worker pauses at 1% of its 1 GiB.
    started = time.perf_counter()
    with dask.config.set({"distributed.worker.memory.pause": 0.01}):
        result = invoke(
            "run",
            data / "X.npy",
            data / "y.npy",
            "-o",
            tmp_path / "r.zarr",
            "--workers",
            "1",
            "--memory-limit",
            "1GiB",
            *FIXED,
        )

    assert result.exit_code == 1
    assert re.search(r"--memory-limit 1,024 MiB leaves a worker no room", result.stderr)
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "r.zarr").exists()


def test_library_errors_are_told_in_the_command_lines_terms(data, tmp_path):
    result = invoke(
        "run",
        data / "X.npy",
        data / "y.npy",
        "-o",
        tmp_path / "r.zarr",
        "--max-n-estimators",
        "30",
        "--block-size",
        "20",
    )

    assert result.exit_code == 1
    assert re.search(
        r"but --max-n-estimators=30 allow only 1 block\(s\) of --block-size=20 "
        r"with --milestone=0.5; raise --max-n-estimators to 40\.",
        result.stderr,
    ), result.stderr
