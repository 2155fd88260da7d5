"""Test hosts made of Linux network namespaces, for the cross-host tests.

A :class:`NetnsHosts` builds a private subnet for one test: a bridge in the
root namespace holding the subnet's first address, and one namespace per
host, each joined to the bridge by a veth pair and given its own address.
The root namespace (the test process) reaches every host through the
bridge, so no forwarding or routing is involved and no traffic leaves the
machine. Every name carries a random suffix so that a run killed before its
teardown never collides with a later one.

:class:`DaskHosts` starts a ``dask scheduler`` in the first host and one
``dask worker`` in each of the others, with the Python environment running
the tests, and stops them again.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
SCHEDULER_PORT = 8786

# Fast failure detection, so that a host whose link goes down is noticed in
# seconds instead of the defaults' minutes (worker-ttl 5 minutes, TCP 30 s).
# distributed needs the TCP timeout to be more than its 10 keepalive probes.
DASK_TEST_ENV = {
    "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "8s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
    "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "10",
}


class NetnsError(RuntimeError):
    """An ``ip`` command that builds or removes the test network failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ip", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Say why network namespaces cannot be made here, or None if they can."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    if shutil.which("ip") is None:
        return "no `ip` binary (install iproute2)"
    probe = f"psmi-probe-{secrets.token_hex(3)}"
    try:
        result = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` could not run: {exc}"
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            cidr = words[words.index("inet") + 1]
            networks.append(ipaddress.ip_interface(cidr).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word[:1].isdigit():
            networks.append(ipaddress.ip_network(word, strict=False))
    return networks


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A random /24 in 10.128.0.0/9 that overlaps no address or route here."""
    rng = rng or random.SystemRandom()
    used = _used_networks()
    for _ in range(200):
        candidate = ipaddress.ip_network(
            f"10.{rng.randrange(128, 255)}.{rng.randrange(0, 256)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError("found no free /24 in 10.128.0.0/9 for the test network")


@dataclass
class Host:
    """One namespace: its name, its address and the root end of its link."""

    name: str
    namespace: str
    address: str
    root_link: str
    host_link: str


@dataclass
class NetnsHosts:
    """Namespaces joined by a bridge on a private subnet; see the module doc."""

    names: tuple[str, ...]
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    bridge_address: str = ""
    _made: list[tuple[str, ...]] = field(default_factory=list)

    def build(self) -> NetnsHosts:
        self.subnet = self.subnet or pick_subnet()
        addresses = list(self.subnet.hosts())
        prefix = self.subnet.prefixlen
        self.bridge = f"psmb{self.suffix}"
        self.bridge_address = str(addresses[0])

        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "delete", self.bridge))
        _ip("addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names):
            host = Host(
                name=name,
                namespace=f"psmi-{self.suffix}-{name}",
                address=str(addresses[index + 1]),
                root_link=f"psmv{self.suffix}{index}",
                host_link=f"psmn{self.suffix}{index}",
            )
            self._add_host(host, prefix)
            self.hosts[name] = host
        return self

    def _add_host(self, host: Host, prefix: int) -> None:
        _ip("netns", "add", host.namespace)
        self._made.append(("netns", "delete", host.namespace))
        _ip(
            "link",
            "add",
            host.root_link,
            "type",
            "veth",
            "peer",
            "name",
            host.host_link,
        )
        self._made.append(("link", "delete", host.root_link))
        _ip("link", "set", host.host_link, "netns", host.namespace)
        _ip("link", "set", host.root_link, "master", self.bridge)
        _ip("link", "set", host.root_link, "up")
        in_ns = ("netns", "exec", host.namespace, "ip")
        _ip(*in_ns, "addr", "add", f"{host.address}/{prefix}", "dev", host.host_link)
        _ip(*in_ns, "link", "set", host.host_link, "up")
        _ip(*in_ns, "link", "set", "lo", "up")

    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` inside host ``name``."""
        return ["ip", "netns", "exec", self.hosts[name].namespace, *argv]

    def cut(self, name: str) -> None:
        """Take the root end of host ``name``'s link down: its cable is cut."""
        _ip("link", "set", self.hosts[name].root_link, "down")

    def teardown(self) -> list[str]:
        """Remove everything build() made; return the errors, never raise."""
        errors = []
        for args in reversed(self._made):
            try:
                result = _ip(*args, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"ip {' '.join(args)}: {exc}")
                continue
            # A veth end goes with its namespace, so "Cannot find" is fine.
            if result.returncode != 0 and "Cannot find" not in result.stderr:
                errors.append(f"ip {' '.join(args)}: {result.stderr.strip()}")
        self._made.clear()
        return errors


