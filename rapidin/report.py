"""Self-contained HTML reports of an attribution, and comparisons between two attributions.

The page needs no network: CSS and JS are inline, fonts are the reader's own, and a
Content-Security-Policy forbids any fetch. It works in MLflow's artifact viewer (a sandboxed iframe
that allows scripts but no storage), so the script keeps no state outside the page.

The static part (tokens, rows, scores, training-token colouring, the default view's colouring) is
rendered here with every text HTML-escaped, so the page reads without JavaScript too; the script only
adds the interactive parts (switching views, selecting a generated token, filtering rows). The whole
result is embedded losslessly as JSON (`<script type="application/json" id="rapidin-data">`, with
`<`, `>` and `&` written as \\u escapes so no text can close the script element); training texts are
stored once per row there, so per-token lists stay small. `extract_attribution` reads it back.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .results import Attribution, GenerationResult, Hit

KINDS = ("influential", "helpful", "harmful")  # influential (|score|) first: the documented default answer
SCHEMA = "rapidin.report/1"
_TEXT_FIELDS = ("id", "prompt", "response")

# Diverging blue-orange scale (ColorBrewer PuOr/RdBu family end points): distinguishable under the
# common colour-vision deficiencies and in grey scale; negative values are also underlined (dashed).
POSITIVE_RGB = (230, 97, 1)  # orange: raises the generation's likelihood (helpful)
NEGATIVE_RGB = (33, 102, 172)  # blue: lowers it (harmful)

FOLD_CHARS = 600  # texts longer than this are folded behind a <details>
FOLD_TOKENS = 160  # token runs longer than this are folded


# ----------------------------------------------------------------------------------------------
# Embedded data


def to_payload(attribution: Attribution) -> dict[str, Any]:
    """The JSON embedded in a report: the attribution with each row's texts stored once in `texts`."""
    data = json.loads(attribution.model_dump_json())
    texts: dict[str, dict[str, str]] = {}
    for gen in data["generations"]:
        for kind in KINDS:
            for hit in gen[kind]:
                _strip_hit(hit, texts)
        for token in gen.get("per_token") or []:
            for kind in ("helpful", "harmful"):
                for hit in token[kind]:
                    _strip_hit(hit, texts)
    return {"schema": SCHEMA, "texts": texts, "attribution": data}


def _strip_hit(hit: dict, texts: dict[str, dict[str, str]]) -> None:
    entry = texts.setdefault(str(hit["row"]), {f: hit[f] for f in _TEXT_FIELDS})
    if all(entry[f] == hit[f] for f in _TEXT_FIELDS):  # else (same row, other text) keep them inline
        for f in _TEXT_FIELDS:
            del hit[f]
    for f in ("token_scores", "train_tokens", "train_token_scores"):
        if hit.get(f) is None:
            hit.pop(f, None)


def from_payload(payload: dict[str, Any]) -> Attribution:
    """Inverse of to_payload."""
    if payload.get("schema") != SCHEMA:
        raise ValueError(f"not a rapidin report payload (schema {payload.get('schema')!r}, expected {SCHEMA!r})")
    texts = payload["texts"]
    data = json.loads(json.dumps(payload["attribution"]))

    def fill(hit: dict) -> None:
        for f in _TEXT_FIELDS:
            hit.setdefault(f, texts[str(hit["row"])][f])

    for gen in data["generations"]:
        for kind in KINDS:
            for hit in gen[kind]:
                fill(hit)
        for token in gen.get("per_token") or []:
            for kind in ("helpful", "harmful"):
                for hit in token[kind]:
                    fill(hit)
    return Attribution.model_validate(data)


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: `<`, `>`, `&` (and U+2028/9) become \\u escapes."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


_DATA_RE = re.compile(r'<script type="application/json" id="rapidin-data">(.*?)</script>', re.S)


def extract_payload(page: str) -> dict[str, Any]:
    """The JSON payload embedded in a report page."""
    match = _DATA_RE.search(page)
    if match is None:
        raise ValueError("no rapidin data found in this page")
    return json.loads(match.group(1))


def extract_attribution(page: str) -> Attribution:
    """The attribution a report page was rendered from."""
    return from_payload(extract_payload(page))


# ----------------------------------------------------------------------------------------------
# Colour and formatting helpers (the page's script has the same functions)


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


# ----------------------------------------------------------------------------------------------
# Page


