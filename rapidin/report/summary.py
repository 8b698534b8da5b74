"""Text views of attributions: the markdown summary (Prefect artifacts, terminals) and the comparison of two
attributions (e.g. two model versions) as data, markdown and a page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup

from ..data import instruction_of
from ..results import Attribution, Hit
from .page import _preview, page
from .payload import KINDS, script_json
from .views import _e, fmt_score


def _md(text: str) -> str:
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|").replace("`", "\\`")


def markdown_summary(attribution: Attribution, top: int = 10, links: dict[str, str] | None = None) -> str:
    """The top-k lists as markdown (Prefect artifacts, terminals): per generation the influential, helpful and harmful
    rows, each with the training row's own prompt words (its template stripped); every text escaped for tables."""
    model = attribution.model
    out = [f"# RapidIn attribution: {_md(str(model.get('name', '?')))} v{_md(str(model.get('version', '')))}", ""]
    out += [f"- [{_md(label)}]({url})" if url.startswith(("http://", "https://")) else f"- {_md(label)}: {_md(url)}"
            for label, url in (links or {}).items()]
    out += [f"- cache `{_md(attribution.cache_id)}`, {attribution.rows_scanned:,} rows scanned", ""]
    for g, gen in enumerate(attribution.generations):
        response = "Response (generated)" if gen.generated else "Response"
        out += [f"## Generation {g + 1}", "", f"**Prompt:** {_md(_preview(gen.prompt, 300))}", "",
                f"**{response}:** {_md(_preview(gen.response, 300))}", ""]
        for kind in KINDS:
            hits = getattr(gen, kind)[:top]
            if not hits:
                continue
            out += [f"### Most {kind}" + (" (|score|, the default reading)" if kind == "influential" else ""), "",
                    "| rank | score | row | id | prompt | response |", "|---:|---:|---:|---|---|---|"]
            out += [f"| {h.rank} | {h.score:.4g} | {h.row} | `{_md(h.id)}` | {_md(_preview(instruction_of(h.prompt), 80))} "
                    f"| {_md(_preview(h.response, 120))} |" for h in hits]
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
    sides = [(side.upper(), f"{name(diff[side])}, cache {diff[side]['cache_id']}, top-k {diff[side]['top_k']}, "
              f"{diff[side]['generations']} generations") for side in ("a", "b")]
    unmatched = [(side.upper(), str(diff["unmatched"][side])) for side in ("a", "b") if diff["unmatched"][side]]
    return page("compare.html", title=title, sides=sides, unmatched=unmatched, data=Markup(script_json(diff)),
                sections=[Markup(_compare_section(gen)) for gen in diff["generations"]])


def _compare_section(gen: dict[str, Any]) -> str:
    g = gen["index"]
    p = [f'<section class="gen cmp" id="gen-{g}" data-gen="{g}"><h2>Generation {g + 1}</h2>',
         f'<details class="prompt" open><summary>Prompt</summary><div class="text">{_e(gen["prompt_b"])}</div></details>']
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
    return "".join(p)


def _cmp_row(change, id_, row_a, row_b, rank_a, rank_b, shift, score_a, score_b, response) -> str:
    cells = [change, id_, row_a, row_b, rank_a, rank_b, shift,
             "" if score_a is None else fmt_score(score_a), "" if score_b is None else fmt_score(score_b)]
    tds = "".join(f"<td>{_e(c)}</td>" for c in cells)
    return f'<tr class="{change}">{tds}<td class="text">{_e(_preview(response, 160))}</td></tr>'