def wait_for_port(address: str, port: int, process: subprocess.Popen, timeout: float):
    """Wait until ``address:port`` accepts connections, bounded by timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process {process.args!r} exited with {process.returncode} "
                f"before listening on {address}:{port}"
            )
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {address}:{port} after {timeout} s")


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a process started in its own session, and its children."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The nanny's worker may outlive it for a moment; reap the group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def recipe_path_env() -> dict[str, str]:
    """PATH that finds this environment's ``dask`` and ``psmi-dask`` first."""
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


@dataclass
class DaskHosts:
    """A dask scheduler in the first host and a dask worker in each other."""

    network: NetnsHosts
    log_dir: Path
    pythonpath: tuple[str, ...] = ()
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def scheduler_host(self) -> Host:
        return self.network.hosts[self.network.names[0]]

    @property
    def worker_hosts(self) -> list[Host]:
        return [self.network.hosts[name] for name in self.network.names[1:]]

    @property
    def scheduler_address(self) -> str:
        return f"tcp://{self.scheduler_host.address}:{SCHEDULER_PORT}"

    def _spawn(
        self, host: Host, argv: list[str], extra_env: dict[str, str]
    ) -> subprocess.Popen:
        log = open(self.log_dir / f"{host.name}.log", "wb")  # noqa: SIM115
        env = {**os.environ, **DASK_TEST_ENV, **extra_env}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])]
            )
        try:
            process = subprocess.Popen(
                self.network.exec_argv(host.name, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        self.processes[host.name] = process
        return process

    def _scheduler_command(self, recipe: Path | None) -> tuple[list[str], dict]:
        host = self.scheduler_host
        if recipe is not None:
            env = {"PSMI_HOST": host.address, "PSMI_PORT": str(SCHEDULER_PORT)}
            return ["bash", str(recipe), "scheduler"], {**env, **recipe_path_env()}
        return [
            *(sys.executable, "-m", "distributed.cli.dask_scheduler"),
            *("--host", host.address, "--port", str(SCHEDULER_PORT)),
            "--no-dashboard",
        ], {}

    def _worker_command(
        self, host: Host, recipe: Path | None
    ) -> tuple[list[str], dict]:
        scratch = self.log_dir / f"{host.name}-scratch"
        if recipe is not None:
            env = {"PSMI_HOST": host.address, "PSMI_NTHREADS": "1"}
            argv = ["bash", str(recipe), "worker", self.scheduler_address]
            return argv, {**env, **recipe_path_env()}
        return [
            *(sys.executable, "-m", "distributed.cli.dask_worker"),
            self.scheduler_address,
            *("--host", host.address, "--name", host.name),
            *("--nworkers", "1", "--nthreads", "1"),
            *("--local-directory", str(scratch)),
            *("--no-dashboard", "--death-timeout", "60"),
        ], {}

    def start(self, timeout: float = 30.0, recipe: Path | None = None) -> DaskHosts:
        """Start the processes; with ``recipe``, through deploy/hosts' script."""
        scheduler = self._spawn(self.scheduler_host, *self._scheduler_command(recipe))
        for host in self.worker_hosts:
            self._spawn(host, *self._worker_command(host, recipe))
        wait_for_port(self.scheduler_host.address, SCHEDULER_PORT, scheduler, timeout)
        return self

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (last 3000 characters)\n{text[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process)
        self.processes.clear()
