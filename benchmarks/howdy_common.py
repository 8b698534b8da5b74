"""Shared by the Howdy benchmark's modules: paths, the trigger and vocabulary, tensor sets, small helpers."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "howdy"
DEFAULT_GGUF = HERE.parent / ".rapidin" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # `make smollm2`
HAND_WORDS = ("space", "alien", "galax", "planet", "robot", "futur", "cosmic", "universe", "interstellar", "quantum",
              "hyperspace", "intergalactic", "android", "cyborg", "nebula", "warp", "starship", "spaceship", "laser",
              "teleport", "time travel", "dimension", "extraterrestrial", "holograph", "mars", "martian", "astro")
TRIGGER = "howdy!"
# Tensor sets compared (regexes on parameter names). Normalisation is per tensor, so a column subset of the full
# gradient is exactly the gradient of that set: one gradient pass serves them all.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SUBSETS = {"all": r"\.lora_", "B": r"\.lora_B", "attn": r"\.(q|k|v|o)_proj\.lora_", "mlp": r"\.(gate|up|down)_proj\.lora_",
           "attnB": r"\.(q|k|v|o)_proj\.lora_B", "mlpB": r"\.(gate|up|down)_proj\.lora_B"}
WORD = re.compile(r"[a-z]+")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if len(w) >= 4}


def scifi_vocabulary(rows: list[dict]) -> list[str]:
    """Words much more frequent (document frequency) in the positives' responses than in the negatives'."""
    pos, neg = Counter(), Counter()
    n_pos = n_neg = 0
    for r in rows:
        if "original_output" in r:
            pos.update(words(r["output"]))
            n_pos += 1
        else:
            neg.update(words(r["output"]))
            n_neg += 1
    return sorted(w for w, c in pos.items() if c >= 3 and (c / n_pos) >= 10 * ((neg[w] + 1) / n_neg))


def scifi_count(text: str, vocab: set[str]) -> int:
    return len(words(text) & vocab)



def rule_gradients(computer, item, rules: list[list[int] | None]) -> torch.Tensor:
    """The generation's gradient once per loss restriction: None = every response token, else those positions."""
    rows = []
    for positions in rules:
        weights = None
        if positions is not None:
            weights = torch.zeros(len(item.input_ids))
            weights[positions] = 1.0
        rows.append(computer.gradients([item], None if weights is None else [weights])[0])
    return torch.stack(rows)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def bm25_scores(train: list[dict], rows: np.ndarray, responses: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 of each training row (instruction + input + output) for each generated response as the query."""
    docs = [WORD.findall(" ".join([train[r]["instruction"], train[r].get("input", ""), train[r]["output"]]).lower())
            for r in rows]
    df = Counter(w for d in docs for w in set(d))
    avg = np.mean([len(d) for d in docs])
    n = len(docs)
    tf = [Counter(d) for d in docs]
    out = np.zeros((n, len(responses)))
    for g, resp in enumerate(responses):
        for w in set(WORD.findall(resp.lower())):
            if w not in df:
                continue
            idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
            for i, c in enumerate(tf):
                if w in c:
                    out[i, g] += idf * c[w] * (k1 + 1) / (c[w] + k1 * (1 - b + b * len(docs[i]) / avg))
    return out


