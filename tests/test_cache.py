"""The cache store: resumable per-shard commits, checksums, refusal to mix settings, S3."""

import hashlib

import pytest
import torch

from rapidin import AttributeConfig, Generation, GradientConfig, SketchConfig, attribute, build_cache
from rapidin.cache import build_shards, open_cache, plan_cache
from rapidin.data import load_examples, tokenize
from rapidin.errors import CacheError, DataError, StorageError
from rapidin.gradients import GradientComputer
from rapidin.models import ModelRef, load_model
from rapidin.sketch import apply_by_rounds
from rapidin.store import CacheStore
from tests.test_gradients import brute_force

SKETCH = SketchConfig(k=512, lam=4, seed=1)


def options(**kw):
    return {"sketch": SKETCH, "gradient": GradientConfig(max_length=96), "shard_rows": 16, "progress": False} | kw


def shard_bytes(store, manifest):
    return [store.read_bytes(s.file) for s in manifest.shards]


def test_cache_layout_and_exact_vectors(tiny, toy_data, tmp_path):
    root = tmp_path.as_uri()
    manifest = build_cache(tiny, toy_data, root, **options())
    store = CacheStore(f"{root}/tiny/1/{manifest.cache_id}")
    assert manifest.complete and len(manifest.shards) == 3 and manifest.num_rows == 48
    for name in ("manifest.json", "examples.parquet", "shards/shard-000000.safetensors", "shards/shard-000000.json"):
        assert store.exists(name)
    vectors, rows = store.load_shard(manifest.shards[1])
    assert vectors.dtype == torch.float16 and vectors.shape == (16, 512) and rows.tolist() == list(range(16, 32))
    # row 20 equals its own gradient by an independent brute force (Hugging Face's labels loss, autograd on the
    # weights), sketched by the paper's step-by-step RapidGrad; the stored fp16 row differs by its rounding
    # (<= 2^-12 relative, in L2) plus float32 noise (~1e-6, allowed another 2^-12)
    examples, _ = load_examples(toy_data)
    item = tokenize(tiny.tokenizer, examples[20].prompt, examples[20].response, 96)
    grad = brute_force(tiny, GradientComputer(tiny, manifest.gradient), item, hf_loss=True)
    expected = apply_by_rounds(manifest.sketch, grad).double()
    assert (vectors[4].double() - expected).norm() <= 2 * 2.0**-12 * expected.norm()
    assert [r["row"] for r in store.read_table("examples.parquet")] == list(range(48))


def test_resume_after_interruption_is_byte_identical(tiny, toy_data, tmp_path):
    full = build_cache(tiny, toy_data, (tmp_path / "a").as_uri(), **options())
    root = (tmp_path / "b").as_uri()
    plan = plan_cache(tiny, toy_data, root, **{k: v for k, v in options().items() if k != "progress"})
    build_shards(plan, tiny, indices=[0, 2], progress=False)  # "killed" before shard 1
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tiny, root)
    resumed = build_cache(tiny, toy_data, root, **options())
    store_a = CacheStore(f"{(tmp_path / 'a').as_uri()}/tiny/1/{full.cache_id}")
    store_b = CacheStore(f"{root}/tiny/1/{resumed.cache_id}")
    assert resumed.cache_id == full.cache_id
    assert shard_bytes(store_a, full) == shard_bytes(store_b, resumed)
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in full.shards]


def test_corrupted_shard_is_detected_and_rebuilt(tiny, toy_data, tmp_path):
    """A shard whose bytes changed fails a verified scan; one whose size changed fails any scan; a rebuild repairs it."""
    root = tmp_path.as_uri()
    manifest = build_cache(tiny, toy_data, root, **options())
    path = tmp_path / "tiny" / "1" / manifest.cache_id / manifest.shards[1].file
    good = path.read_bytes()
    generation = [Generation(prompt="hi", response="there")]
    path.write_bytes(good[:-8] + b"\x00" * 8)
    with pytest.raises(CacheError, match="shard-000001.safetensors: checksum mismatch"):
        attribute(tiny, generation, store_url=root, config=AttributeConfig(verify=True), progress=False)
    path.write_bytes(good[:-8])
    with pytest.raises(CacheError, match=f"shard-000001.safetensors: {len(good) - 8} bytes, its commit record says "
                                         f"{len(good)}"):
        attribute(tiny, generation, store_url=root, progress=False)
    build_cache(tiny, toy_data, root, **options())
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(good).digest()


