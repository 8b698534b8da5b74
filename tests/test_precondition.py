"""Preconditioners against brute force on the tiny model in float64: per-example gradients from a batch-1 autograd
loop, the dense empirical Fisher of each layer, and H^-1 v by a dense solve."""

import json
from pathlib import Path

import pytest
import torch

from rapidin.attribution import Generation, attribute
from rapidin.cache import build_cache, plan_cache
from rapidin.config import AttributeConfig, GradientConfig, SketchConfig
from rapidin.errors import CacheError
from rapidin.gradients import GradientComputer
from rapidin.precondition import (DAMPING_SCALE, ensure_preconditioners, fit_preconditioners, load_preconditioner,
                                  record_name)
from rapidin.store import CacheStore
from tests.test_gradients import items_of

LAYERS = (r"layers\.0\.mlp\.down_proj", r"layers\.1\.self_attn\.q_proj")  # 32x64 and 32x32: dense F fits
U = 2.0**-53  # float64 unit roundoff


def signals_loop(loaded, computer, item):
    """Example `item` alone (no padding, no batching): each layer's inputs x [T, i], the gradients of its mean
    response loss at the layer's outputs g [T, o] (plain autograd through hooks), and its weight gradients."""
    for _, m in computer.modules:
        m.weight.requires_grad_(True)
    kept = []
    handles = [m.register_forward_hook(lambda _m, a, out: kept.append((a[0][0], out))) for _, m in computer.modules]
    try:
        ids = torch.tensor([item.input_ids])
        labels = ids.clone()
        labels[0, : item.prompt_len] = -100
        logits = loaded.model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
        outs = torch.autograd.grad(loss, [out for _, out in kept])
    finally:
        for h in handles:
            h.remove()
    xs = [x.detach() for x, _ in kept]
    gs = [g[0] for g in outs]
    return xs, gs, [g.T @ x for x, g in zip(xs, gs, strict=True)]


@pytest.fixture()
def fitted(tiny, toy_data):
    tiny.model.double()
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    computer = GradientComputer(tiny, GradientConfig(params=LAYERS, batch_size=4))
    items = items_of(tiny, toy_data, n=10)
    loops = [signals_loop(tiny, computer, it) for it in items]
    return computer, items, loops, fit_preconditioners(computer, items, ["diagonal", "ekfac"], progress=False)


def test_diagonal_equals_dense_fisher_diagonal(fitted):
    computer, items, loops, fits = fitted
    pre, info = fits["diagonal"]
    assert info["rows"] == len(items)
    vs = [torch.randn(2, *shape, dtype=torch.float64) for _, shape in computer.layout]
    applied = pre.apply(vs)
    for m, (_, shape) in enumerate(computer.layout):
        moment = torch.stack([dws[m] for _, _, dws in loops]).square().mean(0)
        n = len(items)
        assert torch.allclose(pre.factors[m]["second_moment"], moment, rtol=4 * n * U, atol=0)
        damping = DAMPING_SCALE * float(moment.mean())
        assert pre.damping[m] == pytest.approx(damping, rel=4 * moment.numel() * U)
        dense = torch.diag((moment + damping).flatten())
        expected = torch.linalg.solve(dense, vs[m].flatten(1).T).T.reshape(2, *shape)
        assert torch.allclose(applied[m], expected, rtol=16 * U, atol=0)


def test_ekfac_equals_dense_solve_in_the_kfac_eigenbasis(fitted):
    """Q_A and Q_G diagonalise the brute-force token covariances; Lambda is the dense empirical Fisher's diagonal in
    the Kronecker eigenbasis; apply() equals a dense solve with H = K diag(Lambda + damping) K^T, K = Q_G (x) Q_A."""
    computer, items, loops, fits = fitted
    pre, _ = fits["ekfac"]
    vs = [torch.randn(3, *shape, dtype=torch.float64) for _, shape in computer.layout]
    applied = pre.apply(vs)
    for m, (_, (o, i)) in enumerate(computer.layout):
        xs = torch.cat([x[m] for x, _, _ in loops])
        gs = torch.cat([g[m] for _, g, _ in loops])
        tokens = xs.shape[0]
        for cov, q in ((xs.T @ xs, pre.factors[m]["qa"]), (gs.T @ gs, pre.factors[m]["qg"])):
            assert torch.allclose(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=4 * q.shape[0] * U * 100)
            rotated = q.T @ cov @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            # accumulation orders differ (batches vs one example): |delta cov| <= tokens u |cov|, eigh backward stable
            assert off.norm() <= 8 * (tokens + q.shape[0]) * U * cov.norm()
        kron = torch.kron(pre.factors[m]["qg"], pre.factors[m]["qa"])
        dws = torch.stack([dw[m].flatten() for *_, dw in loops])
        fisher = dws.T @ dws / len(items)  # dense empirical Fisher of the layer [o i, o i]
        lam = torch.diagonal(kron.T @ fisher @ kron).reshape(o, i)
        scale = float(lam.abs().max())
        assert torch.allclose(pre.factors[m]["eigenvalues"], lam, rtol=0, atol=8 * o * i * U * scale)
        damping = DAMPING_SCALE * float(lam.mean())
        dense = kron @ torch.diag((lam + damping).flatten()) @ kron.T
        expected = torch.linalg.solve(dense, vs[m].flatten(1).T).T
        cond = float((lam.max() + damping) / (lam.min() + damping))
        error = (applied[m].flatten(1) - expected).norm() / expected.norm()
        assert error <= 8 * cond * o * i * U


