"""The ``psmi-dask`` command: PSMI on files, and the mislabel demo.

``psmi-dask run FEATURES LABELS -o OUT`` computes PSMI of the samples in a
features file against their labels and writes the results beside a JSON
record of the run. ``psmi-dask demo`` finds flipped labels in scikit-learn's
digits. Bad input ends the command with one line on stderr and exit code 1
(2 for a malformed option, as click reports it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

__all__ = ["main"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


class InputError(click.ClickException):
    """Bad input: reported as one line on stderr, exit code 1."""

    def format_message(self) -> str:
        return " ".join(self.message.split())


# The Python API's names in library messages, and the options that set them
# here; a library error is reported in the terms of the command line.
_FEATURE_OPTIONS = {
    r"\bdataset=NAME\b": "--dataset NAME",
    r"\bdataset=": "--dataset=",
    r"\bdrop dataset\b": "drop --dataset",
}
_LABEL_OPTIONS = {
    r"\bdataset=NAME\b": "--labels-dataset NAME",
    r"\bdataset=": "--labels-dataset=",
    r"\bcolumn=NAME\b": "--labels-column NAME",
    r"\bcolumn=": "--labels-column=",
    r"\bdrop dataset\b": "drop --labels-dataset",
}
_OPTIONS = {
    r"\bX must be finite\b": "FEATURES must be finite",
    r"\bn_estimators\b": "--n-estimators",
    r"\bmin_n_estimators\b": "--block-size",
    r"\bmax_n_estimators\b": "--max-n-estimators",
    r"\blowest_psmi_quantile\b": "--quantile",
    r"\bmax_variation_of_the_lowest\b": "--max-variation",
    r"\bmilestone\b(?!\))": "--milestone",
    r"\brandom_state\b": "--seed",
    r"\bchunk_rows=": "--chunk-rows=",
}


def _in_cli_terms(message: str, options: dict[str, str] | None = None) -> str:
    for api, option in {**(options or {}), **_OPTIONS}.items():
        message = re.sub(api, option, message)
    return message


class NEstimators(click.ParamType):
    """A positive number of directions, or ``auto``."""

    name = "INT|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(
                f"expected a positive integer or 'auto', got {value!r}.", param, ctx
            )
        if number < 1:
            self.fail(
                f"expected a positive integer or 'auto', got {value!r}.", param, ctx
            )
        return number


class MemoryLimit(click.ParamType):
    """A byte size dask understands (``"2GiB"``, ``"500MB"``) or ``auto``."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from dask.utils import parse_bytes

        if value == "auto":
            return value
        try:
            size = parse_bytes(value)
        except (ValueError, TypeError):
            self.fail(
                f"expected a size such as '2GiB' or '500MB', or 'auto', got {value!r}.",
                param,
                ctx,
            )
        if size < _LEAST_MEMORY_LIMIT:
            self.fail(
                f"expected at least 256MiB, got {value!r}: a Dask worker takes "
                "about 100 MiB before it computes anything, and pauses at 80% "
                "of its limit.",
                param,
                ctx,
            )
        return str(value)


