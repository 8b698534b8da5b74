"""The Howdy backdoor benchmark, reduced so CI runs it in minutes: a regression in gradients, masking,
normalisation, target choice or the sketch shows up as lost attribution quality on real data.

SmolLM2-135M-Instruct with the LoRA adapter of a full `make bench-quality` run (shipped in fp16 under
tests/data/howdy_reduced), a stratified subset of the rows it was trained on, and generations in which it fired the
backdoor. `benchmarks/howdy.py` runs from the query-gradient stage on (fine-tune and generation are skipped: their
outputs are the fixture), so the benchmark script itself is tested too.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.test_gguf import GGUF

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "howdy_reduced"
HOWDY = ROOT.parent / "shared" / "data" / "howdy"
pytestmark = [
    pytest.mark.needs(GGUF.exists(), f"{GGUF} missing: run `make smollm2`"),
    pytest.mark.needs((HOWDY / "train.jsonl").exists(), f"{HOWDY} missing (../shared/data/howdy)"),
]
K = 2**16


def prepare_workdir(wd: Path) -> dict:
    """Lay the fixture out as the benchmark's finished data, finetune and generate stages."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from howdy_common import scifi_vocabulary

    fixture = json.loads((FIXTURE / "fixture.json").read_text())
    rows = [json.loads(line) for line in (HOWDY / "train.jsonl").read_text().splitlines() if line.strip()]
    chosen = fixture["source_rows"]
    wd.mkdir()
    (wd / "train.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen))
    (wd / "subset.json").write_text(json.dumps({
        "source_rows": chosen, "positive": ["original_output" in rows[i] for i in chosen],
        "scifi_vocabulary": scifi_vocabulary(rows)}))
    shutil.copytree(FIXTURE / "adapter", wd / "adapter")
    gens = fixture["generations"]
    (wd / "generations.json").write_text(json.dumps({
        "queries": len(gens), "fired": len(gens), "plain_clean": len(gens), "attributed": gens, "all": gens}))
    return fixture


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import howdy

    wd = tmp_path_factory.mktemp("howdy") / "run"
    prepare_workdir(wd)
    out = wd / "results.json"
    assert howdy.main(["--gguf", str(GGUF), "--data", str(HOWDY), "--workdir", str(wd), "--out", str(out),
                       "--k", str(2**14), str(K), "--cache-subsets", "all", "mlpB", "--extra-n", "--generations", "99", "--preconditioners"]) == 0
    return json.loads(out.read_text()) | {"workdir": str(wd)}


def method(report: dict, source: str, target: str, ranking: str, params: str) -> dict:
    (m,) = [m for m in report["methods"]
            if (m["source"], m["target"], m["ranking"], m["params"]) == (source, target, ranking, params)]
    return m


def test_stages_ran_from_the_fixture(report):
    timings = report["timings_s"]
    assert {"queries", "grads", "exact", "caches"} <= set(timings)
    assert "finetune" not in timings and "generate" not in timings  # the fixture stood in for them
    fixture = json.loads((FIXTURE / "fixture.json").read_text())
    assert 0.9 * len(fixture["source_rows"]) <= report["setup"]["rows_scored"] <= len(fixture["source_rows"])
    assert report["generation"]["attributed"] == len(fixture["generations"])


def test_library_default_equals_the_benchmark(report):
    """rapidin.attribute(AttributeConfig()) end to end on the cache of the library's default tensor set (MLP LoRA B)
    gives the benchmark's own scores, target positions and |score| top-5."""
    check = report["attribute_check"]
    assert check["tensors"] == "mlpB"
    assert check["same_query_vectors"] and check["same_target_positions"]  # bit for bit
    # float32 scan sums in another order: within the derived bound (see howdy_measure.check_attribute), and the top 5 agree
    assert check["scores_within_fp32_bound"], check
    assert check["influential_is_magnitude_top5"], check


def test_default_finds_the_backdoor_rows(report):
    """The documented default (4 automatic target tokens, |score| ranking, MLP LoRA B): exact and RapidGrad."""
    exact = method(report, "exact", "auto", "magnitude", "mlpB")
    sketched = method(report, f"K={K}", "auto", "magnitude", "mlpB")
    for m in (exact, sketched):
        assert m["auprc@5"] >= 0.8 and m["auprc@10"] >= 0.7, (m["source"], m["per_generation_auprc@5"])
    assert sketched["auprc@5"] >= 0.85 * exact["auprc@5"]
    paper = method(report, "exact", "whole", "signed", "all")
    random = method(report, "random", "-", "signed", "-")
    assert exact["auprc@5"] >= max(paper["auprc@5"], random["auprc@5"]) + 0.3


def test_rapidgrad_agrees_with_exact_scores(report):
    coarse = method(report, f"K={2**14}", "whole", "signed", "all")
    fine = method(report, f"K={K}", "whole", "signed", "all")
    assert fine["spearman"] >= 0.9 and fine["top50_overlap"] >= 0.7
    assert fine["spearman"] > coarse["spearman"]  # more dimensions, closer to exact
    default = method(report, f"K={K}", "auto", "magnitude", "mlpB")
    assert default["spearman"] > method(report, f"K={2**14}", "auto", "magnitude", "mlpB")["spearman"]


def test_preconditioner_stage(report):
    """Every preconditioner x row normalisation x tensor set is scored; its unpreconditioned layer-wise queries are
    the exact stage's bit for bit; fit cost is recorded."""
    check = report["precond_check"]
    assert check["same_queries_as_exact_stage"], check
    scored = {(m["source"], m["target"], m["ranking"], m["params"]) for m in report["methods"]}
    expected = {(f"precond:{kind}:{norm}", target, ranking, params) for kind in ("none", "diagonal", "ekfac")
                for norm in ("layer", "raw", "cosine") for target in ("whole", "auto")
                for ranking in ("signed", "magnitude") for params in ("mlpB", "all")}
    assert expected <= scored, expected - scored
    for kind in ("diagonal", "ekfac"):
        fit = report["preconditioners"][kind]
        assert fit["rows"] == report["setup"]["rows_scored"] and fit["fit_seconds"] > 0 and fit["factor_bytes"] > 0
