"""The gradient cache on any fsspec URL: manifest, committed safetensors shards, examples table.

Layout (this module is its only owner): {root}/{model}/{version}/{cache_id}/manifest.json,
shards/shard-NNNNNN.safetensors with a commit record shards/shard-NNNNNN.json written after it (the per-shard
completion flag), and examples.parquet; runs' scratch files go to {root}/_work/{cache_id}-{token}, beside the caches.
No pickle anywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import io
import json
import math
import mmap
import os
import struct
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save as st_save

from .config import GradientConfig
from .errors import CacheError, StorageError
from .quantize import Int8Rows
from .sketch import RapidGradSpec
from .urls import check_url

SCHEMA_VERSION = 2  # 2: GradientConfig.adapter_tensors (a v1 manifest does not say which adapter tensors)


@atexit.register
def _stop_fsspec_io_thread() -> None:
    """Stop fsspec's IO loop (s3fs runs in it) before the interpreter shuts down. That daemon thread keeps waking for
    connection timers; once finalization has begun, a garbage collection it triggers can free torch tensors, whose
    destructor lets the GIL go and is killed taking it back: std::terminate, exit status 134 after a good run."""
    from fsspec import asyn

    thread, loop = asyn.iothread[0], asyn.loop[0]
    if thread is None or loop is None or not thread.is_alive():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    gc.collect()  # cycles holding tensors go now, from this thread, while it may still take the GIL back


def _storage_errors() -> tuple[type[BaseException], ...]:
    """OSError plus botocore's own errors, which s3fs lets through for connection failures."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


STORAGE_ERRORS = _storage_errors()


class ShardInfo(BaseModel):
    """A committed shard: its row range, the rows present, and its checksum."""

    model_config = ConfigDict(frozen=True)

    index: int
    start: int
    stop: int
    rows: int
    file: str
    sha256: str
    bytes: int
    seconds: dict[str, float] = Field(default_factory=dict)


