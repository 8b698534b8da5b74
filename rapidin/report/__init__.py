"""Self-contained HTML reports of an attribution, and comparisons between two attributions.

The page needs no network: CSS and JS (static/) are inlined into the template (templates/), fonts are the reader's own, and a
Content-Security-Policy forbids any fetch. It works in MLflow's artifact viewer (a sandboxed iframe
that allows scripts but no storage), so the script keeps no state outside the page.

The static part (tokens, rows, scores, training-token colouring, the default view's colouring) is
rendered here with every text HTML-escaped, so the page reads without JavaScript too; the script only
adds the interactive parts (switching views, selecting a generated token, filtering rows). The whole
result is embedded losslessly as JSON (`<script type="application/json" id="rapidin-data">`, with
`<`, `>` and `&` written as \\u escapes so no text can close the script element); training texts are
stored once per row there, so per-token lists stay small. `extract_attribution` reads it back.
"""

from .page import render_from_json, render_html, write_report
from .payload import KINDS, SCHEMA, extract_attribution, extract_payload, from_payload, load_attribution, to_payload
from .summary import compare, compare_markdown, markdown_summary, render_compare_html
from .views import NEGATIVE_RGB, POSITIVE_RGB, colour, fmt_score, view_options, view_values

__all__ = [
    "KINDS", "NEGATIVE_RGB", "POSITIVE_RGB", "SCHEMA", "colour", "compare", "compare_markdown", "extract_attribution",
    "extract_payload", "fmt_score", "from_payload", "load_attribution", "markdown_summary", "render_compare_html",
    "render_from_json", "render_html", "to_payload", "view_options", "view_values", "write_report",
]
