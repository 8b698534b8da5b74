"""The CUDA paths give what the CPU paths give: gradients, both sketches, the scan and a whole cache. They run where
torch sees a GPU (benchmarks/gpu.sh's machine) and skip here with the reason."""

import pytest
import torch

from rapidin import GradientConfig, SketchConfig, build_cache
from rapidin.gradients import GradientComputer
from rapidin.models import ModelRef, load_model
from rapidin.retrieval import QueryGroup, scan
from rapidin.sketch import KroneckerSketch, RapidGrad, make_spec
from rapidin.store import CacheStore
from tests.test_gradients import items_of, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason=f"no CUDA device (torch {torch.__version__}): run on a GPU machine")


@pytest.fixture()
def tiny_cuda(tiny_dir):
    torch.manual_seed(0)
    return load_model(ModelRef(path=tiny_dir, name="tiny", version="1"), device="cuda")


def test_gradients_and_sketches_equal_the_cpu(tiny, tiny_cuda, toy_data):
    """float32 on two devices sums in different orders: relative error within n u for the ~100-term reductions
    (n ~ 170, u = 2^-24: 1e-5), as the batched-vs-loop test allows; RapidGrad is a gather and signs, so bit-exact."""
    items = items_of(tiny, toy_data)
    config = GradientConfig(batch_size=6)
    cpu, gpu = GradientComputer(tiny, config), GradientComputer(tiny_cuda, config)
    dense_cpu, dense_gpu = cpu.gradients(items), gpu.gradients(items).cpu()
    assert relative_error(dense_gpu, dense_cpu) < 1e-5
    spec = make_spec(SketchConfig(k=4096, lam=20), cpu.dim)
    assert torch.equal(RapidGrad(spec, "cuda")(dense_cpu.cuda()).cpu(), RapidGrad(spec)(dense_cpu))
    kron = make_spec(SketchConfig(method="kronecker", k=2048), cpu.dim)
    on_cpu = GradientComputer(tiny, config, KroneckerSketch(kron, cpu.layout)).gradients(items)
    on_gpu = GradientComputer(tiny_cuda, config, KroneckerSketch(kron, cpu.layout, "cuda")).gradients(items).cpu()
    assert relative_error(on_gpu, on_cpu) < 1e-5


def test_scan_on_cuda_ranks_as_on_the_cpu():
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(300, 256, generator=gen).half()
    groups = [QueryGroup(torch.randn(256, generator=gen))]
    shards = lambda: [(vectors[a:b], torch.arange(a, b)) for a, b in [(0, 128), (128, 300)]]  # noqa: E731
    on_cpu, on_gpu = scan(shards(), groups, 10), scan(shards(), groups, 10, "cuda")
    for kind in ("helpful", "harmful", "influential"):
        exact = vectors.double() @ groups[0].whole.double()
        bound = 256 * 2.0**-24 / (1 - 256 * 2.0**-24) * (vectors.double().abs() @ groups[0].whole.double().abs())
        for top in (on_cpu, on_gpu):
            rows = top.whole[0][kind].rows[:, 0]
            assert ((top.whole[0][kind].scores[:, 0].double() - exact[rows]).abs() <= bound[rows]).all()
        assert on_gpu.whole[0][kind].rows.tolist() == on_cpu.whole[0][kind].rows.tolist()


def test_cache_built_on_cuda_equals_the_cpu_cache(tiny, tiny_cuda, toy_data, tmp_path):
    options = {"sketch": SketchConfig(k=512, lam=4), "gradient": GradientConfig(max_length=96), "shard_rows": 16,
               "progress": False}
    cpu = build_cache(tiny, toy_data, (tmp_path / "cpu").as_uri(), **options)
    gpu = build_cache(tiny_cuda, toy_data, (tmp_path / "gpu").as_uri(), **options)
    assert gpu.cache_id == cpu.cache_id  # the device is not part of what the numbers mean
    load = lambda root, m: torch.cat([CacheStore(f"{root}/tiny/1/{m.cache_id}").load_shard(s)[0]  # noqa: E731
                                      for s in m.shards]).float()
    a, b = load((tmp_path / "cpu").as_uri(), cpu), load((tmp_path / "gpu").as_uri(), gpu)
    assert (a - b).abs().max() <= 2 * 2**-11 * a.abs().max()  # fp16 storage: a rounding step either side