def render_html(attribution: Attribution, title: str | None = None, images: Mapping[str, bytes] | None = None) -> str:
    """A self-contained HTML page for one attribution (all generations).

    images: optional PNGs (caption -> bytes, e.g. from rapidin.plots) embedded as data: URIs at the end.
    """
    model = attribution.model
    name = f"{model.get('name', '?')} {model.get('version', '')}".strip()
    title = title or f"RapidIn attribution: {name}"
    parts = [_head(title), "<body>", '<header><h1>', _e(title), "</h1>", _meta(attribution), "</header>", _legend()]
    if len(attribution.generations) > 1:
        parts.append('<nav aria-label="Generations"><ul>')
        for g, gen in enumerate(attribution.generations):
            parts.append(f'<li><a href="#gen-{g}">Generation {g + 1}</a>: {_e(_preview(gen.prompt, 80))}</li>')
        parts.append("</ul></nav>")
    parts.append("<main>")
    for g, gen in enumerate(attribution.generations):
        parts.append(_generation(g, gen))
    if images:
        parts.append('<section class="plots"><h2>Plots</h2>')
        for caption, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</main>")
    parts.append(f'<script type="application/json" id="rapidin-data">{script_json(to_payload(attribution))}</script>')
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "".join(parts)


def write_report(attribution: Attribution, path: str | Path, title: str | None = None,
                 images: Mapping[str, bytes] | None = None) -> Path:
    """Write render_html to path (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(attribution, title, images), encoding="utf-8")
    return path


def load_attribution(path_or_text: str | Path) -> Attribution:
    """An Attribution from JSON text, a local path or an fsspec URL (a result JSON or a report page)."""
    text = str(path_or_text) if isinstance(path_or_text, str) and path_or_text.lstrip()[:1] in ("{", "<") else None
    if text is None:
        import fsspec

        with fsspec.open(str(path_or_text), "r", encoding="utf-8") as f:
            text = f.read()
    if text.lstrip().startswith("<"):
        return extract_attribution(text)
    return Attribution.model_validate_json(text)


def render_from_json(path_or_text: str | Path, title: str | None = None) -> str:
    """Re-render a report from a saved result (`Attribution.to_json()` text, a path or URL to it)."""
    return render_html(load_attribution(path_or_text), title)


def _head(title: str) -> str:
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>")


def _meta(att: Attribution) -> str:
    sketch = ", ".join(f"{k}={v}" for k, v in att.sketch.items())
    items = [("Model", f"{att.model.get('name', '?')} (version {att.model.get('version', '?')})"),
             ("Cache", f"{att.cache_id} at {att.cache_url}"), ("Sketch", sketch), ("Top-k", att.top_k),
             ("Rows scanned", f"{att.rows_scanned:,} ({att.bytes_scanned / 2**20:.1f} MiB)")]
    if att.timings:
        items.append(("Timings", ", ".join(f"{k} {v:.2f}s" for k, v in att.timings.items())))
    return '<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _legend() -> str:
    return ('<section class="legend" aria-label="Colour legend"><span class="lab">harmful: lowers the likelihood '
            '(blue, dashed underline)</span><span class="bar" role="img" aria-label="blue for negative, white for '
            'zero, orange for positive influence"></span><span class="lab">helpful: raises it (orange)</span>'
            '<p class="note">Each colour scale is symmetric around zero and scaled to the largest |score| it shows '
            '(printed beside it). Scores are I(t, z): the sketched gradient inner products of RapidIn. Select a '
            'generated token to see the training rows that drove it.</p></section>')


def _preview(text: str, n: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "\u2026"


def _folded_text(text: str, cls: str = "text") -> str:
    if len(text) <= FOLD_CHARS:
        return f'<div class="{cls}">{_e(text)}</div>'
    return (f'<details class="fold"><summary><span class="{cls}">{_e(text[: FOLD_CHARS // 2])}\u2026</span> '
            f'<span class="more">show all {len(text):,} characters</span></summary>'
            f'<div class="{cls}">{_e(text)}</div></details>')


def _tokens_html(tokens: Sequence[str], values: Sequence[float | None], scale: float, cls: str, extra=None) -> str:
    out = []
    for j, token in enumerate(tokens):
        value = values[j] if j < len(values) else None
        style, neg = _style(value, scale)
        attrs = extra(j) if extra else ""
        tip = _e(f"{token!r}: {fmt_score(value)}")
        out.append(f'<span class="{cls}{neg}" {style} title="{tip}"{attrs}>{_e(_token_label(token))}</span>')
    return "".join(out)


def _generation(g: int, gen: GenerationResult) -> str:
    options = view_options(gen)
    default = options[0][0] if options else ""
    values = view_values(gen, default) if default else [None] * len(gen.tokens)
    scale = _scale(values)
    p = [f'<section class="gen" id="gen-{g}" data-gen="{g}" data-view="{_e(default)}">',
         f"<h2>Generation {g + 1}</h2>",
         f'<details class="prompt"{" open" if len(gen.prompt) <= 300 else ""}><summary>Prompt</summary>',
         f'<div class="text">{_e(gen.prompt)}</div></details>']
    if gen.target_positions:
        p.append(f'<p class="note">Loss restricted to target tokens at positions {_e(gen.target_positions)} '
                 "(outlined).</p>")
    p.append('<div class="controls">')
    if options:
        p.append(f'<label>Colour generated tokens by <select class="view-select" aria-label="Colouring of the '
                 f'generated tokens for generation {g + 1}">')
        p.extend(f'<option value="{_e(v)}"{" selected" if v == default else ""}>{_e(label)}</option>' for v, label in options)
        p.append("</select></label>")
    else:
        p.append('<span class="note">No token-wise scores in this result (run attribute with token_wise=True).</span>')
    p.append(f'<span class="scale-note">scale \u00b1<span class="scale">{_e(fmt_score(scale)[1:])}</span></span></div>')
    targets = set(gen.target_positions or [])
    label = "response" if not gen.generated else "generated response"
    p.append(f'<div class="tokens" role="group" aria-label="Tokens of the {label}; select one to see the rows '
             f'that drove it">')
    p.append(_tokens_html(gen.tokens, values, scale, "tok",
                          lambda j: f' data-pos="{j}" tabindex="0" role="button"' + (' data-target="1"' if j in targets else "")))
    if not gen.tokens:
        p.append(f'<div class="text">{_e(gen.response)}</div>')
    p.append("</div>")
    p.append('<div class="token-panel" hidden aria-live="polite"></div>')
    p.append('<div class="tabs" role="tablist">')
    for i, kind in enumerate(KINDS):
        hits = getattr(gen, kind)
        p.append(f'<button type="button" role="tab" class="tab" data-kind="{kind}" aria-selected="{str(i == 0).lower()}">'
                 f"{kind.capitalize()} ({len(hits)})</button>")
    p.append('<label class="filter"><input type="checkbox" class="only-driving"> only rows that drove the selected '
             "token</label></div>")
    for i, kind in enumerate(KINDS):
        hits = getattr(gen, kind)
        p.append(f'<div class="list" data-kind="{kind}" role="tabpanel"{"" if i == 0 else " hidden"}>')
        if not hits:
            p.append('<p class="note">No rows.</p>')
        list_scale = _scale(h.score for h in hits)
        p.append("<ol class=\"hits\">")
        p.extend(_hit_html(kind, i, hit, list_scale) for i, hit in enumerate(hits))
        p.append("</ol></div>")
    p.append("</section>")
    return "".join(p)


def _hit_html(kind: str, index: int, hit: Hit, scale: float) -> str:
    style, neg = _style(hit.score, scale)
    p = [f'<li class="hit" data-kind="{kind}" data-index="{index}" data-rank="{hit.rank}" data-row="{hit.row}" '
         f'data-id="{_e(hit.id)}" data-score="{_e(repr(float(hit.score)))}">',
         '<div class="hit-head">',
         f'<span class="rank">#{hit.rank}</span>',
         f'<span class="score{neg}" {style}>{_e(fmt_score(hit.score))}</span>',
         f'<span class="where">row <b class="row">{hit.row}</b> \u00b7 id <code class="id">{_e(hit.id)}</code></span>',
         '<span class="badge" hidden></span>']
    if hit.token_scores:
        p.append(f'<button type="button" class="use-view" data-view="row:{kind}:{index}">colour generation by this row'
                 "</button>")
    p.append("</div>")
    if hit.train_tokens and hit.train_token_scores:
        tscale = _scale(hit.train_token_scores)
        tokens = _tokens_html(hit.train_tokens, hit.train_token_scores, tscale, "ttok")
        note = (f'<span class="scale-note">its own tokens I(t, z): scale \u00b1{_e(fmt_score(tscale)[1:])}</span>')
        if len(hit.train_tokens) > FOLD_TOKENS:
            head = _tokens_html(hit.train_tokens[: FOLD_TOKENS // 2], hit.train_token_scores, tscale, "ttok")
            p.append(f'<details class="fold"><summary><span class="response ttoks">{head}\u2026</span> <span class="more">'
                     f"show all {len(hit.train_tokens):,} tokens</span></summary>"
                     f'<div class="response ttoks">{tokens}</div></details>{note}')
        else:
            p.append(f'<div class="response ttoks">{tokens}</div>{note}')
    else:
        p.append(_folded_text(hit.response, "response text"))
    p.append('<details class="prompt"><summary>Training prompt</summary>')
    p.append(f'<div class="text">{_e(hit.prompt)}</div></details>')
    p.append("</li>")
    return "".join(p)


# ----------------------------------------------------------------------------------------------
# Markdown (for Prefect artifacts and terminals)


def _md(text: str) -> str:
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|").replace("`", "\\`")


def markdown_summary(attribution: Attribution, top: int = 10, links: dict[str, str] | None = None) -> str:
    """A markdown summary: per generation, the top influential, helpful and harmful rows (text escaped for tables)."""
    out = [f"# RapidIn attribution: {_md(str(attribution.model.get('name', '?')))} "
           f"{_md(str(attribution.model.get('version', '')))}", ""]
    for label, url in (links or {}).items():
        out.append(f"- [{_md(label)}]({url})")
    if links:
        out.append("")
    for g, gen in enumerate(attribution.generations):
        out += [f"## Generation {g + 1}", "", f"**Prompt:** {_md(_preview(gen.prompt, 200))}", "",
                f"**Response:** {_md(_preview(gen.response, 300))}", ""]
        for kind in KINDS:
            out += [f"### Top {kind}" + (" (|score|)" if kind == "influential" else ""), "", "| rank | score | row | id | response |", "|---:|---:|---:|---|---|"]
            out += [f"| {h.rank} | {h.score:.4g} | {h.row} | `{_md(h.id)}` | {_md(_preview(h.response, 120))} |"
                    for h in getattr(gen, kind)[:top]]
            out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Comparison of two attributions (e.g. two model versions)


def _keyed(hits: Sequence[Hit]) -> dict[tuple[str, int], Hit]:
    """Hits keyed by (id, occurrence): identical rows (same content id) are matched in rank order."""
    seen: dict[str, int] = {}
    out = {}
    for hit in hits:
        n = seen.get(hit.id, 0)
        seen[hit.id] = n + 1
        out[(hit.id, n)] = hit
    return out


def _brief(hit: Hit) -> dict[str, Any]:
    return {"id": hit.id, "row": hit.row, "rank": hit.rank, "score": hit.score, "response": hit.response}


def compare(a: Attribution, b: Attribution) -> dict[str, Any]:
    """How the top-k lists changed from a to b, per generation (matched by index) and row id.

    For each generation and kind: `entered` (in b's list, not a's), `left` (in a's, not b's), and `kept`
    with rank_a, rank_b and shift = rank_a - rank_b (positive: moved up in b). Rows are matched by
    their content id (so row numbers may differ between data versions); repeated identical rows are
    matched in rank order. JSON-serialisable.
    """
    gens = []
    for g, (ga, gb) in enumerate(zip(a.generations, b.generations, strict=False)):
        entry: dict[str, Any] = {"index": g, "prompt_a": ga.prompt, "prompt_b": gb.prompt,
                                 "response_a": ga.response, "response_b": gb.response,
                                 "same_prompt": ga.prompt == gb.prompt, "same_response": ga.response == gb.response,
                                 "kinds": {}}
        for kind in KINDS:
            ka, kb = _keyed(getattr(ga, kind)), _keyed(getattr(gb, kind))
            kept = [{"id": key[0], "row_a": ka[key].row, "row_b": kb[key].row, "rank_a": ka[key].rank,
                     "rank_b": kb[key].rank, "shift": ka[key].rank - kb[key].rank, "score_a": ka[key].score,
                     "score_b": kb[key].score, "response": kb[key].response} for key in kb if key in ka]
            kept.sort(key=lambda r: r["rank_b"])
            entered = [_brief(kb[key]) for key in kb if key not in ka]
            left = [_brief(ka[key]) for key in ka if key not in kb]
            union = len(set(ka) | set(kb))
            entry["kinds"][kind] = {"entered": entered, "left": left, "kept": kept,
                                    "overlap": len(kept), "jaccard": len(kept) / union if union else 1.0,
                                    "moved": sum(1 for r in kept if r["shift"])}
        gens.append(entry)
    side = lambda att: {"model": att.model, "cache_id": att.cache_id, "top_k": att.top_k,  # noqa: E731
                        "generations": len(att.generations)}
    return {"a": side(a), "b": side(b), "generations": gens,
            "unmatched": {"a": list(range(len(b.generations), len(a.generations))),
                          "b": list(range(len(a.generations), len(b.generations)))}}


def compare_markdown(diff: dict[str, Any], top: int = 10) -> str:
    """compare() as markdown tables."""
    name = lambda s: f"{s['model'].get('name', '?')} {s['model'].get('version', '')}".strip()  # noqa: E731
    out = [f"# Top-k changes: {_md(name(diff['a']))} \u2192 {_md(name(diff['b']))}", ""]
    for gen in diff["generations"]:
        out += [f"## Generation {gen['index'] + 1}: {_md(_preview(gen['prompt_b'], 100))}", ""]
        if not gen["same_prompt"]:
            out += ["**Prompts differ between the two runs.**", ""]
        for kind in KINDS:
            d = gen["kinds"][kind]
            out += [f"### {kind}: {d['overlap']} kept, {len(d['entered'])} entered, {len(d['left'])} left", "",
                    "| change | id | rank a | rank b | shift | response |", "|---|---|---:|---:|---:|---|"]
            rows = ([("entered", r["id"], "", r["rank"], "", r["response"]) for r in d["entered"]]
                    + [("left", r["id"], r["rank"], "", "", r["response"]) for r in d["left"]]
                    + [("kept", r["id"], r["rank_a"], r["rank_b"], f"{r['shift']:+d}", r["response"]) for r in d["kept"]])
            out += [f"| {c} | `{_md(i)}` | {ra} | {rb} | {s} | {_md(_preview(t, 80))} |" for c, i, ra, rb, s, t in rows[: 3 * top]]
            out.append("")
    for side in ("a", "b"):
        if diff["unmatched"][side]:
            out.append(f"Generations only in {side}: {diff['unmatched'][side]}")
    return "\n".join(out)


def render_compare_html(a: Attribution, b: Attribution, title: str | None = None) -> str:
    """A self-contained page showing compare(a, b): rows entering and leaving the top-k, rank shifts."""
    diff = compare(a, b)
    name = lambda s: f"{s['model'].get('name', '?')} {s['model'].get('version', '')}".strip()  # noqa: E731
    title = title or f"RapidIn: top-k changes from {name(diff['a'])} to {name(diff['b'])}"
    p = [_head(title), "<body><header><h1>", _e(title), "</h1>", '<dl class="meta">']
    for side in ("a", "b"):
        s = diff[side]
        p.append(f"<dt>{side.upper()}</dt><dd>{_e(name(s))}, cache {_e(s['cache_id'])}, top-k {s['top_k']}, "
                 f"{s['generations']} generations</dd>")
    p.append("</dl></header><main>")
    for gen in diff["generations"]:
        g = gen["index"]
        p.append(f'<section class="gen cmp" id="gen-{g}" data-gen="{g}"><h2>Generation {g + 1}</h2>')
        p.append(f'<details class="prompt" open><summary>Prompt</summary><div class="text">{_e(gen["prompt_b"])}</div>'
                 "</details>")
        if not gen["same_prompt"]:
            p.append(f'<p class="warn">The prompts differ; A had: {_e(_preview(gen["prompt_a"], 200))}</p>')
        if not gen["same_response"]:
            p.append(f'<p class="warn">The responses differ. A: {_e(_preview(gen["response_a"], 200))} \u2014 '
                     f'B: {_e(_preview(gen["response_b"], 200))}</p>')
        for kind in KINDS:
            d = gen["kinds"][kind]
            p.append(f'<h3>{kind.capitalize()}: {d["overlap"]} kept ({d["moved"]} moved), {len(d["entered"])} entered, '
                     f'{len(d["left"])} left <small>(Jaccard {d["jaccard"]:.2f})</small></h3>')
            p.append(f'<table class="cmp" data-kind="{kind}"><thead><tr><th>change</th><th>id</th><th>row A</th>'
                     "<th>row B</th><th>rank A</th><th>rank B</th><th>shift</th><th>score A</th><th>score B</th>"
                     "<th>response</th></tr></thead><tbody>")
            for r in d["entered"]:
                p.append(_cmp_row("entered", r["id"], "", r["row"], "", r["rank"], "", None, r["score"], r["response"]))
            for r in d["left"]:
                p.append(_cmp_row("left", r["id"], r["row"], "", r["rank"], "", "", r["score"], None, r["response"]))
            for r in d["kept"]:
                shift = "\u00b10" if not r["shift"] else (f"\u25b2{r['shift']}" if r["shift"] > 0 else f"\u25bc{-r['shift']}")
                p.append(_cmp_row("kept", r["id"], r["row_a"], r["row_b"], r["rank_a"], r["rank_b"], shift,
                                  r["score_a"], r["score_b"], r["response"]))
            p.append("</tbody></table>")
        p.append("</section>")
    for side in ("a", "b"):
        if diff["unmatched"][side]:
            p.append(f'<p class="warn">Generations only in {side.upper()}: {_e(diff["unmatched"][side])}</p>')
    p.append(f'</main><script type="application/json" id="rapidin-compare">{script_json(diff)}</script></body></html>')
    return "".join(p)


def _cmp_row(change, id_, row_a, row_b, rank_a, rank_b, shift, score_a, score_b, response) -> str:
    cells = [change, id_, row_a, row_b, rank_a, rank_b, shift,
             "" if score_a is None else fmt_score(score_a), "" if score_b is None else fmt_score(score_b)]
    tds = "".join(f"<td>{_e(c)}</td>" for c in cells)
    return f'<tr class="{change}">{tds}<td class="text">{_e(_preview(response, 160))}</td></tr>'


# ----------------------------------------------------------------------------------------------
# Inline assets

_CSS = """
:root{--pos:rgb(230,97,1);--neg:rgb(33,102,172);--line:#d0d4da;--muted:#5a6270;--hl:#7b2cbf}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 padding:0 1.2rem 3rem;color:#111;background:#fff}
h1{font-size:1.35rem;margin:1rem 0 .4rem}h2{font-size:1.15rem;margin:.2rem 0 .5rem}h3{font-size:1rem}
code,.tokens,.ttoks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:.1rem .8rem;margin:.3rem 0;color:var(--muted);font-size:12px}
.meta dt{font-weight:600}.meta dd{margin:0;overflow-wrap:anywhere}
.legend{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:.4rem 0;
 display:flex;flex-wrap:wrap;align-items:center;gap:.6rem;font-size:12px}
