"""The recipes in deploy/ parse, agree with each other, and call real commands.

Every command line a recipe starts is parsed by the command it names
(``dask scheduler``, ``dask worker``, ``psmi-dask run``), so an option that
does not exist, or a console script that is not in pyproject.toml, fails
here rather than on a user's cluster.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted(
    path for pattern in ("*.yaml", "*.yml") for path in DEPLOY.rglob(pattern)
)
SHELL_FILES = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"psmi-dask:{PYPROJECT['project']['version']}"


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _load(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _walk(node, key):
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _containers(doc):
    """(where, image, argv) of every container or service in a document."""
    if "services" in doc:  # a compose file
        for name, service in doc["services"].items():
            yield f"service {name}", service.get("image"), service.get("command")
        return
    for containers in _walk(doc, "containers"):
        for container in containers:
            argv = [*container.get("command", []), *container.get("args", [])]
            yield f"container {container['name']}", container.get("image"), argv


def _console_script(name: str) -> click.Command:
    target = PYPROJECT["project"]["scripts"][name]
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def check_argv(argv: list[str]) -> None:
    """Parse ``argv`` with the click command it starts, as the shell would."""
    program, subcommand, *args = argv
    if program == "dask":
        commands = {ep.name: ep for ep in entry_points(group="dask_cli")}
        assert subcommand in {"scheduler", "worker"}, argv
        command = commands[subcommand].load()
    elif program == "psmi-dask":
        assert "psmi-dask" in PYPROJECT["project"]["scripts"]
        group = _console_script("psmi-dask")
        assert subcommand in group.commands, f"psmi-dask has no {subcommand!r}"
        command = group.commands[subcommand]
    else:
        raise AssertionError(f"{argv!r} starts neither dask nor psmi-dask")
    try:
        command.make_context(f"{program} {subcommand}", list(args))
    except click.ClickException as error:
        raise AssertionError(f"{argv!r}: {error.format_message()}") from error


@pytest.fixture(scope="module")
def jobqueue_recipe():
    pytest.importorskip("dask_jobqueue")
    path = DEPLOY / "hpc" / "psmi_jobqueue.py"
    spec = importlib.util.spec_from_file_location("psmi_jobqueue", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOPBACK_SCHEDULER = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}


def test_deploy_has_every_recipe():
    names = {_relative(path) for path in DEPLOY.rglob("*") if path.is_file()}
    assert {
        "deploy/README.md",
        "deploy/docker/Dockerfile",
        "deploy/docker/compose.yaml",
        "deploy/kubernetes/daskcluster.yaml",
        "deploy/hpc/psmi_jobqueue.py",
        "deploy/hosts/psmi-hosts.sh",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=_relative)
def test_yaml_parses(path):
    docs = _load(path)
    assert docs, f"{_relative(path)} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)


@pytest.mark.parametrize("path", YAML_FILES, ids=_relative)
def test_manifests_use_the_psmi_dask_image(path):
    for doc in _load(path):
        images = list(_walk(doc, "image"))
        for where, image, _ in _containers(doc):
            assert image == IMAGE, f"{_relative(path)} {where}: {image!r}"
        assert set(images) <= {IMAGE}, f"{_relative(path)}: {images}"


@pytest.mark.parametrize("path", YAML_FILES, ids=_relative)
def test_manifest_commands_exist(path):
    for doc in _load(path):
        for where, _, argv in _containers(doc):
            assert argv, f"{_relative(path)} {where} names no command"
            check_argv([str(arg) for arg in argv])


def test_dockerfile_builds_on_the_dask_image():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM ghcr\.io/dask/dask:", text, re.MULTILINE)
    copied = re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            # README.md is pyproject's readme, written with the package docs.
            readme = PYPROJECT["project"]["readme"]
            assert (ROOT / source).exists() or source == readme, source
    assert "pip install" in text


def test_compose_builds_the_image_it_runs():
    compose = _load(DEPLOY / "docker" / "compose.yaml")[0]
    services = compose["services"]
    assert {"scheduler", "worker", "job"} <= set(services)
    for service in services.values():
        build = service["build"]
        context = (DEPLOY / "docker" / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file()
        assert "/data" in {volume.rsplit(":", 1)[1] for volume in service["volumes"]}
    assert services["worker"]["deploy"]["replicas"] >= 2
    job = services["job"]["command"]
    assert job[job.index("--scheduler") + 1] == "tcp://scheduler:8786"


def test_daskcluster_manifest_sets_worker_limits():
    cluster = _load(DEPLOY / "kubernetes" / "daskcluster.yaml")[0]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["kind"] == "DaskCluster"
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits)
    args = worker["args"]
    assert "--memory-limit" in args and "--nthreads" in args
    env = {item["name"]: item["value"] for item in worker["env"]}
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"

    job = _load(DEPLOY / "kubernetes" / "fit-job.yaml")[0]
    (fit,) = job["spec"]["template"]["spec"]["containers"]
    name = cluster["metadata"]["name"]
    assert fit["args"][fit["args"].index("--scheduler") + 1] == (
        f"tcp://{name}-scheduler:8786"
    )


@pytest.mark.parametrize("path", SHELL_FILES, ids=_relative)
def test_shell_recipes_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def _stub_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A bin/ of stand-ins for dask, psmi-dask and python that log argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.jsonl"
    for name in ("dask", "psmi-dask", "python"):
        stub = bin_dir / name
        stub.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            f"    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
        )
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return bin_dir, log


def _logged(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_hosts_recipe_runs_real_commands(tmp_path):
    bin_dir, log = _stub_bin(tmp_path)
    script = DEPLOY / "hosts" / "psmi-hosts.sh"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    address = "tcp://10.0.0.1:8786"
    for args in (
        ["scheduler"],
        ["worker", address],
        ["run", address, "f.zarr", "y.npy", "out.zarr", "--seed", "0"],
    ):
        subprocess.run(["bash", str(script), *args], env=env, check=True, timeout=30)

    scheduler, worker, run = _logged(log)
    assert scheduler[:2] == ["dask", "scheduler"]
    assert worker[:3] == ["dask", "worker", address]
    assert run == [
        "psmi-dask",
        *("run", "f.zarr", "y.npy", "-o", "out.zarr", "--scheduler", address),
        *("--seed", "0"),
    ]
    for argv in (scheduler, worker, run):
        check_argv(argv)


def test_sbatch_recipe_drives_the_jobqueue_script(tmp_path, jobqueue_recipe):
    _, log = _stub_bin(tmp_path)
    env = {**os.environ, "PSMI_ENV": str(tmp_path), "PSMI_QUEUE": "normal"}
    subprocess.run(
        ["bash", str(DEPLOY / "hpc" / "fit.sbatch"), "f.zarr", "y.npy", "o.zarr"],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=30,
    )

    ((program, script, *args),) = _logged(log)
    assert (program, script) == ("python", "deploy/hpc/psmi_jobqueue.py")
    parsed = jobqueue_recipe.parse_args(args)
    assert parsed.env == str(tmp_path) and parsed.queue == "normal"
    check_argv(
        ["psmi-dask", "run", "f.zarr", "y.npy", "-o", "o.zarr", *parsed.run_args]
    )


def test_jobqueue_recipe_renders_a_slurm_job_script(tmp_path, jobqueue_recipe):
    env = tmp_path / "envs" / "psmi"
    with jobqueue_recipe.make_cluster(
        "slurm",
        cores=8,
        memory="32GiB",
        walltime="02:00:00",
        queue="normal",
        account="proj",
        env=str(env),
        job_extra_directives=["--constraint=skylake"],
        scheduler_options=LOOPBACK_SCHEDULER,
    ) as cluster:
        script = cluster.job_script()

    lines = script.splitlines()
    assert "#SBATCH --cpus-per-task=8" in lines
    assert "#SBATCH -p normal" in lines and "#SBATCH -A proj" in lines
    assert "#SBATCH --constraint=skylake" in lines
    assert f"source {env}/bin/activate" in lines
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert f"export {name}=1" in lines
    (launch,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    assert launch.startswith(f"{env}/bin/python -m distributed.cli.dask_worker ")
    assert "--nthreads 8" in launch
    # The environment is set up before the worker starts.
    assert lines.index(f"source {env}/bin/activate") < lines.index(launch)


def test_jobqueue_recipe_pbs_variant_and_conda_env(tmp_path, jobqueue_recipe):
    env = tmp_path / "conda-env"
    (env / "conda-meta").mkdir(parents=True)
    with jobqueue_recipe.make_cluster(
        "pbs",
        cores=4,
        memory="8GiB",
        env=str(env),
        scheduler_options=LOOPBACK_SCHEDULER,
    ) as cluster:
        script = cluster.job_script()

    assert "#PBS -l select=1:ncpus=4" in script
    assert f"conda activate {env}" in script
    assert 'python -c "import psmi_dask"' in script

    with pytest.raises(ValueError, match="batch must be 'slurm' or 'pbs'"):
        jobqueue_recipe.make_cluster("lsf")


def test_jobqueue_prologue_sets_up_this_environment(tmp_path, jobqueue_recipe):
    """The rendered set-up lines, run by bash, give a Python with psmi_dask."""
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtualenv with bin/activate")
    with jobqueue_recipe.make_cluster(
        env=sys.prefix, scheduler_options=LOOPBACK_SCHEDULER
    ) as cluster:
        script = cluster.job_script()

    lines = script.splitlines()
    launch = next(i for i, line in enumerate(lines) if "dask_worker" in line)
    check = "python -c \"import os, psmi_dask; print(os.environ['OMP_NUM_THREADS'])\""
    result = subprocess.run(
        ["bash", "-c", "\n".join([*lines[:launch], check])],
        env={**os.environ, "PATH": "/usr/bin:/bin"},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_jobqueue_print_job_script(capsys, jobqueue_recipe, monkeypatch):
    import dask

    monkeypatch.setattr(
        jobqueue_recipe,
        "make_cluster",
        _with_scheduler_options(jobqueue_recipe.make_cluster, LOOPBACK_SCHEDULER),
    )
    with dask.config.set({"distributed.comm.timeouts.connect": "10s"}):
        assert jobqueue_recipe.main(["--print-job-script", "--cores", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!") and "distributed.cli.dask_worker" in out


class _LocalJobs:
    """A LocalCluster that takes jobs like a JobQueueCluster, for main()."""

    def __init__(self):
        from distributed import LocalCluster

        self._cluster = LocalCluster(
            n_workers=0, threads_per_worker=1, processes=False, dashboard_address=None
        )
        self.scheduler_address = self._cluster.scheduler_address
        self.jobs = None

    def scale(self, jobs):
        self.jobs = jobs
        self._cluster.scale(jobs)

    def __getattr__(self, name):
        return getattr(self._cluster, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._cluster.close()


def test_jobqueue_main_scales_then_runs_the_cli(jobqueue_recipe, monkeypatch):
    cluster = _LocalJobs()
    calls = []
    monkeypatch.setattr(jobqueue_recipe, "make_cluster", lambda *a, **k: cluster)
    monkeypatch.setattr(
        jobqueue_recipe.subprocess,
        "call",
        lambda command, env: calls.append((command, env)) or 0,
    )
    argv = ["f.zarr", "y.npy", "-o", "o.zarr", "--jobs", "2", "--", "--seed", "1"]
    assert jobqueue_recipe.main(argv) == 0

    assert cluster.jobs == 2
    ((command, env),) = calls
    assert Path(command[0]).name == "psmi-dask"
    assert command[1:] == [
        *("run", "f.zarr", "y.npy", "-o", "o.zarr"),
        *("--scheduler", cluster.scheduler_address, "--seed", "1"),
    ]
    check_argv(["psmi-dask", *command[1:]])
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"


def _with_scheduler_options(make_cluster, options):
    def patched(*args, **kwargs):
        return make_cluster(*args, **{**kwargs, "scheduler_options": options})

    return patched


def test_readme_names_every_recipe_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.name in readme, f"deploy/README.md does not mention {path}"


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(
        ["docker", "compose", "version"], check=False, capture_output=True, timeout=30
    )
    return result.returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="no docker client with compose")
def test_compose_config_is_valid():
    result = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "docker" / "compose.yaml")]
        + ["config", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
