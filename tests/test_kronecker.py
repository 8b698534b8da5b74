"""The Kronecker (LoGra-style) sketch: equal to projecting the explicit per-example gradient matrices, batched equal
to batch-1, unbiased inner products, and a cache built with it end to end."""

import pytest
import torch

from rapidin import AttributeConfig, Generation, GradientConfig, SketchConfig, attribute, build_cache
from rapidin.errors import RapidInError
from rapidin.gradients import GradientComputer
from rapidin.sketch import KroneckerSketch, kronecker_factors, make_spec
from rapidin.store import CacheStore
from tests.test_gradients import items_of, relative_error

KRON = SketchConfig(method="kronecker", k=2048, seed=7)


def explicit(computer: GradientComputer, sketch: KroneckerSketch, dense: torch.Tensor) -> torch.Tensor:
    """P_o G P_i^T / sqrt(k_o k_i) of each layer's (normalised) gradient matrix G, cut from the dense [B, D] rows."""
    pieces, offset = [], 0
    for (_, (o, i)), (p_out, p_in) in zip(computer.layout, sketch.projections, strict=True):
        g = dense[:, offset : offset + o * i].reshape(-1, o, i)
        offset += o * i
        pieces.append((p_out.double() @ g @ p_in.double().T).flatten(1) / (p_out.shape[0] * p_in.shape[0]) ** 0.5)
    out = torch.cat(pieces, 1)
    return torch.nn.functional.pad(out, (0, sketch.spec.config.k - out.shape[1]))


def test_equals_the_explicit_projection_and_batch_1(tiny, toy_data):
    """float64 model: the projected factors (never forming G) give P_o G P_i^T exactly, with G normalised by the norm
    taken from Gram matrices; and a batch of rows of different lengths equals one row at a time."""
    tiny.model.double()
    config = GradientConfig(batch_size=6)
    dense = GradientComputer(tiny, config)
    sketch = KroneckerSketch(make_spec(KRON, dense.dim), dense.layout)
    projected = GradientComputer(tiny, config, sketch)
    items = items_of(tiny, toy_data)
    got = projected.gradients(items)
    assert got.shape == (6, KRON.k) and projected.out_dim == KRON.k
    formed = dense.gradients(items)
    want = explicit(dense, sketch, formed)
    assert relative_error(got, want) < 1e-10
    # apply_dense (for gradients formed before) computes P_o G P_i^T in float32: each entry within
    # gamma_{o+i+1} (|P_o| |G| |P_i|^T) / sqrt(k_o k_i) of the float64 one (two products, one rounding of G)
    dense_sketch, offset, bounds = sketch.apply_dense(formed).double(), 0, []
    for (_, (o, i)), (p_out, p_in) in zip(dense.layout, sketch.projections, strict=True):
        g = formed[:, offset : offset + o * i].reshape(-1, o, i).abs()
        offset += o * i
        n = o + i + 1
        gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
        bounds.append(gamma * (p_out.double().abs() @ g @ p_in.double().abs().T).flatten(1)
                      / (p_out.shape[0] * p_in.shape[0]) ** 0.5)
    bound = torch.nn.functional.pad(torch.cat(bounds, 1), (0, KRON.k - sum(b.shape[1] for b in bounds)))
    assert ((dense_sketch - want).abs() <= bound).all()
    for b, item in enumerate(items):
        assert relative_error(projected.gradients([item])[0], got[b]) < 1e-10


