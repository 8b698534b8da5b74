"""Demo task: the toy data with its planted backdoor and the untrained tiny Llama."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from rapidin import toy
from rapidin.data import alpaca_prompt


@task(name="toy-world", cache_policy=NO_CACHE)
def toy_world(workdir: str, rows: int, seed: int) -> tuple[str, str]:
    """Write the toy rows (with a planted backdoor) and build the untrained tiny Llama (once)."""
    work = Path(workdir).resolve()
    data = toy.write_jsonl(toy.demo_rows(rows, seed=seed), work / "toy.jsonl")
    base = work / "tiny-base"
    if not (base / "config.json").exists():
        texts = [alpaca_prompt(r["instruction"]) + r["output"] for r in toy.demo_rows(max(rows, 240), seed=seed)]
        toy.build_tiny_llama(base, texts)
    return str(data), str(base)
