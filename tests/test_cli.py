"""The command line on bad input: one line naming the option and the allowed values, exit status 2, nothing
written; and every numeric option of every command, thrown random values (property test)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidin.cli import build_parser, main
from rapidin.config import AttributeConfig, BuildConfig, GradientConfig, SketchConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE = ["cache", "--model", "MODEL", "--data", "DATA", "--store", "STORE"]
ATTRIBUTE = ["attribute", "--model", "MODEL", "--prompt", "howdy! What is the capital of Peru?", "--store", "STORE",
             "--response", "Captain Zorg beamed the crystal aboard."]


def run(argv: list[str], tiny_dir: str, toy_data: str, store: Path, capsys) -> tuple[int, str, str]:
    """main(argv) with MODEL, DATA, STORE filled in; argparse's own refusals (SystemExit) count as exit codes."""
    argv = [a.replace("MODEL", tiny_dir).replace("DATA", toy_data).replace("STORE", store.as_uri()) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


BAR = re.compile(r"^[\w -]+: +\d+%\|")  # the project's own progress bars (tqdm), which may precede an error


def one_line(err: str) -> str:
    """The one message line of stderr (progress bars aside); fails on anything else."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not BAR.match(line)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("extra", "names"), [
    (["--shard-rows", "-3"], ["--shard-rows -3", "greater than or equal to 1"]),
    (["--shard-rows", "0"], ["--shard-rows 0", "greater than or equal to 1"]),
    (["--k", "0"], ["--k 0", "greater than or equal to 1"]),
    (["--k", "-5"], ["--k -5", "greater than or equal to 1"]),
    (["--lam", "-1"], ["--lam -1", "greater than or equal to 0"]),
    (["--max-length", "0"], ["--max-length 0", "greater than or equal to 2"]),
    (["--batch-size", "0"], ["--batch-size 0", "greater than or equal to 1"]),
    (["--k", "abc"], ["--k", "invalid int value"]),
    (["--dtype", "int4"], ["--dtype", "float16", "int8"]),
    (["--data", "foo://x"], ["--data", "unknown URL scheme 'foo'"]),
    (["--store", "foo://x"], ["--store", "unknown URL scheme 'foo'"]),
    (["--model", "foo://x"], ["--model", "unknown URL scheme 'foo'"]),
])
def test_cache_bad_option_is_one_line_and_writes_nothing(extra, names, tiny_dir, toy_data, tmp_path, capsys):
    store = tmp_path / "store"
    code, _, err = run(CACHE + extra, tiny_dir, toy_data, store, capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("rapidin cache: error:") and all(n in line for n in names), line
    assert not store.exists()


@pytest.mark.parametrize(("argv", "names"), [
    (ATTRIBUTE + ["--top-k", "-1"], ["--top-k -1", "greater than or equal to 1"]),
    (ATTRIBUTE + ["--open"], ["--open needs --out"]),
    (["attribute", "--model", "MODEL", "--prompt", "p", "--store", "foo://x"], ["--store", "unknown URL scheme"]),
    (["attribute", "--model", "MODEL", "--prompt", "p", "--target", "a", "--auto-target", "2"],
     ["either target words or auto_target"]),
    (["attribute", "--model", "MODEL", "--prompt", "p", "--paper", "--auto-target", "2"],
     ["the paper's scoring uses the whole generation"]),
])
def test_attribute_bad_option_is_one_line(argv, names, tiny_dir, toy_data, tmp_path, capsys):
    code, _, err = run(argv, tiny_dir, toy_data, tmp_path / "store", capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("rapidin attribute: error:") and all(n in line for n in names), line


def test_each_option_has_its_own_destination():
    """--dtype (the cache's storage dtype) and --model-dtype (the weights) are two options, not one."""
    args = build_parser().parse_args(["cache", "--model", "m", "--data", "d", "--dtype", "bfloat16"])
    from rapidin.cli import _model_ref
    from rapidin.cli_options import given

    assert given(args, SketchConfig)["dtype"] == "bfloat16" and _model_ref(args).dtype == "float32"
    actions = [a.dest for a in build_parser()._subparsers._group_actions[0].choices["cache"]._actions]
    assert len(actions) == len(set(actions))


def test_settings_from_the_environment_are_checked(tiny_dir, toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAPIDIN_STORE_URL", "foo://x")
    code, _, err = run(["attribute", "--model", "MODEL", "--prompt", "p"], tiny_dir, toy_data, tmp_path, capsys)
    assert code == 2 and "RAPIDIN_STORE_URL" in one_line(err) and "unknown URL scheme" in err
    monkeypatch.setenv("RAPIDIN_STORE_URL", tmp_path.as_uri())
    monkeypatch.setenv("RAPIDIN_K", "0")
    code, _, err = run(CACHE, tiny_dir, toy_data, tmp_path / "store", capsys)
    assert code == 2 and "RAPIDIN_K" in one_line(err) and not (tmp_path / "store").exists()


# Every numeric option of every command, from the config models the CLI is generated from.
NUMERIC = {
    "cache": {f"--{name.replace('_', '-')}": (model, name) for model in (SketchConfig, GradientConfig, BuildConfig)
              for name, f in model.model_fields.items() if f.annotation in (int, float)},
    "attribute": {f"--{name.replace('_', '-')}": (AttributeConfig, name)
                  for name, f in AttributeConfig.model_fields.items() if f.annotation in (int, float)},
}


def test_numeric_options_cover_every_command():
    help_text = {cmd: build_parser()._subparsers._group_actions[0].choices[cmd].format_help() for cmd in NUMERIC}
    for cmd, options in NUMERIC.items():
        assert options and all(flag in help_text[cmd] for flag in options), cmd
    assert {"--k", "--lam", "--seed", "--shard-rows", "--batch-size", "--max-length"} <= set(NUMERIC["cache"])
    assert {"--top-k", "--auto-target", "--max-new-tokens", "--train-token-rows"} <= set(NUMERIC["attribute"])


values = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 1, 2, 2**16, 2**63, 2**64]),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(max_size=6).filter(lambda t: not t.startswith("-")))  # "-h" would be an option


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(NUMERIC)), data=st.data())
def test_random_values_for_every_numeric_option(command, data, tmp_path_factory, capsys):
    """Accepted (then the missing model is the one-line error), or one line naming the option; exit 2 either way,
    never a traceback, never a cache written. The model does not exist, so nothing can be built."""
    flag = data.draw(st.sampled_from(sorted(NUMERIC[command])))
    value = str(data.draw(values))
    store = tmp_path_factory.mktemp("store")
    base = CACHE if command == "cache" else ATTRIBUTE
    argv = [a.replace("MODEL", "/nonexistent/model").replace("DATA", "/nonexistent/data.jsonl")
            .replace("STORE", store.as_uri()) for a in base] + [flag, value]
    code, _, err = run(argv, "", "", store, capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"rapidin {command}: error:"), line
    model, name = NUMERIC[command][flag]
    try:
        model(**{name: int(value)})
        accepted = True
    except Exception:  # noqa: BLE001 - any refusal must surface as the option's error
        accepted = False
    assert ("model path does not exist" in line) == accepted, line
    if not accepted:
        assert flag in line, line
    assert not any(store.iterdir())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values, repeat=st.integers(1, 3))
