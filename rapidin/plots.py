"""PNG plots of an attribution (matplotlib, Agg canvas; imported lazily, no global backend change).

The figures are drawn on `matplotlib.figure.Figure` with an Agg canvas directly, so nothing touches
pyplot's global state or the user's chosen backend, and they render headless.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import NEGATIVE_RGB, POSITIVE_RGB
from .results import Attribution, GenerationResult, Hit

_POS = tuple(c / 255 for c in POSITIVE_RGB)
_NEG = tuple(c / 255 for c in NEGATIVE_RGB)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _array(values: Any):
    import numpy as np

    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def plot_scores(all_scores: Any, top: GenerationResult | Sequence[Hit], title: str | None = None) -> bytes:
    """Histogram of one generation's scores over the whole cache with its top-k rows marked (PNG bytes).

    all_scores: every row's score for the generation (`ScanResult.all_scores[g]`, array or list).
    top: the generation's result (helpful rows marked orange, harmful blue) or a list of hits
    (coloured by the sign of their score).
    """
    import numpy as np

    scores = _array(all_scores)
    scores = scores[np.isfinite(scores)]
    if isinstance(top, GenerationResult):
        helpful, harmful = list(top.helpful), list(top.harmful)
    else:
        helpful = [h for h in top if h.score >= 0]
        harmful = [h for h in top if h.score < 0]
    fig = _figure(8, 3.6)
    ax = fig.add_subplot()
    if scores.size:
        bins = int(min(120, max(10, math.sqrt(scores.size) * 2)))
        counts, _, _ = ax.hist(scores, bins=bins, color="#9aa1ab", edgecolor="none", label=f"all rows (n={scores.size:,})")
        if counts.max() > 50:
            ax.set_yscale("log")
    for hits, col, name in ((helpful, _POS, "top helpful"), (harmful, _NEG, "top harmful")):
        for i, hit in enumerate(hits):
            ax.axvline(hit.score, ymin=0, ymax=0.25, color=col, linewidth=1.2, label=f"{name} (k={len(hits)})" if i == 0 else None)
        if hits:
            edge = min(h.score for h in hits) if col == _POS else max(h.score for h in hits)
            ax.axvline(edge, color=col, linestyle="--", linewidth=1)
    ax.axvline(0, color="#333", linewidth=0.6)
    ax.set_xlabel("influence score I(generation, training row)")
    ax.set_ylabel("rows")
    if scores.size:
        ax.text(0.01, 0.97, f"mean {scores.mean():.3g}, std {scores.std():.3g}", transform=ax.transAxes, va="top",
                fontsize=8, color="#333")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_title(title or "Score distribution over the cache, top-k marked", fontsize=10)
    return _png(fig)


def _label(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t") or "\u2205"


def plot_token_influence(generation: GenerationResult, rows: int = 5, title: str | None = None) -> bytes:
    """Heat map of I(t_j, z) per generated token for the top `rows` helpful and harmful rows (PNG bytes).

    Falls back to the strongest helpful/harmful score per token (per_token lists) when the top rows
    carry no token scores; raises ValueError when the result has no token-wise scores at all.
    """
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    n = len(generation.tokens)
    matrix, labels = [], []
    for kind, sign in (("helpful", "+"), ("harmful", "\u2212")):
        for hit in getattr(generation, kind)[:rows]:
            if hit.token_scores:
                vals = list(hit.token_scores[:n]) + [float("nan")] * max(0, n - len(hit.token_scores))
                matrix.append(vals)
                labels.append(f"{sign}#{hit.rank} row {hit.row}")
    if not matrix and generation.per_token:
        by_pos = {t.position: t for t in generation.per_token}
        for kind, name in (("helpful", "best helpful"), ("harmful", "best harmful")):
            matrix.append([getattr(by_pos[j], kind)[0].score if j in by_pos and getattr(by_pos[j], kind) else float("nan")
                           for j in range(n)])
            labels.append(name)
    if not matrix or n == 0:
        raise ValueError("this result has no token-wise scores; run attribute with token_wise=True")
    data = np.asarray(matrix, dtype=np.float64)
    scale = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    scale = scale or 1.0
    cmap = LinearSegmentedColormap.from_list("rapidin", [_NEG, (1, 1, 1), _POS]).with_extremes(bad="#dddddd")
    width = min(40.0, 3.0 + 0.22 * n)
    fig = _figure(width, 1.6 + 0.32 * len(matrix))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=-scale, vmax=scale,
                      interpolation="nearest")
    step = max(1, math.ceil(n / 160))
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels([_label(generation.tokens[j]) for j in range(0, n, step)], rotation=90, fontsize=7,
                       parse_math=False)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7, parse_math=False)
    ax.set_xlabel("generated token")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="I(t_j, z)")
    ax.set_title(title or "Per-token influence of the top rows (orange raises, blue lowers the token)", fontsize=10)
    return _png(fig)


def write_plots(attribution: Attribution, out_dir: str | Path, all_scores: Sequence[Any] | None = None,
                rows: int = 5) -> list[Path]:
    """Write scores-g{N}.png (when all_scores is given) and tokens-g{N}.png per generation; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for g, gen in enumerate(attribution.generations):
        if all_scores is not None:
            path = out / f"scores-g{g}.png"
            path.write_bytes(plot_scores(all_scores[g], gen, title=f"Generation {g + 1}: scores over the cache"))
            paths.append(path)
        try:
            png = plot_token_influence(gen, rows=rows, title=f"Generation {g + 1}: per-token influence of the top rows")
        except ValueError:
            continue
        path = out / f"tokens-g{g}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths
