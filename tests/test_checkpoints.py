"""Several checkpoints (TracIn): a row's score is the weighted sum of its scores at each checkpoint, each against that
checkpoint's own cache; checked against separate single-checkpoint attributions of every row."""

import pytest
import torch

from rapidin.attribution import Checkpoint, Generation, attribute
from rapidin.cache import build_cache, open_cache
from rapidin.cli import main
from rapidin.config import AttributeConfig, GradientConfig, SketchConfig
from rapidin.errors import CacheError, RapidInError
from rapidin.models import ModelRef, load_model
from rapidin.report import render_html
from rapidin.toy import write_jsonl

OPTIONS = dict(sketch=SketchConfig(k=128, lam=4), gradient=GradientConfig(batch_size=8), shard_rows=16)
GENS = [Generation(prompt="What is the capital of France?", response="Paris is the capital."),
        Generation(prompt="Name a colour.", response="Blue, like the sky.")]
F32 = 2.0**-24
GAMMA_K = OPTIONS["sketch"].k * F32 / (1 - OPTIONS["sketch"].k * F32)


@pytest.fixture()
def earlier(tiny, tiny_dir, tmp_path):
    """An 'earlier checkpoint' of the tiny model: the same architecture with perturbed weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path / "earlier"
    tiny.model.save_pretrained(out)
    tiny.tokenizer.save_pretrained(out)
    return load_model(ModelRef(path=str(out), name="tiny"), device="cpu")


def test_sum_over_checkpoints_equals_separate_scans(tiny_dir, earlier, toy_data, tmp_path):
    final = load_model(ModelRef(path=tiny_dir, name="tiny"), device="cpu")
    store = str(tmp_path / "store")
    build_cache(final, toy_data, store, progress=False, **OPTIONS)
    build_cache(earlier, toy_data, store, progress=False, **OPTIONS)
    config = AttributeConfig(top_k=6, auto_target=0)
    weight = 0.25
    att = attribute(final, GENS, store, config=config, progress=False,
                    checkpoints=[Checkpoint(earlier, weight=weight, label="epoch 1")])
    assert [c["label"] for c in att.checkpoints] == ["final", "epoch 1"] and att.checkpoints[1]["weight"] == weight

    # every row's score at each checkpoint alone, from the single-checkpoint path, and the float32 error bound of
    # each: a dot product of K terms is within gamma_K sum_i |a_i b_i| of exact (Higham eq. 3.5), two of them within
    # twice that of each other; the sum over checkpoints adds one float32 rounding of the total
    alone, bounds = [], []
    for model in (final, earlier):
        store_, manifest = open_cache(model, store)
        _, result = attribute(model, GENS, store, config=config, progress=False, keep_all_scores=True)
        order = torch.argsort(result.all_rows)
        rows = result.all_rows[order]
        alone.append(torch.stack(result.all_scores, 1)[order].double())
        shards = [store_.load_shard(info) for info in manifest.shards]
        vectors = torch.cat([v for v, _ in shards])[torch.argsort(torch.cat([r for _, r in shards]))].double()
        bounds.append(2 * GAMMA_K * (vectors.abs() @ result.queries.double().abs().T))
    total = alone[0] + weight * alone[1]
    slack = bounds[0] + weight * bounds[1] + 2 * F32 * total.abs()
    # keep_all_scores: every row's summed score, not only the listed ones
    _, summed = attribute(final, GENS, store, config=config, progress=False, keep_all_scores=True,
                          checkpoints=[Checkpoint(earlier, weight=weight, label="epoch 1")])
    order = torch.argsort(summed.all_rows)
    assert torch.equal(summed.all_rows[order], rows)
    assert ((torch.stack(summed.all_scores, 1)[order].double() - total).abs() <= slack).all()
    for g, gen in enumerate(att.generations):
        for kind, key in (("helpful", total[:, g]), ("harmful", -total[:, g]), ("influential", total[:, g].abs())):
            hits = getattr(gen, kind)
            assert len(hits) == config.top_k
            kth = float(key.sort(descending=True).values[config.top_k - 1])
            for hit in hits:
                i = int((rows == hit.row).nonzero()[0, 0])
                assert len(hit.checkpoint_scores) == 2
                assert abs(hit.checkpoint_scores[0] - float(alone[0][i, g])) <= float(bounds[0][i, g])
                assert abs(hit.checkpoint_scores[1] - weight * float(alone[1][i, g])) <= weight * float(bounds[1][i, g])
                assert abs(hit.score - float(total[i, g])) <= float(slack[i, g])
                # it belongs to the top k of the summed scores, up to the bound at the boundary
                assert float(key[i]) >= kth - float(slack[:, g].max()) * 2
    html = render_html(att)
    assert "per checkpoint: final" in html and "epoch 1" in html


def test_checkpoint_cache_over_other_rows_is_refused(tiny_dir, earlier, toy_data, toy_rows, tmp_path):
    final = load_model(ModelRef(path=tiny_dir, name="tiny"), device="cpu")
    store = str(tmp_path / "store")
    build_cache(final, toy_data, store, progress=False, **OPTIONS)
    other_data = write_jsonl(toy_rows[:40], tmp_path / "other.jsonl")
    manifest = build_cache(earlier, str(other_data), store, progress=False, **OPTIONS)
    url = f"{store}/tiny/{manifest.model['version']}/{manifest.cache_id}"
    with pytest.raises(CacheError, match="other rows or shards"):
        attribute(final, GENS, store, config=AttributeConfig(auto_target=0), progress=False,
                  checkpoints=[Checkpoint(earlier, cache_url=url)])
    with pytest.raises(RapidInError, match="token-wise"):
        attribute(final, GENS, store, config=AttributeConfig(token_wise=True), progress=False,
                  checkpoints=[Checkpoint(earlier)])


def test_cli_checkpoints(tiny_dir, earlier, toy_data, tmp_path, capsys):
    store = str(tmp_path / "store")
    for model in (tiny_dir, earlier.ref.path):
        assert main(["cache", "--model", model, "--name", "tiny", "--data", toy_data, "--store", store,
                     "--k", "128", "--lam", "4", "--shard-rows", "16"]) == 0
    out = tmp_path / "result.json"
    assert main(["attribute", "--model", tiny_dir, "--name", "tiny", "--store", store, "--prompt", GENS[0].prompt,
                 "--response", GENS[0].response, "--checkpoint", earlier.ref.path, "--checkpoint-weight", "0.5",
                 "--out", str(out)]) == 0
    from rapidin.results import Attribution

    att = Attribution.model_validate_json(out.read_text())
    assert [c["weight"] for c in att.checkpoints] == [1.0, 0.5]
    assert all(len(h.checkpoint_scores) == 2 for h in att.generations[0].influential)
    capsys.readouterr()
    assert main(["attribute", "--model", tiny_dir, "--name", "tiny", "--store", store, "--prompt", "x",
                 "--checkpoint", earlier.ref.path, "--checkpoint-weight", "0.5", "--checkpoint-weight", "1"]) == 2
    assert "--checkpoint-weight" in capsys.readouterr().err