class Manifest(BaseModel):
    """Everything that identifies and describes a cache."""

    schema_version: int = SCHEMA_VERSION
    cache_id: str
    model: dict[str, Any]
    dataset: dict[str, Any]
    gradient: GradientConfig
    sketch: RapidGradSpec
    layout: list[tuple[str, tuple[int, ...]]]
    shard_rows: int
    num_rows: int
    complete: bool = False
    shards: list[ShardInfo] = Field(default_factory=list)
    rapidin_version: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    timings: dict[str, float] = Field(default_factory=dict)
    stats: dict[str, int] = Field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        """Planned shard count."""
        return -(-self.num_rows // self.shard_rows)

    def shard_range(self, index: int) -> tuple[int, int]:
        """[start, stop) rows of shard `index`."""
        return index * self.shard_rows, min((index + 1) * self.shard_rows, self.num_rows)


def compute_cache_id(model_fp: str, data_fp: str, gradient: GradientConfig, sketch: RapidGradSpec, layout: list) -> str:
    """Hash of everything that changes the cached numbers."""
    payload = json.dumps(
        {"schema": SCHEMA_VERSION, "model": model_fp, "data": data_fp, "gradient": gradient.fingerprint_fields(),
         "sketch": sketch.model_dump(), "layout": layout},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _storage(action: str, url: str, exc: BaseException) -> StorageError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageError(f"{url}: cannot {action} ({type(exc).__name__}: {reason[:200]})")


class CacheStore:
    """One cache directory on an fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = check_url(url, "store", StorageError).rstrip("/")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise _storage("open storage", url, exc) from None
        self._local = "file" in _protocols(self.fs)
        self._bucket_checked = self._local or not hasattr(self.fs, "call_s3")

    @staticmethod
    def location(root: str, model: str, version: str, cache_id: str) -> str:
        """URL of a cache under a store root."""
        return f"{_version_dir(root, model, version)}/{cache_id}"

    @staticmethod
    def scratch_location(cache_url: str, token: str) -> str:
        """A scratch directory for one run's partial results, beside (not inside) the caches, so a cache directory
        only ever holds the cache."""
        root, _model, _version, cache_id = cache_url.rstrip("/").rsplit("/", 3)
        return f"{root}/_work/{cache_id}-{token}"

    def _p(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _check_bucket(self) -> None:
        """Before the first write to S3: refuse a bucket that does not exist, since some servers (SeaweedFS)
        would silently create one from a mistyped URL. rapidin never creates buckets."""
        if self._bucket_checked:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(f"{self.url}: bucket {bucket!r} does not exist (rapidin never creates buckets; "
                               "create it or fix the store URL)") from None
        except PermissionError:
            pass  # a key allowed to write but not to list: the write itself says whether it may
        except STORAGE_ERRORS as exc:
            raise _storage("reach storage", self.url, exc) from None
        self._bucket_checked = True

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic write: temp file + rename locally; a single PUT (atomic by itself) on object stores."""
        path = self._p(name)
        self._check_bucket()
        try:
            if self._local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except STORAGE_ERRORS as exc:
            raise _storage(f"write {name}", self.url, exc) from None

    def read_bytes(self, name: str) -> bytes:
        """Read a file of the cache."""
        try:
            return self.fs.cat_file(self._p(name))
        except FileNotFoundError:
            raise CacheError(f"{self.url}: {name} not found") from None
        except STORAGE_ERRORS as exc:
            raise _storage(f"read {name}", self.url, exc) from None

    def exists(self, name: str) -> bool:
        """Whether a file exists in the cache."""
        try:
            return self.fs.exists(self._p(name))
        except STORAGE_ERRORS as exc:
            raise _storage("reach storage", self.url, exc) from None

    def read_manifest(self) -> Manifest:
        """The manifest, validated."""
        raw = self.read_bytes("manifest.json")
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise CacheError(f"{self.url}/manifest.json: invalid manifest ({str(exc).splitlines()[0]})") from None
        if manifest.schema_version != SCHEMA_VERSION:
            raise CacheError(f"{self.url}: cache schema {manifest.schema_version} is not supported ({SCHEMA_VERSION})")
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        """Write the manifest atomically."""
        self.write_bytes("manifest.json", manifest.model_dump_json(indent=2).encode())

    def create_manifest(self, draft: Manifest) -> Manifest:
        """Write the draft unless a manifest exists; return the stored one. The first plan of a cache wins, so a
        resumed or concurrent build can never mix two shard layouts."""
        if self.exists("manifest.json"):
            return self.read_manifest()
        data = draft.model_dump_json(indent=2).encode()
        if self._local:  # exclusive create: link a complete temp file to the name, which fails if it exists
            path = self._p("manifest.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        else:  # object stores: a PUT is atomic but not exclusive; whoever wrote last wins and all re-read it
            self.write_bytes("manifest.json", data)
        return self.read_manifest()

    @staticmethod
    def shard_name(index: int) -> str:
        """Relative path of a shard file."""
        return f"shards/shard-{index:06d}.safetensors"

    def commit_shard(self, index: int, start: int, stop: int, vectors: torch.Tensor | Int8Rows, rows: torch.Tensor,
                     seconds: dict[str, float]) -> ShardInfo:
        """Write the shard, then its commit record: a shard counts only once its record exists."""
        tensors = ({"vectors": vectors.values.contiguous().cpu(), "scales": vectors.scales.float().contiguous().cpu()}
                   if isinstance(vectors, Int8Rows) else {"vectors": vectors.contiguous().cpu()})
        data = st_save({**tensors, "rows": rows.to(torch.int64).cpu()},
                       metadata={"row_range": f"{start}:{stop}"})  # one key: safetensors does not keep key order
        name = self.shard_name(index)
        info = ShardInfo(index=index, start=start, stop=stop, rows=int(rows.numel()), file=name,
                         sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), seconds=seconds)
        self.write_bytes(name, data)
        self.write_bytes(name.replace(".safetensors", ".json"), info.model_dump_json().encode())
        return info

    def committed_shard(self, index: int, expected: tuple[int, int], verify: bool = True) -> ShardInfo | None:
        """The commit record of a shard if it exists, covers the `expected` [start, stop) rows of the manifest's
        plan, and (optionally) its file matches the checksum; else None (the shard must be built)."""
        record = self.shard_name(index).replace(".safetensors", ".json")
        if not self.exists(record):
            return None
        try:
            info = ShardInfo.model_validate_json(self.read_bytes(record))
        except ValueError:
            return None  # a torn or foreign record: rebuilding the shard rewrites it
        if (info.index, info.start, info.stop) != (index, *expected):
            return None
        if verify:
            try:
                data = self.read_bytes(info.file)
            except CacheError:
                return None
            if hashlib.sha256(data).hexdigest() != info.sha256:
                return None
        return info

    def load_shard(self, info: ShardInfo, verify: bool = True) -> tuple[torch.Tensor | Int8Rows, torch.Tensor]:
        """(vectors [n, K] (Int8Rows for an int8 cache), rows [n]) of a committed shard, without copying its bytes:
        a local file is memory-mapped
        (copy on write), a remote one read once. Its size must match the commit record; with `verify` its SHA-256
        too (about 1.2 GB/s on one core: the slowest step of a scan, hence optional there)."""
        data = self._map(info.file) if self._local else bytearray(self.read_bytes(info.file))
        where = f"{self.url}/{info.file}"
        if len(data) != info.bytes:
            raise CacheError(f"{where}: {len(data)} bytes, its commit record says {info.bytes} (corrupted shard); "
                             "rebuild with `rapidin cache`")
        if verify and hashlib.sha256(data).hexdigest() != info.sha256:
            raise CacheError(f"{where}: checksum mismatch (corrupted shard); rebuild with `rapidin cache`")
        try:
            tensors = tensors_in(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{where}: unreadable shard ({exc}); rebuild with `rapidin cache`") from None
        if "scales" in tensors:
            return Int8Rows(tensors["vectors"], tensors["scales"]), tensors["rows"]
        return tensors["vectors"], tensors["rows"]

    def _map(self, name: str) -> mmap.mmap | bytearray:
        """A private (copy-on-write) map of a local file: tensors read it in place and may still be written to."""
        try:
            with open(self._p(name), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:  # cannot be mapped; the size check reports it
                    return bytearray()
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise CacheError(f"{self.url}: {name} not found") from None
        except OSError as exc:
            raise _storage(f"read {name}", self.url, exc) from None
        if MADV_POPULATE_READ is not None:  # map the cached pages now (in the prefetch thread), not one fault at a
            with contextlib.suppress(OSError):  # time during the scan: 8 -> 12 GB/s converted (older kernels: no-op)
                mapped.madvise(MADV_POPULATE_READ)
        return mapped

    def iter_shards(self, shards: list[ShardInfo], verify: bool = True) -> Iterator[tuple[ShardInfo, torch.Tensor, torch.Tensor]]:
        """Stream shards one at a time, reading the next while the caller works on the current one."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.load_shard, shards[0], verify) if shards else None
            for i, info in enumerate(shards):
                vectors, rows = pending.result()
                pending = pool.submit(self.load_shard, shards[i + 1], verify) if i + 1 < len(shards) else None
                yield info, vectors, rows

    def write_table(self, name: str, rows: list[dict]) -> None:
        """Write a Parquet table atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        self.write_bytes(name, buf.getvalue())

    def read_table(self, name: str) -> list[dict]:
        """Read a Parquet table."""
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()


# Linux's MADV_POPULATE_READ (kernel >= 5.14), which Python 3.11's mmap does not name
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def tensors_in(buffer: bytearray | mmap.mmap) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in a writable buffer, as views of it (safetensors' own `load` copies
    each one): 8 bytes of header length, a JSON header of dtype, shape and byte offsets, then the data."""
    (header_len,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(bytes(buffer[8 : 8 + header_len]))
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        if count != math.prod(entry["shape"]) or base + end > len(buffer):
            raise ValueError(f"tensor {name}: {end - begin} bytes do not hold shape {entry['shape']}")
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + begin) if count else torch.empty(
            0, dtype=dtype)
        tensors[name] = flat.view(entry["shape"])
    return tensors


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def _version_dir(root: str, model: str, version: str) -> str:
    return f"{root.rstrip('/')}/{model}/{version}"


def find_caches(root: str, model: str, version: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the caches (with a manifest) of one model version under a store root."""
    base = _version_dir(check_url(root, "store", StorageError), model, version)
    try:
        fs, path = fsspec.core.url_to_fs(base, **(storage_options or {}))
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=False)
    except STORAGE_ERRORS as exc:
        raise _storage("list caches", base, exc) from None
    return [f"{base}/{e.rstrip('/').rsplit('/', 1)[-1]}" for e in sorted(entries) if fs.exists(f"{e}/manifest.json")]
