"""Resume on the local store, for real: a `rapidin cache` killed mid-build and resumed with other --shard-rows and
--batch-size, and two builders of one cache at once, give the bytes of an uninterrupted build. A resumed build keeps
the plan it started with; commit records are checked against it; finalize checks rows 0..N-1 once each."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rapidin import GradientConfig, SketchConfig, build_cache
from rapidin.cache import build_shards, finalize_cache, plan_cache
from rapidin.errors import CacheError
from rapidin.store import CacheStore

ROOT = Path(__file__).resolve().parents[1]
SKETCH = SketchConfig(k=256, lam=2, seed=3)


@pytest.fixture(scope="module")
def rows200(tmp_path_factory) -> str:
    """120 toy rows: enough shards of 2 rows that a build can be caught half way."""
    from rapidin import toy

    return str(toy.write_jsonl(toy.demo_rows(120, seed=4), tmp_path_factory.mktemp("rows") / "train.jsonl"))


def cli(tiny_dir: str, data: str, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rapidin.cli", "cache", "--model", tiny_dir, "--name", "tiny", "--model-version", "1",
            "--data", data, "--store", store.as_uri(), "--k", str(SKETCH.k), "--lam", str(SKETCH.lam),
            "--seed", str(SKETCH.seed), "--max-length", "96", *extra]


def cache_dir(store: Path) -> Path:
    (path,) = (store / "tiny" / "1").iterdir()
    return path


def shard_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir(store) / "shards").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tiny_dir, rows200, tmp_path_factory) -> Path:
    """The uninterrupted build: 2-row shards, batch size 2."""
    store = tmp_path_factory.mktemp("reference")
    subprocess.run(cli(tiny_dir, rows200, store, "--shard-rows", "2", "--batch-size", "2"), check=True,
                   capture_output=True, cwd=ROOT, timeout=600)
    return store


def kill_after_commits(argv: list[str], store: Path, commits: int) -> None:
    """Start the build, freeze it (SIGSTOP) once `commits` shards are committed, then SIGKILL it."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(store.glob("tiny/1/*/shards/*.json"))) >= commits:
                proc.send_signal(signal.SIGSTOP)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    manifest = json.loads((cache_dir(store) / "manifest.json").read_text())
    assert not manifest["complete"], "the build finished before it could be interrupted"


def test_killed_build_resumed_with_other_layout_is_byte_identical(tiny_dir, rows200, reference, tmp_path):
    store = tmp_path / "store"
    kill_after_commits(cli(tiny_dir, rows200, store, "--shard-rows", "2", "--batch-size", "2"), store, 3)
    done = subprocess.run(cli(tiny_dir, rows200, store, "--shard-rows", "16", "--batch-size", "5"),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "was started with shard_rows=2 (not 16), batch_size=2 (not 5): resuming with its stored plan" in done.stderr
    assert shard_files(store) == shard_files(reference)
    stored = json.loads((cache_dir(store) / "manifest.json").read_text())
    assert stored["complete"] and stored["shard_rows"] == 2 and stored["gradient"]["batch_size"] == 2
    inspect = subprocess.run([sys.executable, "-m", "rapidin.cli", "inspect", str(cache_dir(store))],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert inspect.returncode == 0 and "60/60 shards healthy" in inspect.stdout


def test_two_concurrent_builders_make_one_cache(tiny, tiny_dir, toy_data, tmp_path):
    """Two `rapidin cache` processes asking for different layouts at once: one plan wins (the first manifest
    written), both keep it, and the cache has the bytes of an uninterrupted in-process build of that plan."""
    store = tmp_path / "store"
    builders = [subprocess.Popen(cli(tiny_dir, toy_data, store, *layout), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for layout in (("--shard-rows", "4", "--batch-size", "2"), ("--shard-rows", "16", "--batch-size", "5"))]
    outputs = [b.communicate(timeout=600) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    stored = json.loads((cache_dir(store) / "manifest.json").read_text())
    assert stored["complete"] and (stored["shard_rows"], stored["gradient"]["batch_size"]) in ((4, 2), (16, 5))
    build_cache(tiny, toy_data, (tmp_path / "reference").as_uri(), sketch=SKETCH, shard_rows=stored["shard_rows"],
                gradient=GradientConfig(max_length=96, batch_size=stored["gradient"]["batch_size"]), progress=False)
    assert shard_files(store) == shard_files(tmp_path / "reference")


def test_commit_record_of_another_layout_is_not_counted(tiny, toy_data, tmp_path):
    """A commit record whose row range differs from the plan's (another layout's leftover) is rebuilt, never used;
    finalize refuses ranges that do not tile 0..N-1."""
    root = tmp_path.as_uri()
    plan = plan_cache(tiny, toy_data, root, sketch=SKETCH, gradient=GradientConfig(max_length=96), shard_rows=16)
    build_shards(plan, tiny, progress=False)
    store = plan.store
    record = json.loads(store.read_bytes("shards/shard-000001.json"))
    store.write_bytes("shards/shard-000001.json", json.dumps({**record, "start": 8, "stop": 24}).encode())
    assert store.committed_shard(1, (16, 32)) is None
    with pytest.raises(CacheError, match=r"shard 1 \(rows \(16, 32\)\) is not committed"):
        finalize_cache(plan)
    rebuilt = build_cache(tiny, toy_data, root, sketch=SKETCH, gradient=GradientConfig(max_length=96), shard_rows=4,
                          progress=False)
    assert rebuilt.complete and rebuilt.shard_rows == 16 and [s.start for s in rebuilt.shards] == [0, 16, 32]


def test_finalize_checks_rows_once_each(tiny, toy_data, tmp_path):
    from rapidin.cache import _check_coverage
    from rapidin.store import ShardInfo

    plan = plan_cache(tiny, toy_data, tmp_path.as_uri(), sketch=SKETCH, gradient=GradientConfig(max_length=96),
                      shard_rows=16)
    info = lambda i, a, b, n=None: ShardInfo(index=i, start=a, stop=b, rows=b - a if n is None else n, file="f",  # noqa: E731
                                             sha256="0", bytes=0)
    _check_coverage("u", plan.manifest, [info(0, 0, 16), info(1, 16, 32), info(2, 32, 48)])
    for bad in ([info(0, 0, 16), info(1, 8, 24), info(2, 32, 48)], [info(0, 0, 16), info(1, 16, 32)],
                [info(0, 0, 16), info(1, 16, 32), info(2, 32, 48, n=15)]):
        with pytest.raises(CacheError, match="u: committed shards"):
            _check_coverage("u", plan.manifest, bad)


def test_vectors_across_batch_sizes_agree_to_rounding(tiny, toy_data, tmp_path):
    """The bytes are reproducible for one batch size (a resume keeps the stored one). Across batch sizes, float32
    sums run in another order, so each stored row may differ by its fp16 rounding on both sides (at most 2^-12
    relative each, in L2) plus the float32 difference; we allow that one 2^-12 too (measured ~1e-6 relative),
    while a real batch effect (a padding or mask leak) changes rows by O(1)."""
    a = build_cache(tiny, toy_data, (tmp_path / "a").as_uri(), sketch=SKETCH, gradient=GradientConfig(max_length=96),
                    shard_rows=16, progress=False)
    b = build_cache(tiny, toy_data, (tmp_path / "b").as_uri(), sketch=SKETCH,
                    gradient=GradientConfig(max_length=96, batch_size=3), shard_rows=10, progress=False)
    assert a.cache_id == b.cache_id
    load = lambda root, m: torch.cat([CacheStore(f"{root}/tiny/1/{m.cache_id}").load_shard(s)[0] for s in m.shards])  # noqa: E731
    va, vb = load((tmp_path / "a").as_uri(), a).double(), load((tmp_path / "b").as_uri(), b).double()
    scale = torch.maximum(va.norm(dim=1), vb.norm(dim=1))
    assert ((va - vb).norm(dim=1) <= 3 * 2.0**-12 * scale).all()


def test_workers_tokenize_only_their_shards_and_build_the_same_bytes(tiny, toy_data, tmp_path):
    """A worker building some shards of a planned cache tokenizes each shard's rows as it builds it (with a million
    rows, each worker tokenized all of them for minutes and GBs first); two such workers give the bytes of one
    uninterrupted build, and a worker's plan refuses shards that are not its own."""
    options = dict(sketch=SKETCH, gradient=GradientConfig(max_length=96, batch_size=3), shard_rows=4)
    full = plan_cache(tiny, toy_data, (tmp_path / "store").as_uri(), **options)  # the flow's plan: the manifest
    n = full.manifest.num_shards
    assert n >= 3 and all(it is not None for it in full.items)
    for shards in (list(range(0, n, 2)), list(range(1, n, 2))):
        part = plan_cache(tiny, toy_data, (tmp_path / "store").as_uri(), shards=shards, **options)
        assert part.items == []  # nothing tokenized up front
        for i in shards:
            rows, items = part.shard_items(i)
            assert rows == list(range(*full.manifest.shard_range(i))) and items == [full.items[r] for r in rows]
        with pytest.raises(ValueError, match="builds shards"):
            build_shards(part, tiny, indices=[1 - shards[0]], progress=False)
        build_shards(part, tiny, indices=shards, progress=False)
    finalize_cache(full)
    build_cache(tiny, toy_data, (tmp_path / "reference").as_uri(), progress=False, **options)
    assert shard_files(tmp_path / "store") == shard_files(tmp_path / "reference")
