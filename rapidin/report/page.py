"""The attribution page: a Jinja template (templates/report.html) around the generation sections rendered here,
with the stylesheet and script from static/ inlined, so the page needs no network."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from ..results import Attribution, GenerationResult, Hit
from .payload import KINDS, load_attribution, script_json, to_payload
from .views import FOLD_CHARS, FOLD_TOKENS, _e, _scale, _style, _token_label, fmt_score, view_options, view_values


@cache
def _env() -> Environment:
    return Environment(loader=PackageLoader("rapidin.report", "templates"), autoescape=select_autoescape(default=True))


@cache
def static(name: str) -> Markup:
    """A file of static/ (trusted: it ships with the package), to inline into a page."""
    return Markup(resources.files("rapidin.report").joinpath("static", name).read_text(encoding="utf-8"))


def page(template: str, **context) -> str:
    """Render one of templates/ with the stylesheet inlined; `context` strings are escaped unless Markup."""
    return _env().get_template(template).render(css=static("report.css"), **context)


def render_html(attribution: Attribution, title: str | None = None, images: Mapping[str, bytes] | None = None) -> str:
    """A self-contained HTML page for one attribution (all generations).

    images: optional PNGs (caption -> bytes, e.g. from rapidin.plots) embedded as data: URIs at the end.
    """
    model = attribution.model
    title = title or f"RapidIn attribution: {model.get('name', '?')} {model.get('version', '')}".strip()
    return page(
        "report.html", title=title, meta=_meta(attribution),
        nav=[_preview(gen.prompt, 80) for gen in attribution.generations],
        sections=[Markup(_generation(g, gen, _checkpoint_labels(attribution)))
                  for g, gen in enumerate(attribution.generations)],
        images=[(caption, base64.b64encode(png).decode("ascii")) for caption, png in (images or {}).items()],
        data=Markup(script_json(to_payload(attribution))), script=static("report.js"))


def _meta(att: Attribution) -> list[tuple[str, str]]:
    sketch = ", ".join(f"{k}={v}" for k, v in att.sketch.items())
    items = [("Model", f"{att.model.get('name', '?')} (version {att.model.get('version', '?')})"),
             ("Cache", f"{att.cache_id} at {att.cache_url}"), ("Sketch", sketch), ("Top-k", str(att.top_k)),
             ("Rows scanned", f"{att.rows_scanned:,} ({att.bytes_scanned / 2**20:.1f} MiB)")]
    if att.checkpoints:
        items.append(("Checkpoints (TracIn)", ", ".join(f"{c['label']} (weight {c['weight']:g}, cache {c['cache_id']})"
                                                        for c in att.checkpoints)))
    if att.preconditioner != "none":
        items.append(("Preconditioner", att.preconditioner))
    if att.timings:
        items.append(("Timings", ", ".join(f"{k} {v:.2f}s" for k, v in att.timings.items())))
    return items


def write_report(attribution: Attribution, path: str | Path, title: str | None = None,
                 images: Mapping[str, bytes] | None = None) -> Path:
    """Write render_html to path (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(attribution, title, images), encoding="utf-8")
    return path


def render_from_json(path_or_text: str | Path, title: str | None = None) -> str:
    """Re-render a report from a saved result (`Attribution.to_json()` text, a path or URL to it)."""
    return render_html(load_attribution(path_or_text), title)


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


def _checkpoint_labels(att: Attribution) -> list[str]:
    return [c["label"] for c in att.checkpoints or []]


def _generation(g: int, gen: GenerationResult, checkpoints: Sequence[str] = ()) -> str:
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
        p.extend(_hit_html(kind, i, hit, list_scale, checkpoints) for i, hit in enumerate(hits))
        p.append("</ol></div>")
    p.append("</section>")
    return "".join(p)


def _hit_html(kind: str, index: int, hit: Hit, scale: float, checkpoints: Sequence[str] = ()) -> str:
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
    if hit.checkpoint_scores:
        parts = " \u00b7 ".join(f"{_e(label)} {_e(fmt_score(v))}" for label, v in zip(checkpoints, hit.checkpoint_scores))
        p.append(f'<div class="note checkpoints">per checkpoint: {parts}</div>')
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