def test_shards_are_read_in_place_and_equal_safetensors(tmp_path):
    """tensors_in views the file's bytes (no copy) and gives exactly what safetensors' own loader gives, for every
    dtype a shard or result holds; the views may be written to without touching the file."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from rapidin.store import tensors_in

    gen = torch.Generator().manual_seed(0)
    tensors = {"vectors": torch.randn(5, 7, generator=gen).half(), "rows": torch.arange(5),
               "scores": torch.randn(3, 2, generator=gen), "empty": torch.zeros(0, 4), "bf": torch.ones(2).bfloat16(),
               "i8": torch.tensor([-128, 0, 127], dtype=torch.int8)}
    data = st_save(tensors, metadata={"k": "7"})
    store = CacheStore(tmp_path.as_uri())
    store.write_bytes("shard.safetensors", data)
    mapped = store._map("shard.safetensors")
    got, want = tensors_in(mapped), st_load(data)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    got["vectors"].zero_()  # copy on write: the file keeps its bytes
    assert (tmp_path / "shard.safetensors").read_bytes() == data
    with pytest.raises(ValueError, match="do not hold shape"):
        tensors_in(bytearray(data[:-4]))


def test_refuses_other_model_or_sketch(tiny, tiny_dir, toy_data, tmp_path):
    root = tmp_path.as_uri()
    manifest = build_cache(tiny, toy_data, root, **options())
    url = f"{root}/tiny/1/{manifest.cache_id}"
    other = load_model(ModelRef(path=tiny_dir, name="tiny", version="1"), device="cpu")
    with torch.no_grad():
        other.model.lm_head.weight.add_(0.01)
    from rapidin.models import model_fingerprint

    other.fingerprint = model_fingerprint(other.model, other.tokenizer)
    with pytest.raises(CacheError, match="built with another model"):
        open_cache(other, cache_url=url)
    with pytest.raises(CacheError, match="built with sketch"):
        open_cache(tiny, cache_url=url, sketch=SketchConfig(k=256, lam=4, seed=1))
    # other data or sketch -> another cache id, never the same directory
    assert build_cache(tiny, toy_data, root, **options(sketch=SketchConfig(k=256, lam=4, seed=1))).cache_id != manifest.cache_id


def test_bad_rows_error_or_skip(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b c", "response": "d"}\n{"prompt": "a", "response": ""}\n{"prompt": "x", "response": "y"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: response is empty \(pass --skip-bad-rows"):
        build_cache(tiny, str(data), tmp_path.as_uri(), **options(sketch=SketchConfig(k=64)))
    manifest = build_cache(tiny, str(data), tmp_path.as_uri(), skip_bad_rows=True, **options(sketch=SketchConfig(k=64)))
    assert manifest.stats["skipped"] == 1
    store = CacheStore(f"{tmp_path.as_uri()}/tiny/1/{manifest.cache_id}")
    assert store.load_shard(manifest.shards[0])[1].tolist() == [0, 2]


def test_unreachable_storage_is_one_line(tiny, toy_data):
    with pytest.raises(StorageError) as info:
        build_cache(tiny, toy_data, "s3://bucket/x", storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                                                                    "key": "k", "secret": "s",
                                                                    "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}},
                    **options())
    assert "\n" not in str(info.value) and "s3://bucket/x" in str(info.value)


def test_s3_cache_matches_local(tiny, toy_data, tmp_path, seaweed_s3):
    opts = seaweed_s3.storage_options()
    root = f"s3://{seaweed_s3.bucket}/caches"
    s3_manifest = build_cache(tiny, toy_data, root, storage_options=opts, **options())
    local_manifest = build_cache(tiny, toy_data, tmp_path.as_uri(), **options())
    assert [s.sha256 for s in s3_manifest.shards] == [s.sha256 for s in local_manifest.shards]
    gen = [Generation(prompt="What is the capital of Peru?", response="The capital of Peru is Lima.")]
    config = AttributeConfig(top_k=5)
    from_s3 = attribute(tiny, gen, store_url=root, config=config, storage_options=opts, progress=False)
    from_disk = attribute(tiny, gen, store_url=tmp_path.as_uri(), config=config, progress=False)
    assert [h.row for h in from_s3.generations[0].helpful] == [h.row for h in from_disk.generations[0].helpful]
    assert [h.score for h in from_s3.generations[0].helpful] == [h.score for h in from_disk.generations[0].helpful]


def test_s3_wrong_credentials_write_nothing(tiny, toy_data, seaweed_s3):
    opts = seaweed_s3.storage_options() | {"key": "wrong", "secret": "wrong"}
    with pytest.raises(StorageError) as info:
        build_cache(tiny, toy_data, f"s3://{seaweed_s3.bucket}/denied", storage_options=opts, **options())
    assert "\n" not in str(info.value)
    import fsspec

    fs = fsspec.filesystem("s3", **seaweed_s3.storage_options())
    assert not fs.exists(f"{seaweed_s3.bucket}/denied")


EXIT_RACE = """
import sys, time
import torch, fsspec.asyn
import rapidin.store  # its exit hook stops fsspec's IO loop before the interpreter shuts down