def test_preconditioned_query_equals_dense_inverse_then_normalise(fitted):
    """The query side: gradients() with a preconditioner is H^-1 of each raw layer gradient, then layer-normalised."""
    computer, items, loops, fits = fitted
    pre, _ = fits["ekfac"]
    query = GradientComputer(computer.loaded, computer.config, preconditioner=pre)
    got = query.gradients(items[:3])
    for b in range(3):
        layers = pre.apply([dw[None] for dw in loops[b][2]])
        expected = torch.cat([(v / v.norm()).flatten() for v in layers])
        assert float((got[b] - expected).norm()) <= 1e-9  # unit vectors per layer; float64 throughout


def test_fit_store_guard_and_attribute_end_to_end(tiny, toy_data, tmp_path):
    """cache + fit + attribute with each preconditioner: the scores are the exact preconditioned inner products of
    the stored rows (sketched); a record fitted for another cache is refused; a missing kind says how to fit it."""
    store_url = str(tmp_path / "store")
    options = dict(sketch=SketchConfig(k=256, lam=4), gradient=GradientConfig(batch_size=8), shard_rows=16)
    manifest = build_cache(tiny, toy_data, store_url, progress=False, **options)
    plan = plan_cache(tiny, toy_data, store_url, **options)
    computer = GradientComputer(tiny, manifest.gradient)
    records = ensure_preconditioners(plan.store, manifest, computer, plan.items, ["diagonal", "ekfac"], progress=False)
    assert [r.kind for r in records] == ["diagonal", "ekfac"] and all(r.rows == 48 for r in records)
    again = ensure_preconditioners(plan.store, manifest, computer, plan.items, ["ekfac"], progress=False)
    assert again[0] == records[1]  # intact: not refitted

    gens = [Generation(prompt="What is the capital of France?", response="Paris is the capital.")]
    scores = {}
    for kind in ("none", "diagonal", "ekfac"):
        config = AttributeConfig(top_k=48, auto_target=0, preconditioner=kind)
        att = attribute(tiny, gens, cache_url=plan.store.url, config=config, progress=False)
        scores[kind] = {h.row: h.score for h in att.generations[0].helpful}
    assert scores["none"] != scores["ekfac"] and scores["diagonal"] != scores["ekfac"]

    # the ekfac scores are <S g_row, S normalise(H^-1 g_gen)>: recompute them from the stored shards
    from rapidin.attribution import Features

    features = Features.of(tiny, manifest, load_preconditioner(plan.store, manifest, "ekfac"))
    from rapidin.data import tokenize
    from rapidin.targets import format_prompt

    item = tokenize(tiny.tokenizer, format_prompt(tiny, gens[0].prompt, manifest.dataset["format"]), gens[0].response,
                    manifest.gradient.max_length)
    q = features.sketch(features.query_computer.gradients([item]))[0]
    stored = torch.cat([plan.store.load_shard(info)[0] for info in manifest.shards]).float()
    rows = torch.cat([plan.store.load_shard(info)[1] for info in manifest.shards])
    k = stored.shape[1]
    bound = 2 * k * 2.0**-24 * (stored.abs() @ q.abs())  # float32 dot products summed in different orders
    for r, score in scores["ekfac"].items():
        j = int((rows == r).nonzero()[0, 0])
        assert abs(score - float(stored[j] @ q)) <= float(bound[j])

    # spec guard: a record claiming another cache is refused, with the way out
    path = tmp_path / "store"
    record_file = next(path.rglob(record_name("ekfac")))
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "cache_id": "0" * 16}))
    with pytest.raises(CacheError, match="fitted for cache 0000000000000000"):
        load_preconditioner(CacheStore(plan.store.url), manifest, "ekfac")
    # corrupted factors are refused, and refitted by the next ensure
    record_file.write_text(json.dumps(record))
    factors = record_file.with_suffix(".safetensors")
    factors.write_bytes(factors.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CacheError, match="corrupted"):
        load_preconditioner(CacheStore(plan.store.url), manifest, "ekfac")
    ensure_preconditioners(plan.store, manifest, computer, plan.items, ["ekfac"], progress=False)
    load_preconditioner(CacheStore(plan.store.url), manifest, "ekfac")
    # a kind never fitted: the error says how to fit it
    (path / next(path.rglob(record_name("diagonal"))).relative_to(path)).unlink()
    with pytest.raises(CacheError, match="--preconditioners diagonal"):
        attribute(tiny, gens, cache_url=plan.store.url, config=AttributeConfig(preconditioner="diagonal"), progress=False)


PEERS = Path(__file__).resolve().parents[1] / ".rapidin" / "peers"


@pytest.mark.peers
@pytest.mark.needs((PEERS / "kronfluence" / "__init__.py").exists(), f"kronfluence missing from {PEERS}: run `make peers`")
def test_ekfac_scores_equal_kronfluence(fitted, tmp_path, monkeypatch):
    """The same tiny model (float64), rows and tracked layers in kronfluence 1.0.1 with EK-FAC set up as ours: the
    empirical Fisher, each example's mean response loss, damping 0.1 x the mean eigenvalue, float64 throughout.
    Its pairwise scores g_q^T H^-1 g_t equal ours (raw gradients, no sketch) within a perturbation bound."""
    monkeypatch.syspath_prepend(str(PEERS))  # beside the venv, for this test only (never seen as installed)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    computer, items, loops, fits = fitted
    loaded = computer.loaded
    pad = loaded.tokenizer.pad_token_id or 0
    data = [{"ids": torch.tensor(it.input_ids), "prompt_len": torch.tensor(it.prompt_len)} for it in items]

    def collate(rows):
        n = max(len(r["ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        weights = torch.zeros(len(rows), n, dtype=torch.float64)  # the response tokens, as ours
        for b, r in enumerate(rows):
            ids[b, : len(r["ids"])], mask[b, : len(r["ids"])] = r["ids"], 1
            weights[b, int(r["prompt_len"]) : len(r["ids"])] = 1.0
        return {"ids": ids, "mask": mask, "weights": weights}

    class MeanLoss(Task):  # sum over examples of each example's mean loss: kronfluence's per-sample gradient is ours
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none")
            w = batch["weights"][:, 1:]
            return ((nll * w).sum(1) / w.sum(1)).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return [name for name, _ in computer.modules]

        def get_attention_mask(self, batch):
            return batch["mask"]

    f64 = torch.float64
    task = MeanLoss()
    analyzer = Analyzer("xcheck", prepare_model(loaded.model, task), task, cpu=True, disable_tqdm=True,
                        output_dir=str(tmp_path))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
    analyzer.fit_all_factors("ekfac", data, per_device_batch_size=4, factor_args=FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64))
    analyzer.compute_pairwise_scores("scores", "ekfac", data[:3], data, per_device_query_batch_size=1,
                                     per_device_train_batch_size=4, score_args=ScoreArguments(
                                         damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                         score_dtype=f64))
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"].double()  # [3 queries, rows]

    pre, _ = fits["ekfac"]
    raw = computer.config.model_copy(update={"normalize": False})
    queries = GradientComputer(loaded, raw, preconditioner=pre).gradients(items[:3])
    rows = GradientComputer(loaded, raw).gradients(items)
    ours = queries @ rows.T
    # ours and theirs differ only by rounding: each H^-1 v is within cond(H) * n * u of exact, amplified where the
    # covariances' eigenvectors are sensitive: by |delta C| / gap <= tokens * u * |C| / (smallest eigen gap) each
    tokens = sum(len(it.input_ids) for it in items)
    sensitivity = 0.0
    for m in range(len(computer.layout)):
        for cov in (torch.cat([x[m] for x, _, _ in loops]), torch.cat([g[m] for _, g, _ in loops])):
            values = torch.linalg.eigvalsh(cov.T @ cov)
            gap = float((values[1:] - values[:-1]).min())
            sensitivity = max(sensitivity, tokens * U * float(values[-1]) / gap)
    lam = [f["eigenvalues"] for f in pre.factors]
    cond = max(float((v.max() + d) / (v.min() + d)) for v, d in zip(lam, pre.damping, strict=True))
    n = max(o * i for _, (o, i) in computer.layout)
    scale = queries.norm(dim=1)[:, None] * rows.norm(dim=1)[None, :]
    bound = 16 * cond * (n * U + sensitivity) * scale
    assert (ours - theirs).abs().le(bound).all(), float(((ours - theirs).abs() / scale).max())
    assert float(ours.abs().max()) > 1e3 * float(bound.max())  # the check is much tighter than the scores