_LEAST_MEMORY_LIMIT = 256 * 2**20


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="psmi_dask")
@click.option("-v", "--verbose", count=True, help="Log more (-v: INFO, -vv: DEBUG).")
def main(verbose: int) -> None:
    """Pointwise Sliced Mutual Information (PSMI), computed with Dask."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("psmi_dask").setLevel(level)
    _quiet_distributed(verbose)


def _quiet_distributed(verbose: int) -> None:
    """Keep distributed's INFO lines (every cluster start and stop) for -vv.

    distributed sets its loggers from dask's config when it is imported, so
    the config is set too: a run without a cluster never imports it.
    """
    import dask

    name = "debug" if verbose >= 2 else "warning"
    dask.config.set({"logging.distributed": name})
    if "distributed" in sys.modules:
        logging.getLogger("distributed").setLevel(name.upper())


@contextlib.contextmanager
def _cluster(
    scheduler: str | None,
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str,
    timeout: float,
) -> Iterator[dict[str, Any]]:
    """Connect to a scheduler, start a LocalCluster, or do neither."""
    if scheduler is None and workers is None:
        yield {"kind": "threaded"}
        return

    from distributed import Client, LocalCluster

    if scheduler is not None:
        _probe_scheduler(scheduler, timeout)
        client = Client(scheduler, timeout=timeout)
        with client:
            yield {"kind": "scheduler", "address": scheduler, **_workers_of(client)}
        return

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            processes=True,
            dashboard_address=":0",
            # Workers log a warning for every block released after the
            # stop; only errors are worth showing.
            silence_logs=logging.ERROR,
            preload=["psmi_dask._worker_setup"],
        ) as cluster,
        Client(cluster) as client,
    ):
        _check_room(client)
        yield {"kind": "local", "memory_limit": memory_limit, **_workers_of(client)}


def _check_room(client: Any) -> None:
    """Refuse workers whose memory limit leaves them paused from the start.

    A paused worker runs no task, so the fit would wait forever.
    """
    import dask

    pause = dask.config.get("distributed.worker.memory.pause")

    def room(dask_worker: Any) -> tuple[int, int | None]:
        used = dask_worker.monitor.get_process_memory()
        return used, dask_worker.memory_manager.memory_limit

    for used, limit in client.run(room).values():
        if limit and pause and used >= pause * limit:
            raise InputError(
                f"--memory-limit {limit / 2**20:,.0f} MiB leaves a worker no "
                f"room: it takes {used / 2**20:,.0f} MiB at start and pauses at "
                f"{pause:.0%} of its limit; give a larger --memory-limit."
            )


def _probe_scheduler(address: str, timeout: float) -> None:
    """Open and close one connection to ``address``, or raise InputError.

    Probing before creating the Client matters: a Client that fails to
    connect leaves its event-loop thread running in this process.
    """
    import asyncio

    from distributed.comm import connect

    async def probe() -> None:
        comm = await connect(address, timeout=timeout)
        await comm.close()

    try:
        asyncio.run(probe())
    except ValueError as error:
        raise InputError(
            f"--scheduler {address!r} is not a scheduler address ({error}); "
            f"give one such as tcp://host:8786."
        ) from error
    except (OSError, TimeoutError) as error:
        raise InputError(
            f"could not reach the Dask scheduler at {address!r} within "
            f"{timeout:g} s ({type(error).__name__}); check the address "
            f"(such as tcp://host:8786) and that `dask scheduler` runs "
            f"there, or drop --scheduler to compute locally."
        ) from error


def _workers_of(client: Any) -> dict[str, Any]:
    info = client.scheduler_info()
    threads = [worker["nthreads"] for worker in info["workers"].values()]
    return {"n_workers": len(threads), "n_threads": sum(threads)}


def _check_plot_path(plot: str | None) -> None:
    if plot is None:
        return

    from psmi_dask.io import _import_optional

    try:
        _import_optional("matplotlib", "demo", "--plot")
    except ImportError as error:
        raise InputError(str(error)) from error

    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(plot).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise InputError(
            f"--plot {plot!r} has an extension matplotlib cannot write; end it "
            f"with one of {', '.join('.' + name for name in sorted(formats))}."
        )


def _open_inputs(
    features: str,
    labels: str,
    dataset: str | None,
    labels_column: str | None,
    labels_dataset: str | None,
    chunk_rows: int | None,
) -> tuple[Any, np.ndarray]:
    from psmi_dask.io import open_features, open_labels

    try:
        X = open_features(features, dataset=dataset, chunk_rows=chunk_rows)
    except ValueError as error:
        raise InputError(_in_cli_terms(str(error), _FEATURE_OPTIONS)) from error
    try:
        y = open_labels(labels, column=labels_column, dataset=labels_dataset)
    except ValueError as error:
        raise InputError(_in_cli_terms(str(error), _LABEL_OPTIONS)) from error
    if y.shape[0] != X.shape[0]:
        raise InputError(
            f"LABELS {labels!r} holds {y.shape[0]} labels, but FEATURES "
            f"{features!r} holds {X.shape[0]} samples; give one label per "
            f"sample, in the same order."
        )
    return X, y


def _fit(
    X: Any, y: np.ndarray, params: dict[str, Any]
) -> tuple[Any, np.ndarray, np.ndarray, Any, list[str]]:
    import dask

    from psmi_dask import PSMI

    estimator = PSMI(**params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        psmi_mean, psmi_std, psmi_full = estimator.fit_transform(X, y)
        psmi_mean, psmi_std = dask.compute(psmi_mean, psmi_std)
    messages = [
        f"{item.category.__name__}: {_in_cli_terms(str(item.message))}"
        for item in caught
    ]
    return estimator, np.asarray(psmi_mean), np.asarray(psmi_std), psmi_full, messages


def _summary(
    X: Any,
    y: np.ndarray,
    estimator: Any,
    psmi_mean: np.ndarray,
    psmi_std: np.ndarray,
    seconds: float,
    auto: bool,
) -> list[str]:
    n_estimators = int(estimator.n_estimators_)
    kind = estimator.directions if isinstance(estimator.directions, str) else "given"
    blocks = estimator.n_blocks_
    lines = [
        (
            f"samples: {X.shape[0]:,}  features: {X.shape[1]:,}  "
            f"classes: {len(estimator.classes_):,}"
        ),
        (
            f"directions used: {n_estimators:,} ({kind}, {blocks} "
            f"block{'s' if blocks != 1 else ''})"
        ),
    ]
    if auto:
        history = estimator.history_
        variation = history[-1].get("variation") if history else None
        shown = "n/a" if variation is None else f"{variation:.4g}"
        verdict = "met" if estimator.converged_ else "NOT met (stopped at the cap)"
        lines.append(
            f"stopping rule: {verdict}; last variation {shown} "
            f"(target <= {estimator.max_variation_of_the_lowest:g})"
        )
    else:
        lines.append("stopping rule: not used (fixed --n-estimators)")
    lines.append(f"time: {seconds:.2f} s")
    lines.append(_lowest_table(y, psmi_mean, psmi_std))
    return lines


def _lowest_table(
    y: np.ndarray, psmi_mean: np.ndarray, psmi_std: np.ndarray, count: int = 10
) -> str:
    lowest = np.argsort(psmi_mean, kind="stable")[:count]
    rows = [f"{len(lowest)} samples with the lowest PSMI:"]
    rows.append(f"  {'sample':>8}  {'label':>10}  {'psmi_mean':>10}  {'psmi_std':>10}")
    for index in lowest:
        rows.append(
            f"  {index:>8}  {y[index]!s:>10}  {psmi_mean[index]:>10.4f}  "
            f"{psmi_std[index]:>10.4f}"
        )
    return "\n".join(rows)


@main.command()
@click.argument("features")
@click.argument("labels")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    help="Results file: .zarr (one group), .npy (a file per array) or .csv; "
    "a JSON record is written beside it as OUT.json.",
)
@click.option(
    "--dataset", help="Array of the features inside a zarr group or HDF5 file."
)
@click.option(
    "--labels-column", help="Column of the labels in a .csv file with a header."
)
@click.option(
    "--labels-dataset", help="Array of the labels inside a zarr group or HDF5 file."
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    help="Samples per chunk, rounded down to whole stored chunks.",
)
@click.option(
    "--n-estimators",
    type=NEstimators(),
    default="auto",
    show_default=True,
    help="Number of directions, or 'auto' to stop by the stopping rule.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Directions per block (min_n_estimators).",
)
@click.option(
    "--quantile",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.05,
    show_default=True,
    help="Fraction of lowest-PSMI samples the stopping rule watches.",
)
@click.option(
    "--max-variation",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="Stop when their mean relative change is at most this.",
)
@click.option(
    "--milestone",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Compare against the PSMI after this fraction of the blocks.",
)
@click.option(
    "--max-n-estimators",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="Cap on the directions in auto mode.",
)
@click.option("--seed", type=int, default=None, help="Seed of the directions.")
@click.option(
    "--directions",
    type=click.Choice(["orthogonal", "iid"]),
    default="orthogonal",
    show_default=True,
    help="Orthonormal frames, or independent directions.",
)
@click.option("--scheduler", help="Address of a running Dask scheduler.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Start a LocalCluster of this many worker processes. Without it "
    "and --scheduler, PSMI runs on dask's threaded scheduler.",
)
@click.option(
    "--threads-per-worker", type=click.IntRange(min=1), help="With --workers."
)
@click.option(
    "--memory-limit",
    type=MemoryLimit(),
    default="auto",
    show_default=True,
    help="Memory limit of each local worker, such as 2GiB.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=CONNECT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for --scheduler.",
)
@click.option("--full", is_flag=True, help="Also write psmi_full, chunk by chunk.")
@click.option("--progress", is_flag=True, help="Show progress while fitting.")
@click.option("--plot", help="Also save a histogram of PSMI to this image file.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def run(
    features: str,
    labels: str,
    out: str,
    dataset: str | None,
    labels_column: str | None,
    labels_dataset: str | None,
    chunk_rows: int | None,
    n_estimators: int | str,
    block_size: int,
    quantile: float,
    max_variation: float,
    milestone: float,
    max_n_estimators: int,
    seed: int | None,
    directions: str,
    scheduler: str | None,
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str,
    connect_timeout: float,
    full: bool,
    progress: bool,
    plot: str | None,
    overwrite: bool,
) -> None:
    """Compute PSMI of the samples in FEATURES against LABELS.

    FEATURES is a zarr array or group, an HDF5 file or a .npy file; name an
    array inside a group or file with --dataset or as PATH:NAME. LABELS is
    a .npy, .csv or .txt file (one label a line, or a column named with
    --labels-column or PATH:COLUMN), or a dataset beside the features
    (--labels-dataset or PATH:NAME).

    On a cluster (--scheduler), workers read FEATURES and write psmi_full
    themselves, so both paths must be on a file system every worker sees.
    """
    if scheduler is not None and (
        workers is not None or threads_per_worker is not None
    ):
        raise click.UsageError("give either --scheduler or --workers, not both.")
    if threads_per_worker is not None and workers is None:
        raise click.UsageError(
            "--threads-per-worker sets the threads of the local workers; give "
            "--workers too."
        )

    params = {
        "n_estimators": n_estimators,
        "min_n_estimators": block_size,
        "lowest_psmi_quantile": quantile,
        "max_variation_of_the_lowest": max_variation,
        "milestone": milestone,
        "max_n_estimators": max_n_estimators,
        "directions": directions,
        "random_state": seed,
        "progress": progress,
    }
    try:
        _run(
            features,
            labels,
            out,
            inputs={
                "dataset": dataset,
                "labels_column": labels_column,
                "labels_dataset": labels_dataset,
                "chunk_rows": chunk_rows,
            },
            params=params,
            cluster=(
                scheduler,
                workers,
                threads_per_worker,
                memory_limit,
                connect_timeout,
            ),
            full=full,
            plot=plot,
            overwrite=overwrite,
        )
    except (ValueError, OSError, ImportError) as error:
        raise InputError(_in_cli_terms(str(error))) from error


def _run(
    features: str,
    labels: str,
    out: str,
    *,
    inputs: dict[str, Any],
    params: dict[str, Any],
    cluster: tuple[Any, ...],
    full: bool,
    plot: str | None,
    overwrite: bool,
) -> None:
    from psmi_dask.io import (
        _overlaps,
        _split_member,
        estimator_record,
        package_versions,
        result_paths,
        save_results,
        write_record,
    )

    started = time.perf_counter()
    paths = result_paths(out)
    for what, given in (("FEATURES", features), ("LABELS", labels)):
        source = _split_member(given, None, "")[0]
        if any(_overlaps(path, source) for path in paths.values()):
            raise InputError(
                f"-o {out!r} would write over {what} {given!r}; choose another -o."
            )
    if not overwrite:
        wanted = ["psmi_mean", "record"] + (["psmi_full"] if full else [])
        for name in wanted:
            if paths[name].exists():
                raise InputError(
                    f"output {str(paths[name])!r} already exists; pass "
                    f"--overwrite or choose another -o."
                )
    folder = paths["record"].parent
    if not folder.is_dir():
        raise InputError(
            f"the folder of -o, {str(folder)!r}, does not exist; create it or "
            "choose another -o."
        )
    _check_plot_path(plot)
    X, y = _open_inputs(features, labels, **inputs)
    opened = time.perf_counter()

    with _cluster(*cluster) as cluster_info:
        connected = time.perf_counter()
        estimator, psmi_mean, psmi_std, psmi_full, caught = _fit(X, y, params)
        fitted = time.perf_counter()
        written = save_results(
            out,
            psmi_mean,
            psmi_std,
            psmi_full if full else None,
            labels=y,
            overwrite=overwrite,
        )
        saved = time.perf_counter()

    if plot is not None:
        from psmi_dask._demo import plot_psmi

        plot_psmi(plot, psmi_mean, title=f"PSMI of {X.shape[0]:,} samples")

    timings = {
        "open_seconds": opened - started,
        "cluster_seconds": connected - opened,
        "fit_seconds": fitted - connected,
        "write_seconds": saved - fitted,
        "total_seconds": time.perf_counter() - started,
    }
    record = {
        "command": "run",
        "features": {
            "path": features,
            "dataset": inputs["dataset"],
            "shape": list(X.shape),
            "dtype": str(X.dtype),
            "chunk_rows": int(X.chunks[0][0]),
        },
        "labels": {
            "path": labels,
            "column": inputs["labels_column"],
            "dataset": inputs["labels_dataset"],
        },
        "cluster": cluster_info,
        **estimator_record(estimator),
        "warnings": caught,
        "outputs": {name: str(path) for name, path in written.items()},
        "plot": plot,
        "timings": timings,
        "versions": package_versions(("zarr", "h5py")),
    }
    record_file = write_record(paths["record"], record)

    for message in caught:
        click.echo(f"warning: {message}", err=True)
    auto = params["n_estimators"] == "auto"
    for line in _summary(
        X, y, estimator, psmi_mean, psmi_std, timings["fit_seconds"], auto
    ):
        click.echo(line)
    files = sorted({str(path) for path in written.values()} | {str(record_file)})
    if plot is not None:
        files.append(plot)
    click.echo("wrote: " + ", ".join(files))


@main.command()
@click.option(
    "-o",
    "--output-dir",
    default="psmi_demo",
    show_default=True,
    help="Directory for the results, the record and the plot.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Worker processes of the LocalCluster; 0 runs in this process.",
)
@click.option(
    "--samples",
    # The fewest first digits in which every class keeps two samples after
    # the demo's flips (fewer leave a class of one: no spread to fit).
    type=click.IntRange(min=24),
    default=None,
    help="Use only the first N digits, for a quick check (default: all 1,797).",
)
@click.option(
    "--max-n-estimators",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="Cap on the directions.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Directions per block.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the directions."
)
@click.option("--progress", is_flag=True, help="Show progress while fitting.")
def demo(
    output_dir: str,
    workers: int,
    samples: int | None,
    max_n_estimators: int,
    block_size: int,
    seed: int,
    progress: bool,
) -> None:
    """Find flipped labels in scikit-learn's digits with PSMI.

    Flips 5 % of the labels (a fixed seed) to a different class, computes
    PSMI in auto mode on a local cluster, and prints how well "lowest PSMI
    first" finds the flipped labels (AUROC), with the ten lowest samples.
    """
    from psmi_dask._demo import run_demo

    try:
        result = run_demo(
            output_dir,
            n_workers=workers,
            n_samples=samples,
            max_n_estimators=max_n_estimators,
            block_size=block_size,
            random_state=seed,
            progress=progress,
        )
    except (ValueError, OSError, ImportError) as error:
        raise InputError(_in_cli_terms(str(error))) from error

    n_flipped = int(result.flipped.sum())
    click.echo(
        f"digits: {len(result.labels):,} samples, {n_flipped} labels flipped "
        f"to another class"
    )
    verdict = "met" if result.converged else "not met (cap reached)"
    click.echo(
        f"directions used: {result.n_estimators:,}; stopping rule {verdict}; "
        f"time: {result.seconds:.2f} s"
    )
    click.echo(
        f"AUROC of lowest PSMI first for finding flipped labels: {result.auroc:.4f}"
    )
    click.echo("ten lowest PSMI samples:")
    click.echo(
        f"  {'sample':>8}  {'label':>6}  {'true':>6}  {'flipped':>7}  {'psmi_mean':>10}"
    )
    for index in result.lowest:
        click.echo(
            f"  {index:>8}  {result.labels[index]:>6}  {result.true_labels[index]:>6}  "
            f"{'yes' if result.flipped[index] else 'no':>7}  "
            f"{result.psmi_mean[index]:>10.4f}"
        )
    click.echo("wrote: " + ", ".join(str(path) for path in result.files.values()))
