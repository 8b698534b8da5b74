"""The report's embedded data: the whole attribution as JSON inside the page, training texts stored once per row;
read back losslessly by `extract_attribution`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..results import Attribution

KINDS = ("influential", "helpful", "harmful")  # influential (|score|) first: the documented default answer
SCHEMA = "rapidin.report/1"
_TEXT_FIELDS = ("id", "prompt", "response")


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
    for f in ("token_scores", "train_tokens", "train_token_scores", "checkpoint_scores"):
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
