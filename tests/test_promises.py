"""What the README promises, each checked: no pickle anywhere, `trust_remote_code` off unless asked, models from
fsspec URLs, and `rapidin demo` itself."""

import re
import shutil
from pathlib import Path

import fsspec

from rapidin import GradientConfig, SketchConfig, build_cache
from rapidin.cli import main
from rapidin.models import ModelRef, load_model

ROOT = Path(__file__).resolve().parents[1]
PICKLE = re.compile(r"\bimport pickle\b|\bcloudpickle\b|\bjoblib\b|torch\.save\(|torch\.load\(|allow_pickle\s*=\s*True"
                    r"|\.to_pickle\(|read_pickle\(")


def test_no_pickle_in_the_code():
    sources = [p for d in ("rapidin", "tasks", "flows", "benchmarks", "infra") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 30
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in sources
                 for n, line in enumerate(p.read_text().splitlines(), 1) if PICKLE.search(line)]
    assert offenders == []


def test_no_pickle_in_a_cache(tiny, toy_data, tmp_path):
    """Every file a cache build writes is JSON, safetensors or Parquet; none starts with a pickle opcode."""
    build_cache(tiny, toy_data, tmp_path.as_uri(), sketch=SketchConfig(k=256, lam=2), shard_rows=16,
                gradient=GradientConfig(max_length=96), progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors", ".parquet"}
    assert not any(p.read_bytes()[:1] == b"\x80" for p in files)


def test_trust_remote_code_is_off_unless_asked(tiny_dir, toy_data, tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: seen.append(kw.get("trust_remote_code")) or real(*a, **kw))
    assert main(["cache", "--model", tiny_dir, "--data", toy_data, "--store", tmp_path.as_uri(), "--k", "256"]) == 0
    assert main(["cache", "--model", tiny_dir, "--data", toy_data, "--store", tmp_path.as_uri(), "--k", "256",
                 "--trust-remote-code"]) == 0
    assert seen == [False, True]
    assert ModelRef(path="m").trust_remote_code is False


def test_model_from_an_fsspec_url(tiny_dir, tmp_path):
    """A model directory behind an fsspec URL is copied once to the model cache and loads as the local one."""
    fs = fsspec.filesystem("memory")
    for path in Path(tiny_dir).iterdir():
        fs.pipe(f"/models/tiny/{path.name}", path.read_bytes())
    try:
        remote = load_model(ModelRef(path="memory://models/tiny"), device="cpu", cache_dir=str(tmp_path))
        local = load_model(ModelRef(path=tiny_dir), device="cpu")
        assert remote.fingerprint == local.fingerprint
        assert any((tmp_path).rglob("config.json"))  # the local copy
    finally:
        fs.rm("/models", recursive=True)


def test_rapidin_demo_finds_the_poisoned_rows(trained_toy, tmp_path, capsys):
    """`rapidin demo` end to end (reusing the fine-tuned toy model the demo builds; it is the same function)."""
    data, model_dir = trained_toy
    workdir = tmp_path / "demo"
    shutil.copytree(Path(model_dir).parent, workdir)
    assert main(["demo", "--workdir", str(workdir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "POISONED" in out and "precision@5" in out and "AP@5" in out and "average precision" in out
    precision = float(re.search(r"precision@5=([0-9.]+)", out).group(1))
    assert precision >= 0.6, out  # the backdoor rows lead the influential list