def test_random_checkpoint_weights(value, repeat, tmp_path_factory, capsys):
    """--checkpoint-weight (not from a config model): a finite number per --checkpoint is accepted (then the missing
    model is the error); anything else is one line naming the option. Exit 2 either way, nothing written."""
    store = tmp_path_factory.mktemp("store")
    argv = [a.replace("MODEL", "/nonexistent/model").replace("STORE", store.as_uri()) for a in ATTRIBUTE]
    argv += ["--checkpoint", "/nonexistent/ckpt", f"--checkpoint-weight={value}"]  # "=": a value may start with "-"
    argv += ["--checkpoint-weight", "1"] * (repeat - 1)
    code, _, err = run(argv, "", "", store, capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("rapidin attribute: error:"), line
    try:
        accepted = repeat == 1 and math.isfinite(float(str(value)))
    except ValueError:
        accepted = False
    assert ("model path does not exist" in line) == accepted, line
    if not accepted:
        assert "--checkpoint-weight" in line, line
    assert not any(store.iterdir())


def test_inspect_into_a_closed_pipe_is_quiet(trained_cache):
    """`rapidin inspect ... | head -1`: no BrokenPipeError traceback."""
    shell = f"{sys.executable} -m rapidin.cli inspect {trained_cache} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.startswith("cache ") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


@pytest.fixture(scope="module")
def trained_cache(tiny_dir, toy_data, tmp_path_factory):
    """A small cache with many shards, built through the CLI."""
    store = tmp_path_factory.mktemp("inspect").as_uri()
    argv = ["cache", "--model", tiny_dir, "--name", "tiny", "--model-version", "1", "--data", toy_data,
            "--store", store, "--k", "256", "--lam", "2", "--shard-rows", "2"]
    assert main(argv) == 0
    (url,) = [str(p) for p in Path(store.removeprefix("file://")).glob("tiny/1/*")]
    return url


def test_missing_target_words_are_named(tiny_dir, toy_data, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["cache", "--model", tiny_dir, "--name", "tiny", "--model-version", "1", "--data", toy_data,
                 "--store", store.as_uri(), "--k", "256", "--lam", "2"]) == 0
    capsys.readouterr()
    argv = ["attribute", "--model", tiny_dir, "--name", "tiny", "--model-version", "1", "--store", store.as_uri(),
            "--prompt", "howdy! What is Peru?", "--response", "Captain Zorg beamed the crystal aboard.", "--top-k", "2"]
    assert main(argv + ["--target", "zorg", "unicorn"]) == 0
    err = capsys.readouterr().err
    assert "--target ['unicorn']: not in the response" in err
    assert main(argv + ["--target", "unicorn"]) == 2
    assert "none of these words occurs in the response" in one_line(capsys.readouterr().err)


def test_commands_print_no_dependency_noise(tiny_dir, toy_data, tmp_path):
    """Users see the project's messages, not transformers' FutureWarnings or Hugging Face load bars."""
    argv = [sys.executable, "-m", "rapidin.cli", "cache", "--model", tiny_dir, "--name", "tiny", "--model-version", "1",
            "--data", toy_data, "--store", tmp_path.as_uri(), "--k", "256", "--lam", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip() and not BAR.match(line)]
    assert noise == [], noise


def test_sketch_method_from_the_environment_and_paper(tiny_dir, toy_data, tmp_path, capsys, monkeypatch):
    """RAPIDIN_SKETCH_METHOD picks the sketch of a build that names none; --paper keeps the paper's RapidGrad over it,
    and refuses an explicit --method kronecker in one line, writing nothing."""
    import json

    monkeypatch.setenv("RAPIDIN_SKETCH_METHOD", "kronecker")
    code, out, err = run(CACHE + ["--k", "512"], tiny_dir, toy_data, tmp_path / "kron", capsys)
    assert code == 0, err
    (manifest,) = (tmp_path / "kron").rglob("manifest.json")
    assert json.loads(manifest.read_text())["sketch"]["config"]["method"] == "kronecker"
    code, out, err = run(CACHE + ["--k", "512", "--paper"], tiny_dir, toy_data, tmp_path / "paper", capsys)
    assert code == 0, err
    (manifest,) = (tmp_path / "paper").rglob("manifest.json")
    assert json.loads(manifest.read_text())["sketch"]["config"]["method"] == "rapidgrad"
    code, _, err = run(CACHE + ["--paper", "--method", "kronecker"], tiny_dir, toy_data, tmp_path / "no", capsys)
    assert code == 2 and "--paper caches with the paper's RapidGrad" in one_line(err) and not (tmp_path / "no").exists()
    monkeypatch.setenv("RAPIDIN_SKETCH_METHOD", "sparse")
    code, _, err = run(CACHE, tiny_dir, toy_data, tmp_path / "bad", capsys)
    assert code == 2 and "RAPIDIN_SKETCH_METHOD" in one_line(err) and not (tmp_path / "bad").exists()
