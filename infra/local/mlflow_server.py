"""An MLflow tracking server: sqlite backend, artifacts in the S3 bucket (or a local folder)."""

from __future__ import annotations

import time
from pathlib import Path

from infra.local.processes import HOST, Service, _bin, child_env, free_port, http_ok, spawn, wait_healthy
from infra.local.s3 import S3Service


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