.legend .bar{display:inline-block;width:180px;height:12px;border:1px solid var(--line);
 background:linear-gradient(90deg,var(--neg),#fff,var(--pos))}
.legend .note{flex-basis:100%;margin:0;color:var(--muted)}
nav ul{margin:.4rem 0;padding-left:1.2rem}
.gen{border:1px solid var(--line);border-radius:6px;padding:.8rem 1rem;margin:1rem 0}
.text,.response{white-space:pre-wrap;overflow-wrap:anywhere}
.controls{display:flex;flex-wrap:wrap;gap:1rem;align-items:center;margin:.5rem 0}
.scale-note,.note{color:var(--muted);font-size:12px}
.tokens{line-height:1.9;padding:.5rem;border:1px solid var(--line);border-radius:4px;white-space:pre-wrap;
 overflow-wrap:anywhere;max-height:22rem;overflow:auto}
.tok{cursor:pointer;border-radius:2px;padding:1px 0;border-bottom:2px solid transparent}
.tok:hover,.tok:focus{outline:2px solid #444;outline-offset:0}
.tok.selected{outline:3px solid var(--hl);outline-offset:1px}
.tok[data-target]{box-shadow:inset 0 -3px 0 #000}
.tok.neg,.ttok.neg,.score.neg{border-bottom:2px dashed #0b2545}
.ttok{border-radius:2px;border-bottom:2px solid transparent}
.token-panel{margin:.6rem 0;padding:.6rem;border:2px solid var(--hl);border-radius:6px;background:#faf7fd}
.token-panel h3{margin:0 0 .4rem}.token-panel .cols{display:flex;flex-wrap:wrap;gap:1rem}
.token-panel .cols>div{flex:1 1 320px;min-width:0}.token-panel ol{margin:.2rem 0;padding-left:1.6rem;max-height:16rem;overflow:auto}
.token-panel li{cursor:pointer}.token-panel li:hover{text-decoration:underline}
.tabs{display:flex;flex-wrap:wrap;gap:.3rem;align-items:center;margin:.8rem 0 .3rem;border-bottom:1px solid var(--line)}
.tab{border:1px solid var(--line);border-bottom:none;background:#f3f4f6;padding:.3rem .8rem;border-radius:4px 4px 0 0;
 cursor:pointer;font:inherit}
.tab[aria-selected=true]{background:#fff;font-weight:600;border-color:#888}
.filter{margin-left:auto;font-size:12px}
ol.hits{list-style:none;padding:0;margin:0}
.hit{border:1px solid var(--line);border-radius:4px;padding:.4rem .6rem;margin:.35rem 0}
.hit.drives{border:2px solid var(--hl);background:#faf7fd}
.list.only .hit:not(.drives){display:none}
.hit-head{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;margin-bottom:.2rem}
.rank{font-weight:700;min-width:2.5rem}.score{font-family:ui-monospace,monospace;padding:0 .3rem;border-radius:3px}
.where{color:var(--muted);font-size:12px}
.badge{background:var(--hl);color:#fff;border-radius:3px;padding:0 .35rem;font-size:12px}
.use-view{font:inherit;font-size:12px;margin-left:auto;cursor:pointer}
details.fold>summary{cursor:pointer;list-style:none}details.fold[open]>summary{display:none}
details.fold>summary .more{color:var(--hl);font-size:12px;text-decoration:underline}
details.prompt>summary{cursor:pointer;color:var(--muted);font-size:12px}
table.cmp{border-collapse:collapse;width:100%;margin:.3rem 0 1rem;font-size:13px}
table.cmp th,table.cmp td{border:1px solid var(--line);padding:.2rem .4rem;text-align:left;vertical-align:top}
tr.entered td:first-child{color:var(--pos);font-weight:700}tr.left td:first-child{color:var(--neg);font-weight:700}
.warn{background:#fff4e5;border-left:4px solid var(--pos);padding:.3rem .6rem}
.plots img{max-width:100%;height:auto;border:1px solid var(--line)}figure{margin:.8rem 0}
@media print{.legend{position:static}.tokens{max-height:none}}
"""

_SCRIPT = r"""
(function(){
'use strict';
var POS=[230,97,1],NEG=[33,102,172],KINDS=['influential','helpful','harmful'];
var payload=JSON.parse(document.getElementById('rapidin-data').textContent);
var texts=payload.texts,att=payload.attribution;
function field(h,f){return h[f]!==undefined?h[f]:(texts[String(h.row)]||{})[f];}
function colour(v,s){
  if(v===null||v===undefined||!isFinite(v)||!(s>0))return['transparent','inherit'];
  var t=Math.min(1,Math.abs(v)/s),e=v>=0?POS:NEG,c=e.map(function(x){return Math.round(255+(x-255)*t);});
  return['rgb('+c.join(',')+')',t>0.6?'#fff':'#111'];
}
function fmt(v){
  if(v===null||v===undefined||!isFinite(v))return'n/a';
  var s=Number(v.toPrecision(4)),a=Math.abs(s),txt;
  if(a!==0&&(a<1e-4||a>=1e4)){txt=s.toExponential(3).replace(/\.?0+e/,'e').replace(/e([+-])(\d)$/,function(m,sg,d){return'e'+sg+'0'+d;});}
  else{txt=String(s);}
  return(s>=0?'+':'')+txt;
}
function scaleOf(vals){var m=0;vals.forEach(function(v){if(v!==null&&v!==undefined&&isFinite(v))m=Math.max(m,Math.abs(v));});return m;}
function viewValues(gen,view){
  var n=gen.tokens.length,out=new Array(n).fill(null),p=view.split(':');
  if(p[0]==='row'){var sc=gen[p[1]][+p[2]].token_scores||[];for(var j=0;j<n;j++)out[j]=j<sc.length?sc[j]:null;return out;}
  if(p[0]==='pt'){(gen.per_token||[]).forEach(function(t){var l=t[p[1]];if(t.position<n&&l.length)out[t.position]=l[0].score;});return out;}
  var kinds={'net':['helpful','harmful'],'sum':[p[1]]}[p[0]],seen={};
  kinds.forEach(function(k){gen[k].forEach(function(h){
    if(seen[h.row]||!h.token_scores)return;seen[h.row]=1;
    h.token_scores.slice(0,n).forEach(function(v,j){out[j]=(out[j]||0)+v;});});});
  return out;
}
function paint(el,v,s){
  var c=colour(v,s);el.style.background=c[0];el.style.color=c[1];
  el.classList.toggle('neg',v!==null&&isFinite(v)&&v<0&&s>0&&Math.abs(v)/s>0.05);
  el.title=JSON.stringify(el.dataset.token||el.textContent)+': '+fmt(v);
}
function driversOf(gen,pos){
  var t=(gen.per_token||[]).filter(function(x){return x.position===pos;})[0];
  if(t)return{source:'per-token top-k',helpful:t.helpful,harmful:t.harmful};
  var rows=[],seen={};
  KINDS.forEach(function(k){gen[k].forEach(function(h){if(h.token_scores&&!seen[h.row]){seen[h.row]=1;
    rows.push({row:h.row,rank:0,score:h.token_scores[pos],id:h.id,response:h.response});}});});
  var pos_=rows.filter(function(r){return r.score>0;}).sort(function(a,b){return b.score-a.score;}).slice(0,10);
  var neg_=rows.filter(function(r){return r.score<0;}).sort(function(a,b){return a.score-b.score;}).slice(0,10);
  pos_.forEach(function(r,i){r.rank=i+1;});neg_.forEach(function(r,i){r.rank=i+1;});
  return{source:'token scores of the listed rows',helpful:pos_,harmful:neg_};
}
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e;}
function setup(sec){
  var g=+sec.dataset.gen,gen=att.generations[g],toks=sec.querySelectorAll('.tok'),panel=sec.querySelector('.token-panel');
  toks.forEach(function(t,j){t.dataset.token=gen.tokens[j];});
  var sel=sec.querySelector('.view-select'),selected=null;
  function applyView(view){
    sec.dataset.view=view;if(sel&&sel.value!==view)sel.value=view;
    var vals=viewValues(gen,view),s=scaleOf(vals);
    toks.forEach(function(t,j){paint(t,vals[j],s);});
    var sn=sec.querySelector('.controls .scale');if(sn)sn.textContent=fmt(s).slice(1);
  }
  if(sel){sel.addEventListener('change',function(){applyView(sel.value);});applyView(sel.value);}
  function showTab(kind){
    sec.querySelectorAll('.tab').forEach(function(b){b.setAttribute('aria-selected',String(b.dataset.kind===kind));});
    sec.querySelectorAll('.list').forEach(function(l){l.hidden=l.dataset.kind!==kind;});
  }
  sec.querySelectorAll('.tab').forEach(function(b){b.addEventListener('click',function(){showTab(b.dataset.kind);});});
  var only=sec.querySelector('.only-driving');
  only.addEventListener('change',function(){sec.querySelectorAll('.list').forEach(function(l){l.classList.toggle('only',only.checked&&selected!==null);});});
  sec.querySelectorAll('.use-view').forEach(function(b){b.addEventListener('click',function(){applyView(b.dataset.view);
    sec.querySelector('.tokens').scrollIntoView({block:'nearest'});});});
  function clear(){
    selected=null;toks.forEach(function(t){t.classList.remove('selected');t.removeAttribute('aria-pressed');});
    sec.querySelectorAll('.hit.drives').forEach(function(h){h.classList.remove('drives');var b=h.querySelector('.badge');b.hidden=true;b.textContent='';});
    sec.querySelectorAll('.list').forEach(function(l){l.classList.remove('only');});
    panel.hidden=true;panel.textContent='';sec.dataset.selected='';
  }
  function select(pos){
    if(selected===pos){clear();return;}
    clear();selected=pos;sec.dataset.selected=String(pos);
    var t=toks[pos];t.classList.add('selected');t.setAttribute('aria-pressed','true');
    var d=driversOf(gen,pos),marks={};
    ['helpful','harmful'].forEach(function(k){d[k].forEach(function(h){(marks[h.row]=marks[h.row]||[]).push(k+' #'+h.rank+' '+fmt(h.score));});});
    sec.querySelectorAll('.hit').forEach(function(h){var m=marks[h.dataset.row];if(m){h.classList.add('drives');
      var b=h.querySelector('.badge');b.hidden=false;b.textContent='drives this token: '+m.join(', ');}});
    sec.querySelectorAll('.list').forEach(function(l){l.classList.toggle('only',only.checked);});
    panel.textContent='';
    var head=el('h3',null,'Token '+JSON.stringify(gen.tokens[pos])+' at position '+pos+': rows that drove it ('+d.source+')');
    var close=el('button','clear','clear selection');close.type='button';close.addEventListener('click',clear);
    head.appendChild(document.createTextNode(' '));head.appendChild(close);panel.appendChild(head);
    var cols=el('div','cols');
    ['helpful','harmful'].forEach(function(k){
      var col=el('div','col');col.dataset.kind=k;col.appendChild(el('strong',null,k==='helpful'?'Raised it (helpful)':'Lowered it (harmful)'));
      var ol=el('ol','drivers');
      d[k].forEach(function(h){
        var li=el('li',null);li.dataset.row=h.row;li.dataset.score=h.score;
        var sc=el('span','score',fmt(h.score)),c=colour(h.score,scaleOf(d[k].map(function(x){return x.score;})));
        sc.style.background=c[0];sc.style.color=c[1];li.appendChild(sc);
        var resp=String(field(h,'response')||'').replace(/\s+/g,' ');
        li.appendChild(document.createTextNode(' row '+h.row+' \u00b7 '+(resp.length>90?resp.slice(0,89)+'\u2026':resp)));
        li.title='id '+field(h,'id');
        li.addEventListener('click',function(){
          var card=sec.querySelector('.list:not([hidden]) .hit[data-row="'+h.row+'"]')||sec.querySelector('.hit[data-row="'+h.row+'"]');
          if(card){showTab(card.dataset.kind);card.scrollIntoView({block:'center'});}
        });
        ol.appendChild(li);
      });
      if(!d[k].length)ol.appendChild(el('li',null,'none'));
      col.appendChild(ol);cols.appendChild(col);
    });
    panel.appendChild(cols);panel.hidden=false;
  }
  toks.forEach(function(t,j){
    t.addEventListener('click',function(){select(j);});
    t.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();select(j);}
      if(e.key==='Escape')clear();
      if(e.key==='ArrowRight'&&toks[j+1])toks[j+1].focus();if(e.key==='ArrowLeft'&&toks[j-1])toks[j-1].focus();});
  });
}
document.querySelectorAll('section.gen').forEach(setup);
document.documentElement.dataset.ready='1';
})();
"""
