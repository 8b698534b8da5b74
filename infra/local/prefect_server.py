"""A Prefect server (sqlite) and process workers; work pools and queues created through its REST API."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import httpx

from infra.local.processes import HOST, Service, StackError, _bin, child_env, free_port, http_ok, spawn, wait_healthy


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


def worker_registered(api_url: str, pool: str, name: str) -> bool:
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
    return wait_healthy(svc, lambda: worker_registered(api_url, pool, name), timeout, t0)


def _create_unless_present(url: str, create_url: str, body: dict) -> None:
    """Unless url exists, POST body to create_url (409: created meanwhile by someone else, fine)."""
    if httpx.get(url, timeout=5.0).status_code == 200:
        return
    r = httpx.post(create_url, json=body, timeout=10.0)
    if r.status_code not in (200, 201, 409):
        raise StackError(f"creating {url} failed: {r.status_code} {r.text[:300]}")


def ensure_work_pool(api_url: str, pool: str, type: str = "process") -> None:
    """Create a work pool unless it exists. Its job template stays empty until the first worker of the pool
    registers: the server then fills in that worker type's default (what `prefect work-pool create` would set)."""
    _create_unless_present(f"{api_url}/work_pools/{pool}", f"{api_url}/work_pools/", {"name": pool, "type": type})


def ensure_work_queue(api_url: str, pool: str, queue: str) -> None:
    """Create a work queue in pool unless it exists."""
    _create_unless_present(f"{api_url}/work_pools/{pool}/queues/{queue}", f"{api_url}/work_pools/{pool}/queues",
                          {"name": queue})
