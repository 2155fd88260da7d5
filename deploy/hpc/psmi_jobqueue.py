"""Fit PSMI on Dask workers that dask-jobqueue starts as SLURM or PBS jobs.

This script is the client and runs the scheduler: start it on a login node
(if your site allows long-running processes there) or inside a small batch
job of its own (``fit.sbatch`` beside this file). It submits ``--jobs``
worker jobs, waits for them, runs ``psmi-dask run`` against the scheduler,
and cancels the worker jobs when the fit is done or fails::

    python deploy/hpc/psmi_jobqueue.py features.zarr labels.npy \\
        -o results/psmi.zarr --jobs 4 --cores 8 --memory 32GiB \\
        --walltime 02:00:00 --queue normal --account myproject \\
        --env ~/envs/psmi

Every worker job activates the psmi_dask environment (``--env``, a
virtualenv or conda prefix; or any shell line given with ``--activate``)
before it starts ``dask worker``, and pins BLAS to one thread per Dask
thread. Print the job script without submitting anything with
``--print-job-script``. ``--batch pbs`` uses PBS instead of SLURM.

Arguments after ``--`` go to ``psmi-dask run`` unchanged, for example
``-- --n-estimators 5000 --block-size 500 --full``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# One BLAS thread per Dask thread: a worker runs a task on each of its
# threads, and a multithreaded BLAS inside each would oversubscribe the cores.
BLAS_THREADS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def environment_prologue(env: str | None = None, activate: str | None = None):
    """Shell lines that put a worker job into the psmi_dask environment."""
    lines = []
    if activate:
        lines.append(activate)
    elif env:
        prefix = Path(env).expanduser()
        if (prefix / "conda-meta").is_dir():
            lines.append('eval "$(conda shell.bash hook)"')
            lines.append(f"conda activate {shlex.quote(str(prefix))}")
        else:
            lines.append(f"source {shlex.quote(str(prefix / 'bin' / 'activate'))}")
    lines.extend(f"export {name}={value}" for name, value in BLAS_THREADS.items())
    lines.append('python -c "import psmi_dask" || exit 1')
    return lines


def make_cluster(
    batch: str = "slurm",
    *,
    cores: int = 4,
    memory: str = "16GiB",
    processes: int = 1,
    walltime: str = "01:00:00",
    queue: str | None = None,
    account: str | None = None,
    env: str | None = None,
    activate: str | None = None,
    interface: str | None = None,
    local_directory: str | None = None,
    log_directory: str | None = None,
    job_extra_directives: list[str] | None = None,
    scheduler_options: dict | None = None,
):
    """A SLURMCluster (or PBSCluster) whose workers run psmi_dask.

    ``cores`` and ``memory`` are per job; with ``processes`` workers per
    job, each worker gets cores / processes threads and memory / processes
    bytes. Nothing is submitted until the cluster is scaled.
    """
    from dask_jobqueue import PBSCluster, SLURMCluster

    classes = {"slurm": SLURMCluster, "pbs": PBSCluster}
    if batch not in classes:
        raise ValueError(f"batch must be 'slurm' or 'pbs', got {batch!r}")
    python = None
    if env and not activate:
        python = str(Path(env).expanduser() / "bin" / "python")
    return classes[batch](
        cores=cores,
        memory=memory,
        processes=processes,
        walltime=walltime,
        queue=queue,
        account=account,
        interface=interface,
        local_directory=local_directory,
        log_directory=log_directory,
        job_script_prologue=environment_prologue(env, activate),
        job_extra_directives=job_extra_directives or [],
        python=python,
        scheduler_options=scheduler_options or {},
    )


def psmi_dask_script() -> str:
    """The psmi-dask console script of this Python, even if not on PATH."""
    beside = shutil.which("psmi-dask", path=str(Path(sys.executable).parent))
    return beside or "psmi-dask"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, run_args = argv[:split], argv[split + 1 :]

    parser = argparse.ArgumentParser(
        description="Fit PSMI on Dask workers started as SLURM or PBS jobs."
    )
    parser.add_argument("features", nargs="?")
    parser.add_argument("labels", nargs="?")
    parser.add_argument("-o", "--output", help="Results file (.zarr, .npy, .csv).")
    parser.add_argument("--batch", choices=["slurm", "pbs"], default="slurm")
    parser.add_argument("--jobs", type=int, default=2, help="Worker jobs to submit.")
    parser.add_argument("--cores", type=int, default=4, help="Cores per job.")
    parser.add_argument("--memory", default="16GiB", help="Memory per job.")
    parser.add_argument("--processes", type=int, default=1, help="Workers per job.")
    parser.add_argument("--walltime", default="01:00:00")
    parser.add_argument("--queue", help="Partition (SLURM) or queue (PBS).")
    parser.add_argument("--account", help="Account or project to charge.")
    parser.add_argument(
        "--env", help="Prefix of the psmi_dask virtualenv or conda env."
    )
    parser.add_argument("--activate", help="Shell line that sets up the environment.")
    parser.add_argument("--interface", help="Network interface, such as ib0.")
    parser.add_argument("--local-directory", help="Node-local scratch for spilling.")
    parser.add_argument("--log-directory", help="Where the batch system writes logs.")
    parser.add_argument(
        "--directive",
        action="append",
        default=[],
        help="Extra #SBATCH/#PBS directive, such as '--constraint=skylake'.",
    )
    parser.add_argument(
        "--wait", type=float, default=1800.0, help="Seconds to wait for workers."
    )
    parser.add_argument(
        "--print-job-script",
        action="store_true",
        help="Print the worker job script and exit without submitting.",
    )
    args = parser.parse_args(argv)
    if not args.print_job_script and not (args.features and args.labels):
        parser.error("FEATURES, LABELS and -o are needed unless --print-job-script")
    if not args.print_job_script and not args.output:
        parser.error("-o/--output is required")
    args.run_args = run_args
    return args


def _cluster_from(args: argparse.Namespace):
    return make_cluster(
        args.batch,
        cores=args.cores,
        memory=args.memory,
        processes=args.processes,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        env=args.env,
        activate=args.activate,
        interface=args.interface,
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        job_extra_directives=args.directive,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distributed import Client

    with _cluster_from(args) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            # Start as soon as one worker is up; the others join as their jobs
            # leave the queue, and the fit uses them from then on.
            client.wait_for_workers(1, timeout=args.wait)
            command = [
                psmi_dask_script(),
                "run",
                args.features,
                args.labels,
                "-o",
                args.output,
                "--scheduler",
                cluster.scheduler_address,
                *args.run_args,
            ]
            print("+", shlex.join(command), flush=True)
            return subprocess.call(command, env={**os.environ, **BLAS_THREADS})


if __name__ == "__main__":
    sys.exit(main())
