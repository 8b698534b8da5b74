"""Processes we start and stop by pid: free ports, spawning in a session, health polling, stopping a whole group.

Shared by the service modules (s3, mlflow_server, prefect_server) and the `stack` orchestrator.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
# Every child gets these: no analytics or telemetry leaves the machine.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}
# SeaweedFS's embedded maintenance worker dials the admin gRPC port at admin port + 10000,
# whatever -admin.port.grpc says, so the two are chosen together.
class StackError(RuntimeError):
    """A service failed to start or to become healthy."""


# ---------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (sockets held open together so the kernel cannot repeat one)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    """True if 127.0.0.1:port can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: a port left in TIME_WAIT by a stopped server counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def preferred_port(port: int) -> int:
    """The given port if free, else any free port (friendly defaults like 4200 for humans)."""
    return port if port and port_is_free(port) else free_port()


# ---------------------------------------------------------------- processes


def _bin(name: str) -> str:
    """Path of a console script, preferring the one beside this Python (the venv)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"executable {name!r} not found (is the virtualenv installed?)")
    return found


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment plus telemetry switches plus extra."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.update(extra or {})
    return env


def _start_time(pid: int) -> int | None:
    """Kernel start time of pid (clock ticks), to tell our process from a reused pid; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _reap(pid: int) -> None:
    """Collect pid's exit status if it is our own child, so a zombie does not look alive."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def pid_alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as gone)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process is left in group pgid."""
    if Path("/proc/self/stat").exists():  # Linux: zombies waiting for a slow reaper do not count
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(pid: int, sig: int, group: bool) -> None:
    """Send sig to pid's own group (if it leads one) or to pid alone; gone is fine."""
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int, group: bool, timeout: float) -> bool:
    """Poll until pid (and its group) has exited; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        gone = not pid_alive(pid) and not (group and _group_alive(pid))
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


def stop_pid(pid: int, timeout: float = 10.0, started: int | None = None) -> bool:
    """SIGTERM pid (and its own process group), wait up to timeout, then SIGKILL; True if it ran.

    `started` (from /proc) guards against killing an unrelated process that reused the pid.
    """
    if started is not None and _start_time(pid) not in (None, started):
        return False
    # A live group with id pid can only be ours: Linux never reuses a pid while its group exists,
    # so this also catches children left behind by a leader that already died.
    group = _group_alive(pid)
    if not (pid_alive(pid) or group):
        return False
    _send(pid, signal.SIGTERM, group)
    if not _wait_gone(pid, group, timeout):
        _send(pid, signal.SIGKILL, group)  # e.g. a Prefect worker that ignores SIGTERM
        if not _wait_gone(pid, group, 5.0):
            raise StackError(f"pid {pid} survived SIGKILL")
    return True


@dataclass(kw_only=True)
class Service:
    """A process we started: where it listens, where it logs, how to stop it."""

    name: str
    pid: int
    url: str
    log_path: Path
    started: int | None = None
    ready_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        """True while the process runs."""
        return pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process group (timeout, then SIGKILL)."""
        stop_pid(self.pid, timeout, self.started)
        if self.proc is not None:
            self.proc.poll()  # mark the Popen finished (already reaped) to avoid a ResourceWarning

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the service log."""
        return log_tail(self.log_path, lines)

    def to_state(self) -> dict[str, Any]:
        """JSON-safe description (no secrets) for state.json."""
        return {
            "name": self.name,
            "pid": self.pid,
            "started": self.started,
            "url": self.url,
            "log": str(self.log_path),
            "ready_s": self.ready_s,
            **self.info,
        }


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file ('' if missing)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    url: str = "",
    cwd: Path | None = None,
) -> Service:
    """Start argv in its own session (so its whole group can be stopped), logging to log_path."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name=name, pid=proc.pid, url=url, log_path=log_path, started=_start_time(proc.pid), proc=proc)


def wait_healthy(svc: Service, check: Callable[[], bool], timeout: float, t0: float | None = None) -> Service:
    """Poll check() until True; on early exit or timeout stop svc and raise with the log tail."""
    t0 = time.monotonic() if t0 is None else t0
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise StackError(f"{svc.name} exited during start-up; log {svc.log_path}:\n{svc.log_tail()}")
        if check():
            svc.ready_s = round(time.monotonic() - t0, 2)
            return svc
        time.sleep(0.2)
    svc.stop()
    raise StackError(f"{svc.name} not healthy after {timeout:.0f}s; log {svc.log_path}:\n{svc.log_tail()}")


def http_ok(url: str) -> bool:
    """True if GET url answers 200."""
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