def test_inner_products_are_unbiased():
    """Over 400 seeds the sketched inner product of two gradient matrices averages to the exact one: within 5 standard
    errors of the sampled mean (a check that fails for a biased map: a wrong scale moves the mean by ~100 SE here)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 12, generator=gen, dtype=torch.float64)  # [B, T, i]: two related examples
    x = torch.cat([x, x + 0.5 * torch.randn(1, 5, 12, generator=gen, dtype=torch.float64)])
    g = torch.randn(1, 5, 9, generator=gen, dtype=torch.float64)  # [B, T, o]
    g = torch.cat([g, g + 0.5 * torch.randn(1, 5, 9, generator=gen, dtype=torch.float64)])
    exact_g = torch.einsum("bto,bti->boi", g, x)
    exact = float((exact_g[0] * exact_g[1]).sum())
    layout = [("w", (9, 12))]
    samples = []
    for seed in range(400):
        sketch = KroneckerSketch(make_spec(SketchConfig(method="kronecker", k=16, seed=seed), 108), layout)
        s = sketch.project([x], [g], normalize=False)
        samples.append(float(s[0] @ s[1]))
    samples = torch.tensor(samples, dtype=torch.float64)
    standard_error = float(samples.std()) / len(samples) ** 0.5
    assert abs(float(samples.mean()) - exact) <= 5 * standard_error
    assert abs(exact) > 20 * standard_error  # the check can tell a right mean from a zero or halved one


def test_factors_fit_k_and_small_k_is_refused():
    layout = [("a", (64, 32)), ("b", (8, 64)), ("c", (64, 64))]
    factors = kronecker_factors(1000, layout)
    used = sum(ko * ki for ko, ki in factors)
    assert used == 960 and factors == [(20, 20), (8, 20), (20, 20)]
    assert sum(min(o, 21) * min(i, 21) for _, (o, i) in layout) > 1000  # 20 is the largest that fits
    with pytest.raises(RapidInError, match="needs K >= the 3 attributed matrices"):
        kronecker_factors(2, layout)


def test_cache_and_attribution_with_the_kronecker_sketch(tiny, toy_data, tmp_path):
    """A cache built with method=kronecker holds each row's projected gradient (fp16), and attribution scores rows
    by the inner product with the generation's projected gradient."""
    root = tmp_path.as_uri()
    manifest = build_cache(tiny, toy_data, root, sketch=KRON, gradient=GradientConfig(max_length=96), shard_rows=16,
                           progress=False)
    assert manifest.sketch.config.method == "kronecker"
    store = CacheStore(f"{root}/tiny/1/{manifest.cache_id}")
    vectors, rows = store.load_shard(manifest.shards[0])
    dense = GradientComputer(tiny, manifest.gradient)
    projected = GradientComputer(tiny, manifest.gradient, KroneckerSketch(manifest.sketch, manifest.layout))
    items = items_of(tiny, toy_data, n=len(rows), max_length=96)
    want = projected.gradients(items)
    assert vectors.shape == (len(rows), KRON.k)
    # fp16 storage (2^-11 relative) plus the float32 difference of another batch composition (n u, n ~ 170: 1e-5)
    assert (vectors.float() - want).abs().max() <= (2**-11 + 1e-5) * want.abs().max()
    assert dense.dim > KRON.k
    all_vectors = torch.cat([store.load_shard(info)[0] for info in manifest.shards]).float()
    generation = Generation(prompt="What is 2 plus 2?", response="4.")
    result, scan = attribute(tiny, [generation], store_url=root, config=AttributeConfig(top_k=3), progress=False,
                             keep_all_scores=True)
    exact = all_vectors.double() @ scan.queries[0].double()  # every row's score: an exact inner product
    u = 2.0**-24
    bound = KRON.k * u / (1 - KRON.k * u) * (all_vectors.double().abs() @ scan.queries[0].double().abs())
    assert ((scan.all_scores[0].double() - exact[scan.all_rows]).abs() <= bound[scan.all_rows]).all()
    top = result.generations[0].helpful  # the 3 best rows, up to swaps of scores closer than the rounding bound
    best = exact.sort(descending=True).values
    assert all(float(exact[hit.row]) >= float(best[2]) - 2 * float(bound.max()) for hit in top) and len(top) == 3


def test_a_k_the_kronecker_sketch_cannot_use_is_refused_before_anything_is_written(tiny, toy_data, tmp_path):
    with pytest.raises(RapidInError, match=r"needs K >= the \d+ attributed matrices; K = 3 is too small"):
        build_cache(tiny, toy_data, tmp_path.as_uri(), sketch=SketchConfig(method="kronecker", k=3), progress=False)
    assert not any(tmp_path.iterdir())