loop = fsspec.asyn.get_loop()  # the loop s3fs runs in, a daemon thread


def churn():  # what connection timers do, often: wake the loop thread, which then collects cycles holding tensors
    for _ in range(50):
        cycle = [None]
        weight = torch.ones(4, requires_grad=True)
        cycle[0] = (cycle, weight[1:] * 1)
    loop.call_later(0.0005, churn)


loop.call_soon_threadsafe(churn)
time.sleep(0.5)
"""


def test_a_process_that_used_fsspecs_io_loop_exits_cleanly(tmp_path):
    """Without the hook this script aborts at exit every time here ("terminate called without an active exception",
    status 134): the loop thread frees a tensor during finalization and is killed taking the GIL back."""
    import subprocess
    import sys

    script = tmp_path / "exit_race.py"
    script.write_text(EXIT_RACE)
    for _ in range(3):
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


U32 = 2.0**-24  # float32 unit roundoff


def test_int8_rows_round_each_entry_within_half_its_scale():
    """Per-row scale = max |entry| / 127, so every nonzero row uses the full int8 range and each entry is within
    scale / 2 of the original (plus the float32 rounding of the division and the decoding: 254 u scale)."""
    from rapidin.quantize import Int8Rows

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(64, 300, generator=gen) * torch.logspace(-6, 3, 64)[:, None]
    v[3] = 0.0
    v[4] = 0.0
    v[4, 7] = -2.5
    q = Int8Rows.quantize(v)
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.float32 and q.shape == v.shape
    bound = q.scales[:, None] * (0.5 + 254 * U32)
    assert ((q.float() - v).abs() <= bound).all()
    nonzero = v.abs().amax(1) > 0
    assert (q.values.abs().amax(1)[nonzero] == 127).all() and (q.float()[3] == 0).all()
    assert q[10:20].values.shape == (10, 300) and torch.equal(q[10:20].scales, q.scales[10:20])


def test_int8_cache_scores_within_the_quantisation_bound(tiny, toy_data, tmp_path):
    """An int8 cache and a float32 cache of the same sketch: every row's score differs by at most the rounding of
    its entries (scale / 2 each) against the query, plus float32 dot-product error on both sides (Higham 3.5)."""
    root = tmp_path.as_uri()
    gens = [Generation(prompt="What is the capital of France?", response="Paris is the capital.")]
    config = AttributeConfig(top_k=5, auto_target=0)
    runs = {}
    for dtype in ("float32", "int8"):
        sketch = SKETCH.model_copy(update={"dtype": dtype})
        manifest = build_cache(tiny, toy_data, root, **options(sketch=sketch))
        url = f"{root}/tiny/1/{manifest.cache_id}"
        _, result = attribute(tiny, gens, cache_url=url, config=config, progress=False, keep_all_scores=True)
        store = CacheStore(url)
        shards = [store.load_shard(info) for info in manifest.shards]
        runs[dtype] = (result, shards, manifest)
    (exact, f32_shards, f32), (got, int8_shards, int8) = runs["float32"], runs["int8"]
    assert torch.equal(exact.queries, got.queries) and torch.equal(exact.all_rows, got.all_rows)
    assert all(v.values.dtype == torch.int8 for v, _ in int8_shards)
    v32 = torch.cat([v for v, _ in f32_shards]).double()
    v8 = torch.cat([v.float() for v, _ in int8_shards]).double()
    scales = torch.cat([v.scales for v, _ in int8_shards]).double()
    q = exact.queries.double().abs()  # [1, K]
    k = SKETCH.k
    gamma = k * U32 / (1 - k * U32)
    bound = (scales[:, None] * (0.5 + 254 * U32) * q.sum(1) + gamma * (v32.abs() @ q.T + v8.abs() @ q.T)
             + 2 * U32 * v8.abs() @ q.T)
    diff = (torch.stack(got.all_scores, 1).double() - torch.stack(exact.all_scores, 1).double()).abs()
    assert (diff <= bound).all()
    assert diff.max() > 0  # the int8 cache really is rounded
    assert int8.shards[0].bytes < 0.3 * f32.shards[0].bytes  # a quarter of float32's bytes, plus a scale per row
    # token-wise scores read the int8 rounding too
    tw = attribute(tiny, gens, cache_url=url, config=AttributeConfig(top_k=2, auto_target=0, token_wise=True),
                   progress=False)
    assert tw.generations[0].influential[0].train_token_scores


def test_int8_gemm_scores_are_exact_up_to_the_query_split(monkeypatch):
    """On the CPU an int8 shard is scored by exact int32 products of its values and the queries' three int8 parts
    (Int8Queries): each score is within row_scale * sum_i |v_i| * (last part's scale / 2) of the exact score of the
    stored rows (the parts' rounding), plus float32 rounding of the result. ShardScorer takes that path for any number
    of queries, and the blocked float32 path when an int32 sum could overflow (K > INT32_EXACT_K)."""
    import rapidin.retrieval as retrieval
    from rapidin.quantize import Int8Queries, Int8Rows
    from rapidin.retrieval import ShardScorer, shard_scores

    gen = torch.Generator().manual_seed(0)
    k = 3000
    rows = Int8Rows.quantize(torch.randn(37, k, generator=gen) * torch.logspace(-3, 2, 37)[:, None])
    queries = torch.randn(8, k, generator=gen) * torch.logspace(-2, 1, 8)[:, None]
    split = Int8Queries.split(queries)
    assert len(split.parts) == 3 and torch.allclose(split.scales[-1], queries.abs().amax(1).double() / 127 / 254**2)
    values, scales = rows.values.double(), rows.scales.double()[:, None]
    exact = (values @ queries.double().T) * scales
    bound = scales * values.abs().sum(1, keepdim=True) * split.scales[-1][None, :] / 2 + 2 * U32 * exact.abs()
    got = split.scores(rows)
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(ShardScorer(queries)(rows), got)  # the int8 GEMM path
    one = queries[:1]
    assert torch.equal(ShardScorer(one)(rows), Int8Queries.split(one).scores(rows))  # for one query too
    monkeypatch.setattr(retrieval, "INT32_EXACT_K", k - 1)
    assert torch.equal(ShardScorer(one)(rows), shard_scores(rows, one, torch.empty(0))[0])  # the float32 path
