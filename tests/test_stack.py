"""The local real-service stack: SeaweedFS through s3fs, and stopping processes (the servers start in test_stack_e2e)."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import fsspec
import pytest

from infra.local.processes import pid_alive, stop_pid
from infra.local.s3 import S3Service

# Idempotent with a root conftest that lists the same plugin (pytest registers a module once).
pytest_plugins = ["tests.s3_fixtures"]


def _fs(s3: S3Service, **overrides: str) -> fsspec.AbstractFileSystem:
    """A fresh s3fs filesystem for s3 (no instance cache, so bad credentials are not shared)."""
    opts = {**s3.storage_options(), **overrides}
    return fsspec.filesystem("s3", skip_instance_cache=True, **opts)


def test_seaweed_roundtrip_and_listing(seaweed_s3: S3Service) -> None:
    """Bytes written through s3fs read back identically and show up in listings."""
    fs = _fs(seaweed_s3)
    prefix = f"{seaweed_s3.bucket}/stack-test/{uuid.uuid4().hex}"
    payload = bytes(range(256)) * 1000
    fs.pipe(f"{prefix}/a.bin", payload)
    fs.pipe(f"{prefix}/sub/b.txt", b"hello")
    assert fs.cat(f"{prefix}/a.bin") == payload
    assert sorted(fs.ls(prefix, detail=False)) == [f"{prefix}/a.bin", f"{prefix}/sub"]
    assert fs.find(prefix) == [f"{prefix}/a.bin", f"{prefix}/sub/b.txt"]
    assert fs.info(f"{prefix}/a.bin")["size"] == len(payload)
    assert seaweed_s3.bucket in [b["Name"] for b in seaweed_s3.client().list_buckets()["Buckets"]]


@pytest.mark.parametrize("field", ["secret", "key"])
def test_seaweed_rejects_wrong_credentials(seaweed_s3: S3Service, field: str) -> None:
    """A wrong secret or an unknown key is refused (PermissionError from s3fs), not served."""
    fs = _fs(seaweed_s3, **{field: "wrong-" + uuid.uuid4().hex})
    with pytest.raises(PermissionError):
        fs.ls(seaweed_s3.bucket)
    with pytest.raises(PermissionError):
        fs.pipe(f"{seaweed_s3.bucket}/should-not-exist", b"x")
    assert not _fs(seaweed_s3).exists(f"{seaweed_s3.bucket}/should-not-exist")


def _spawn_python(code: str) -> subprocess.Popen:
    """Run python -c code in its own session; it must print one line once ready."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


IGNORE_TERM = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


@pytest.fixture()
def signals_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The signals stop_pid sends, in order (behaviour, not timing: a loaded machine cannot break it)."""
    import infra.local.processes as stack

    sent: list[int] = []
    real = stack._send
    monkeypatch.setattr(stack, "_send", lambda pid, sig, group: sent.append(sig) or real(pid, sig, group))
    return sent


def test_stop_pid_kills_a_child_that_ignores_sigterm(signals_sent) -> None:
    """SIGTERM is ignored, so stop_pid waits out the timeout and then SIGKILLs."""
    proc = _spawn_python(IGNORE_TERM)
    assert proc.stdout.readline().strip() == "ready"  # handler installed before we signal
    assert stop_pid(proc.pid, timeout=1.0) is True
    assert signals_sent == [signal.SIGTERM, signal.SIGKILL]
    assert not pid_alive(proc.pid)
    assert stop_pid(proc.pid, timeout=1.0) is False  # already gone: nothing to do
    proc.stdout.close()


def test_stop_pid_is_quick_for_a_polite_child(signals_sent) -> None:
    """A child that honours SIGTERM is not SIGKILLed."""
    proc = _spawn_python("import time; print('ready', flush=True); time.sleep(60)")
    proc.stdout.readline()
    assert stop_pid(proc.pid, timeout=60.0) is True
    assert signals_sent == [signal.SIGTERM]  # SIGTERM sufficed: stop_pid did not wait out the timeout
    assert not pid_alive(proc.pid)
    proc.stdout.close()


def test_stop_pid_kills_the_whole_group(signals_sent) -> None:
    """A SIGTERM-ignoring grandchild in the child's process group is SIGKILLed with it."""
    code = (
        "import subprocess,sys,time\n"
        f"g = subprocess.Popen([sys.executable, '-c', {IGNORE_TERM!r}], stdout=subprocess.PIPE, text=True)\n"
        "g.stdout.readline(); print(g.pid, flush=True); time.sleep(60)\n"
    )
    proc = _spawn_python(code)
    grandchild = int(proc.stdout.readline())
    assert pid_alive(grandchild)
    assert stop_pid(proc.pid, timeout=1.0) is True
    assert signals_sent == [signal.SIGTERM, signal.SIGKILL]  # the grandchild outlived SIGTERM
    assert not pid_alive(proc.pid) and not pid_alive(grandchild)
    proc.stdout.close()


def test_stop_pid_refuses_a_reused_pid() -> None:
    """A start time that does not match (pid reused by another process) leaves the process alone."""
    proc = _spawn_python(IGNORE_TERM)
    proc.stdout.readline()
    try:
        assert stop_pid(proc.pid, timeout=1.0, started=1) is False
        assert pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_gpu_workers_share_the_cores(monkeypatch) -> None:
    """Each gpu worker is pinned to its GPU and gets cores / workers torch threads, unless the environment says."""
    from infra.local.stack import gpu_worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env = gpu_worker_env({"A": "1"}, 1, 2)
    assert env == {"A": "1", "OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "1"}
    assert gpu_worker_env({}, 0, 16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert gpu_worker_env({}, 0, 2)["OMP_NUM_THREADS"] == "3"
