"""SeaweedFS (`weed mini`) as the S3 endpoint: one identity, one bucket, every listener on a free port."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.local.processes import (
    HOST,
    Service,
    StackError,
    _bin,
    child_env,
    free_ports,
    port_is_free,
    spawn,
    wait_healthy,
)

# SeaweedFS's embedded maintenance worker dials the admin gRPC port at admin port + 10000,
# whatever -admin.port.grpc says, so the two are chosen together.
WEED_ADMIN_GRPC_OFFSET = 10000


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


def _free_port_pair(offset: int) -> int:
    """A port p such that p and p + offset are both free."""
    for _ in range(200):
        p = random.randint(20000, 65535 - offset)
        if port_is_free(p) and port_is_free(p + offset):
            return p
    raise StackError(f"no free port pair (p, p+{offset}) found")


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
