"""Colours, score formatting and token views shared by the page, the plots and the page's script (same ids)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

from ..results import GenerationResult
from .payload import KINDS

# Diverging blue-orange scale (ColorBrewer PuOr/RdBu family end points): distinguishable under the
# common colour-vision deficiencies and in grey scale; negative values are also underlined (dashed).
POSITIVE_RGB = (230, 97, 1)  # orange: raises the generation's likelihood (helpful)
NEGATIVE_RGB = (33, 102, 172)  # blue: lowers it (harmful)

FOLD_CHARS = 600  # texts longer than this are folded behind a <details>
FOLD_TOKENS = 160  # token runs longer than this are folded


def colour(value: float | None, scale: float) -> tuple[str, str]:
    """(background, text colour) of value on the symmetric scale [-scale, scale]."""
    if value is None or not math.isfinite(value) or scale <= 0:
        return "transparent", "inherit"
    t = min(1.0, abs(value) / scale)
    end = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
    rgb = tuple(math.floor(255 + (c - 255) * t + 0.5) for c in end)  # as JS Math.round
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", ("#fff" if t > 0.6 else "#111")


def _style(value: float | None, scale: float) -> str:
    bg, fg = colour(value, scale)
    neg = " neg" if value is not None and math.isfinite(value) and value < 0 and scale > 0 and abs(value) / scale > 0.05 else ""
    return f'style="background:{bg};color:{fg}"', neg


def fmt_score(value: float | None) -> str:
    """A score for display: signed, 4 significant digits."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4g}"


def _scale(values: Iterable[float | None]) -> float:
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return max(finite, default=0.0)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _token_label(token: str) -> str:
    if token == "":
        return "\u2205"
    return token.replace("\r\n", "\u21b5\n").replace("\n", "\u21b5\n") if "\n" in token else token


# ----------------------------------------------------------------------------------------------
# Views of a generation's tokens (same ids as the script)


def view_options(gen: GenerationResult) -> list[tuple[str, str]]:
    """(view id, label) choices for colouring a generation's tokens, the default first."""
    options: list[tuple[str, str]] = []
    if any(h.token_scores for h in gen.helpful + gen.harmful):
        options.append(("net", "Net: sum over top helpful and harmful rows"))
        options.append(("sum:helpful", "Sum over top helpful rows"))
        options.append(("sum:harmful", "Sum over top harmful rows"))
    if gen.per_token:
        options.append(("pt:helpful", "Strongest helpful row per token"))
        options.append(("pt:harmful", "Strongest harmful row per token"))
    for kind in KINDS:
        for i, hit in enumerate(getattr(gen, kind)):
            if hit.token_scores:
                options.append((f"row:{kind}:{i}", f"{kind} #{hit.rank}: row {hit.row} ({fmt_score(hit.score)})"))
    first_row = next((o for o in options if o[0] == "row:helpful:0"), None)
    if first_row:  # default: the top helpful row's own I(t_j, z)
        options.remove(first_row)
        options.insert(0, first_row)
    return options


def view_values(gen: GenerationResult, view: str) -> list[float | None]:
    """Per generated token values of a view."""
    n = len(gen.tokens)
    if view.startswith("row:"):
        _, kind, index = view.split(":")
        scores = getattr(gen, kind)[int(index)].token_scores or []
        return [scores[j] if j < len(scores) else None for j in range(n)]
    if view.startswith("pt:"):
        kind = view.split(":")[1]
        by_pos = {t.position: t for t in gen.per_token or []}
        return [(getattr(by_pos[j], kind)[0].score if j in by_pos and getattr(by_pos[j], kind) else None) for j in range(n)]
    kinds = {"net": ("helpful", "harmful"), "sum:helpful": ("helpful",), "sum:harmful": ("harmful",)}[view]
    seen: set[int] = set()
    total: list[float | None] = [None] * n
    for kind in kinds:
        for hit in getattr(gen, kind):
            if hit.row in seen or not hit.token_scores:
                continue
            seen.add(hit.row)
            for j, v in enumerate(hit.token_scores[:n]):
                total[j] = (total[j] or 0.0) + v
    return total
