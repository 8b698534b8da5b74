"""Local real-service stack on 127.0.0.1: SeaweedFS (S3), MLflow server, Prefect server and workers.

Used by the tests (one function per service) and by `python -m infra.local.stack up|down|status`.
Secrets travel only through a child's environment or a mode-600 file, never on a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
WEED_ADMIN_GRPC_OFFSET = 10000


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


def _free_port_pair(offset: int) -> int:
    """A port p such that p and p + offset are both free."""
    for _ in range(200):
        p = random.randint(20000, 65535 - offset)
        if port_is_free(p) and port_is_free(p + offset):
            return p
    raise StackError(f"no free port pair (p, p+{offset}) found")


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


@dataclass(kw_only=True)
class S3Service(Service):
    """A SeaweedFS S3 endpoint with one identity and one bucket."""

    endpoint_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    bucket: str

    def storage_options(self) -> dict[str, Any]:
        """Options for fsspec/s3fs: `fsspec.filesystem("s3", **s3.storage_options())`."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        return _s3_client(self.endpoint_url, self.access_key, self.secret_key)

    def to_state(self) -> dict[str, Any]:
        """As Service.to_state plus endpoint and bucket (never the keys)."""
        return {**super().to_state(), "endpoint_url": self.endpoint_url, "bucket": self.bucket}


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


# ---------------------------------------------------------------- SeaweedFS


def _s3_client(endpoint_url: str, access_key: str, secret_key: str) -> Any:
    """A boto3 S3 client with short timeouts and no retries (health checks poll anyway)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


def write_s3_identities(path: Path, access_key: str, secret_key: str) -> None:
    """Write SeaweedFS's -s3.config identities file, readable by the owner only."""
    config = {
        "identities": [
            {
                "name": "rapidin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through os.open


def _weed_ports(s3_port: int | None) -> dict[str, int]:
    """Free ports for every listener of `weed mini` (so two instances can run side by side)."""
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    if s3_port:
        ports["s3"] = s3_port
    ports["admin"] = _free_port_pair(WEED_ADMIN_GRPC_OFFSET)
    ports["admin.grpc"] = ports["admin"] + WEED_ADMIN_GRPC_OFFSET
    return ports


def _weed_argv(data: Path, config: Path, ports: dict[str, int]) -> list[str]:
    """Command line for `weed mini` (no secrets: they are in the config file)."""
    flags = {
        "master.port": ports["master"],
        "master.port.grpc": ports["master.grpc"],
        "volume.port": ports["volume"],
        "volume.port.grpc": ports["volume.grpc"],
        "filer.port": ports["filer"],
        "filer.port.grpc": ports["filer.grpc"],
        "s3.port": ports["s3"],
        "s3.port.grpc": ports["s3.grpc"],
        "admin.port": ports["admin"],
        "admin.port.grpc": ports["admin.grpc"],
        # Unused gateways are switched off rather than given ports.
        "s3.port.iceberg": 0,
        "s3.port.lance": 0,
        "webdav": "false",
    }
    return [
        _bin("weed"),
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.config={config}",
        "-master.telemetry=false",
        *(f"-{k}={v}" for k, v in flags.items()),
    ]


def _s3_ready(client: Any) -> Callable[[], bool]:
    """A check that an authenticated ListBuckets succeeds."""

    def check() -> bool:
        try:
            client.list_buckets()
            return True
        except Exception:  # connection refused, not yet serving, identities not loaded
            return False

    return check


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create bucket unless it exists already."""
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def start_seaweedfs(
    data_dir: Path | str,
    access_key: str,
    secret_key: str,
    bucket: str,
    s3_port: int | None = None,
    timeout: float = 60.0,
    ports: dict[str, int] | None = None,
) -> S3Service:
    """Start `weed mini` in data_dir with all ports free, wait for S3, create bucket.

    `ports` (a previous service's `info["ports"]`) restarts on exactly those ports, e.g. to bring a
    stopped server back on the same data directory and endpoint.
    """
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    write_s3_identities(config, access_key, secret_key)
    fixed = dict(ports) if ports else None
    for attempt in range(3):  # a port taken between choosing and binding: choose again
        t0 = time.monotonic()
        ports = fixed or _weed_ports(s3_port)
        endpoint = f"http://{HOST}:{ports['s3']}"
        svc = spawn("seaweedfs", _weed_argv(data_dir / "data", config, ports), child_env(),
                    data_dir / "weed.log", url=endpoint, cwd=data_dir)
        client = _s3_client(endpoint, access_key, secret_key)
        try:
            wait_healthy(svc, _s3_ready(client), timeout, t0)
            break
        except StackError:
            clash = "not available" in svc.log_tail() or "address already in use" in svc.log_tail()
            svc.stop()
            if not clash or fixed or attempt == 2:
                raise
    ensure_bucket(client, bucket)
    return S3Service(
        name=svc.name, pid=svc.pid, url=endpoint, log_path=svc.log_path, started=svc.started,
        ready_s=svc.ready_s, info={"ports": ports}, proc=svc.proc,
        endpoint_url=endpoint, access_key=access_key, secret_key=secret_key, bucket=bucket,
    )


# ---------------------------------------------------------------- Prefect and MLflow


def prefect_server_env(home_dir: Path, api_url: str) -> dict[str, str]:
    """Environment for a Prefect server keeping all state (profiles, sqlite DB) in home_dir."""
    return child_env({
        "PREFECT_HOME": str(home_dir),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home_dir}/prefect.db",
        "PREFECT_API_URL": api_url,
    })


def start_prefect_server(home_dir: Path | str, port: int | None = None, ui: bool = True,
                         timeout: float = 120.0) -> Service:
    """Start `prefect server start` on 127.0.0.1 and wait for /api/health."""
    home_dir = Path(home_dir).resolve()
    home_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://{HOST}:{port}/api"
    argv = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    argv += [] if ui else ["--no-ui"]
    t0 = time.monotonic()
    svc = spawn("prefect-server", argv, prefect_server_env(home_dir, api_url), home_dir / "server.log",
                url=api_url, cwd=home_dir)
    svc.info = {"port": port, "health": f"{api_url}/health", "ui": f"http://{HOST}:{port}"}
    return wait_healthy(svc, lambda: http_ok(f"{api_url}/health"), timeout, t0)


def start_mlflow_server(dir: Path | str, s3: S3Service | None = None, port: int | None = None,
                        workers: int = 1, jobs: bool = False, timeout: float = 120.0) -> Service:
    """Start `mlflow server` (sqlite backend; artifacts in s3://BUCKET/mlflow or DIR/artifacts)."""
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    dest = f"s3://{s3.bucket}/mlflow" if s3 else str(dir / "artifacts")
    argv = [_bin("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{dir}/mlflow.db", "--artifacts-destination", dest]
    # MLflow 3's job runner (GenAI evaluation) forks ~8 huey consumers (~2 GB RSS, leftover
    # /dev/shm dirs); the pipeline does not use it.
    extra = {} if jobs else {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3:
        extra |= {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
                 "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
    url = f"http://{HOST}:{port}"
    t0 = time.monotonic()
    svc = spawn("mlflow-server", argv, child_env(extra), dir / "server.log", url=url, cwd=dir)
    svc.info = {"port": port, "health": f"{url}/health", "artifacts": dest}
    return wait_healthy(svc, lambda: http_ok(f"{url}/health"), timeout, t0)


def _worker_registered(api_url: str, pool: str, name: str) -> bool:
    """True once the Prefect API lists a worker called name in pool (its first heartbeat)."""
    try:
        r = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=2.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and any(w.get("name") == name for w in r.json())


def start_prefect_worker(
    pool: str,
    api_url: str,
    queue: str | None = None,
    work_dir: Path | str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 90.0,
) -> Service:
    """Start a process-type `prefect worker` on pool (optionally one queue); wait until it registers."""
    label = pool if not queue else queue if queue.startswith(f"{pool}-") else f"{pool}-{queue}"
    name = f"{label}-{secrets.token_hex(3)}"  # unique, so readiness can look for this very worker
    work_dir = Path(work_dir).resolve() if work_dir else None
    log_dir = work_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    argv = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    argv += ["--work-queue", queue] if queue else []
    env = child_env({"PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": "1", **(extra_env or {})})
    if work_dir:
        work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    svc = spawn(f"worker-{label}", argv, env, log_dir / f"worker-{label}.log",
                url=api_url, cwd=work_dir)
    svc.info = {"pool": pool, "queue": queue, "worker_name": name}
    return wait_healthy(svc, lambda: _worker_registered(api_url, pool, name), timeout, t0)


def _prefect_cli(args: list[str], api_url: str, home_dir: Path) -> None:
    """Run a `prefect` CLI command against api_url; raise with its output on failure."""
    env = child_env({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home_dir)})
    r = subprocess.run([_bin("prefect"), *args], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise StackError(f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")


def ensure_work_pool(api_url: str, pool: str, home_dir: Path, type: str = "process") -> None:
    """Create a work pool unless it exists."""
    if httpx.get(f"{api_url}/work_pools/{pool}", timeout=5.0).status_code != 200:
        _prefect_cli(["work-pool", "create", pool, "--type", type], api_url, home_dir)


def ensure_work_queue(api_url: str, pool: str, queue: str, home_dir: Path) -> None:
    """Create a work queue in pool unless it exists."""
    if httpx.get(f"{api_url}/work_pools/{pool}/queues/{queue}", timeout=5.0).status_code != 200:
        _prefect_cli(["work-queue", "create", queue, "--pool", pool], api_url, home_dir)


# ---------------------------------------------------------------- the `up/down/status` CLI

BUCKET = "rapidin"
CREDENTIAL_VARS = ("RAPIDIN_S3_ACCESS_KEY", "RAPIDIN_S3_SECRET_KEY")


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv-style file."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {k.strip(): v.strip().strip("'\"") for k, v in pairs}


def load_credentials(stack_dir: Path) -> tuple[str, str]:
    """S3 key/secret from the environment, else credentials.env, else new random ones saved there."""
    key, secret = (os.environ.get(v) for v in CREDENTIAL_VARS)
    if key and secret:
        return key, secret
    path = stack_dir / "credentials.env"
    if path.exists():
        saved = _read_env_file(path)
        return saved[CREDENTIAL_VARS[0]], saved[CREDENTIAL_VARS[1]]
    key, secret = "rapidin-" + secrets.token_hex(8), secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{CREDENTIAL_VARS[0]}={key}\n{CREDENTIAL_VARS[1]}={secret}\n")
    return key, secret


def pipeline_env(s3: S3Service, mlflow_url: str, prefect_api: str, gpu_queues: int) -> dict[str, str]:
    """Non-secret settings that point rapidin, MLflow and Prefect at the stack."""
    return {
        "RAPIDIN_STORE_URL": f"s3://{s3.bucket}/cache",
        "RAPIDIN_DATA_URL": f"s3://{s3.bucket}/data",
        "RAPIDIN_S3_ENDPOINT_URL": s3.endpoint_url,
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "RAPIDIN_MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_API_URL": prefect_api,
        "RAPIDIN_PREFECT_API_URL": prefect_api,
        "RAPIDIN_GPU_QUEUES": str(gpu_queues),
        **QUIET_ENV,
    }


def write_env_sh(stack_dir: Path, env: dict[str, str]) -> Path:
    """Write env.sh: exports plus sourcing credentials.env (keys stay in that mode-600 file)."""
    cred = stack_dir / "credentials.env"
    lines = ["# Generated by `python -m infra.local.stack up`; source it: `source .stack/env.sh`."]
    lines += [f"export {k}='{v}'" for k, v in env.items()]
    lines += [
        f"if [ -f '{cred}' ]; then set -a; . '{cred}'; set +a; fi",
        'export AWS_ACCESS_KEY_ID="${RAPIDIN_S3_ACCESS_KEY}"',
        'export AWS_SECRET_ACCESS_KEY="${RAPIDIN_S3_SECRET_KEY}"',
    ]
    path = stack_dir / "env.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_state(stack_dir: Path, services: list[Service], extra: dict[str, Any]) -> None:
    """Write state.json (urls, pids, ports; no secrets) atomically."""
    state = {**extra, "services": [s.to_state() for s in services]}
    tmp = stack_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(stack_dir / "state.json")


def _read_state(stack_dir: Path) -> dict[str, Any] | None:
    """state.json, or None if the stack is not up."""
    path = stack_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _running(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The services in state whose pid is still ours and alive."""
    return [s for s in state["services"] if pid_alive(s["pid"]) and _start_time(s["pid"]) in (None, s["started"])]


def _start_workers(api: str, gpu_workers: int, stack_dir: Path, env: dict[str, str]) -> list[Service]:
    """One worker for the cpu pool and one per gpu-i queue (pinned to GPU i), started in parallel."""
    specs: list[tuple[str, str | None, dict[str, str]]] = [("cpu", None, env)]
    specs += [("gpu", f"gpu-{i}", {**env, "CUDA_VISIBLE_DEVICES": str(i)}) for i in range(gpu_workers)]
    work = stack_dir / "workers"
    with ThreadPoolExecutor(len(specs)) as ex:
        futs = [ex.submit(start_prefect_worker, pool, api, q, work, e) for pool, q, e in specs]
        return [f.result() for f in futs]


def _start_servers(stack_dir: Path, key: str, secret: str, ports: dict[str, int],
                   services: list[Service], meta: dict[str, Any]) -> None:
    """SeaweedFS, then MLflow and Prefect servers side by side; each is recorded once started."""
    s3 = start_seaweedfs(stack_dir / "s3", key, secret, BUCKET, preferred_port(ports["s3"]))
    services.append(s3)
    _write_state(stack_dir, services, meta)
    with ThreadPoolExecutor(2) as ex:  # both mostly wait on imports and migrations: overlap them
        futs = [ex.submit(start_mlflow_server, stack_dir / "mlflow", s3, preferred_port(ports["mlflow"])),
                ex.submit(start_prefect_server, stack_dir / "prefect", preferred_port(ports["prefect"]))]
        services += [f.result() for f in futs if f.exception() is None]
    _write_state(stack_dir, services, meta)
    errors = [f.exception() for f in futs if f.exception() is not None]
    if errors:
        raise errors[0]


def _ensure_pools(api: str, gpu_workers: int, prefect_home: Path) -> None:
    """Process work pools `cpu` and `gpu`, and queues gpu-0..gpu-(N-1) in `gpu`."""
    for pool in ("cpu", "gpu"):
        ensure_work_pool(api, pool, prefect_home)
    for i in range(gpu_workers):
        ensure_work_queue(api, "gpu", f"gpu-{i}", prefect_home)


def cmd_up(stack_dir: Path, gpu_workers: int, ports: dict[str, int]) -> int:
    """Start the whole stack; record it in state.json and env.sh."""
    t0 = time.monotonic()
    stack_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(stack_dir)
    if state and _running(state):
        print(f"stack already up in {stack_dir} (run `down` first)", file=sys.stderr)
        return 1
    (stack_dir / ".gitignore").write_text("*\n")  # data, logs and keys never reach git
    key, secret = load_credentials(stack_dir)
    services: list[Service] = []
    meta = {"dir": str(stack_dir), "gpu_workers": gpu_workers}
    try:
        _start_servers(stack_dir, key, secret, ports, services, meta)
        s3, mlflow, prefect = services
        _ensure_pools(prefect.url, gpu_workers, stack_dir / "prefect")
        env = pipeline_env(s3, mlflow.url, prefect.url, gpu_workers)
        secret_env = {"RAPIDIN_S3_ACCESS_KEY": key, "RAPIDIN_S3_SECRET_KEY": secret,
                      "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        worker_env = {**env, **secret_env, "PREFECT_HOME": str(stack_dir / "prefect")}
        services += _start_workers(prefect.url, gpu_workers, stack_dir, worker_env)
    except BaseException:  # Ctrl-C included: leave nothing running
        for svc in reversed(services):
            svc.stop()
        (stack_dir / "state.json").unlink(missing_ok=True)
        raise
    elapsed = round(time.monotonic() - t0, 1)
    _write_state(stack_dir, services, {**meta, "up_seconds": elapsed})
    write_env_sh(stack_dir, env)
    for svc in services:
        print(f"{svc.name:16} pid {svc.pid:<7} ready in {svc.ready_s:5.1f}s  {svc.url}  log {svc.log_path}")
    print(f"Prefect UI {prefect.info['ui']}  MLflow UI {mlflow.url}  S3 {s3.endpoint_url} (bucket {BUCKET})")
    print(f"stack up in {elapsed}s; point the pipeline at it with: source {stack_dir / 'env.sh'}")
    return 0


def _stop_order(s: dict[str, Any]) -> int:
    """Workers first (they report to Prefect), then Prefect, MLflow, and S3 last (MLflow writes to it)."""
    order = {"prefect-server": 1, "mlflow-server": 2, "seaweedfs": 3}
    return 0 if s["name"].startswith("worker") else order.get(s["name"], 1)


def cmd_down(stack_dir: Path, timeout: float = 10.0) -> int:
    """Stop every process in state.json, workers first, SIGKILL after timeout."""
    state = _read_state(stack_dir)
    if not state:
        print(f"no stack state in {stack_dir}; nothing to stop")
        return 0
    services = sorted(state["services"], key=_stop_order)
    for s in services:
        t = time.monotonic()
        stopped = stop_pid(s["pid"], timeout, s.get("started"))
        print(f"{s['name']:18} pid {s['pid']:<7} {'stopped in %.1fs' % (time.monotonic() - t) if stopped else 'not running'}")
    (stack_dir / "state.json").unlink(missing_ok=True)
    return 0


def _healthy(s: dict[str, Any], prefect_api: str | None) -> bool:
    """Health of one recorded service: HTTP health URL, S3 answering, or worker registered."""
    if s.get("health"):
        return http_ok(s["health"])
    if s.get("endpoint_url"):
        try:
            httpx.get(s["endpoint_url"], timeout=2.0)  # any answer (403 unsigned) means serving
            return True
        except httpx.HTTPError:
            return False
    if s.get("worker_name") and prefect_api:
        return _worker_registered(prefect_api, s["pool"], s["worker_name"])
    return True


def cmd_status(stack_dir: Path) -> int:
    """Print each service's pid, liveness and health; non-zero if anything is down."""
    state = _read_state(stack_dir)
    if not state:
        print(f"stack is down (no {stack_dir / 'state.json'})")
        return 1
    api = next((s["url"] for s in state["services"] if s["name"] == "prefect-server"), None)
    running = {s["pid"] for s in _running(state)}
    ok = True
    for s in state["services"]:
        alive = s["pid"] in running
        healthy = alive and _healthy(s, api)
        ok &= healthy
        print(f"{s['name']:18} pid {s['pid']:<7} {'healthy' if healthy else 'ALIVE, unhealthy' if alive else 'DOWN'}  {s['url']}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m infra.local.stack up|down|status`."""
    p = argparse.ArgumentParser(prog="python -m infra.local.stack", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--dir", type=Path, default=Path(".stack"), help="state, data and logs (default .stack)")
    p.add_argument("--gpu-workers", type=int, default=2, help="gpu pool queues/workers gpu-0..N-1 (up)")
    p.add_argument("--s3-port", type=int, default=8333, help="preferred S3 port; a free one if taken")
    p.add_argument("--prefect-port", type=int, default=4200, help="preferred Prefect port")
    p.add_argument("--mlflow-port", type=int, default=5000, help="preferred MLflow port")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL (down)")
    a = p.parse_args(argv)
    stack_dir = a.dir.resolve()
    if a.command == "up":
        ports = {"s3": a.s3_port, "prefect": a.prefect_port, "mlflow": a.mlflow_port}
        return cmd_up(stack_dir, a.gpu_workers, ports)
    if a.command == "down":
        return cmd_down(stack_dir, a.timeout)
    return cmd_status(stack_dir)


if __name__ == "__main__":
    sys.exit(main())
