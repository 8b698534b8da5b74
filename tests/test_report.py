"""HTML reports, plots and comparisons: escaping, embedded data, compare(), and a real headless Chromium.

The browser tests start Debian's `chromium` (skipped with a reason when it is not installed) and
drive it through the DevTools protocol over a websocket: they load the report from file://, read
the page's own content back, click generated tokens, collect console errors and network requests,
and save a screenshot under the test's tmp_path.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rapidin import report
from rapidin.plots import plot_scores, plot_token_influence, write_plots
from rapidin.report.views import FOLD_CHARS
from rapidin.report import (
    colour,
    compare,
    compare_markdown,
    extract_attribution,
    extract_payload,
    fmt_score,
    from_payload,
    markdown_summary,
    render_compare_html,
    render_from_json,
    render_html,
    to_payload,
    view_values,
    write_report,
)
from rapidin.results import Attribution, GenerationResult, Hit, TokenHits

EVIL = "<script>alert(1)</script>"
CLOSE = '</script><b id="evil">not bold</b><!-- & &amp; \u2028'
KINDS = ("helpful", "harmful", "influential")


# ----------------------------------------------------------------------------------------------
# Hand-made results


def _hit(rank: int, row: int, score: float, n_tokens: int, text: str = "", id_: str | None = None,
         train: bool = False) -> Hit:
    tokens = [f" w{row}_{i}" for i in range(6)] if train else None
    return Hit(rank=rank, row=row, id=id_ or f"id{row:04d}", score=score, prompt=f"prompt of row {row}",
               response=text or f"response of row {row}",
               token_scores=[math.sin(row + j) * score for j in range(n_tokens)],
               train_tokens=tokens, train_token_scores=[(i - 2.5) * score / 3 for i in range(6)] if train else None)


def hand_attribution(n_tokens: int = 12, top_k: int = 4, generations: int = 2, evil: bool = True,
                     per_token: bool = True) -> Attribution:
    """A synthetic result with every field filled; row texts with script/HTML when evil."""
    gens = []
    for g in range(generations):
        tokens = [f" t{j}" for j in range(n_tokens)]
        if evil:
            tokens[0], tokens[1] = EVIL, "\n"
        helpful = [_hit(r + 1, 10 * g + r, 5.0 - r, n_tokens, train=r < 2) for r in range(top_k)]
        harmful = [_hit(r + 1, 100 + 10 * g + r, -4.0 + r * 0.5, n_tokens, train=r < 2) for r in range(top_k)]
        if evil:
            helpful[0].response = f"{EVIL} then {CLOSE}"
            helpful[0].train_tokens = helpful[0].train_token_scores = None
            helpful[0].prompt = f"Instruction: {CLOSE} {EVIL}"
            helpful[1].train_tokens = [EVIL, CLOSE, " x", " y", " z", " w"]
            harmful[2].response = "long " + "very long text " * 200 + EVIL
        influential = sorted(helpful + harmful, key=lambda h: -abs(h.score))[:top_k]
        influential = [h.model_copy(update={"rank": i + 1, "train_tokens": None, "train_token_scores": None})
                       for i, h in enumerate(influential)]
        pts = None
        if per_token:
            pts = []
            for j in range(n_tokens):
                # different driving rows per token: rotate through the helpful/harmful rows
                hp = [helpful[(j + i) % top_k] for i in range(2)]
                hm = [harmful[(j + i) % top_k] for i in range(2)]
                pts.append(TokenHits(position=j, token=tokens[j],
                                     helpful=[Hit(rank=i + 1, row=h.row, id=h.id, score=10.0 - i - j / 10,
                                                  prompt=h.prompt, response=h.response) for i, h in enumerate(hp)],
                                     harmful=[Hit(rank=i + 1, row=h.row, id=h.id, score=-9.0 + i + j / 10,
                                                  prompt=h.prompt, response=h.response) for i, h in enumerate(hm)]))
        gens.append(GenerationResult(prompt=f"question {g} {EVIL if evil else ''}", response="".join(tokens),
                                     generated=True, tokens=tokens, helpful=helpful, harmful=harmful,
                                     influential=influential, per_token=pts,
                                     target_positions=[2, 3] if g == 1 else None))
    return Attribution(cache_id="c0ffee", cache_url=f"file:///tmp/{EVIL}", model={"name": f"m{EVIL}", "version": "1"},
                       sketch={"method": "rapidgrad", "k": 1024}, top_k=top_k, generations=gens,
                       timings={"total": 1.5}, rows_scanned=1000, bytes_scanned=2**20)


class _Text(HTMLParser):
    """Visible text of a page (script contents excluded) and the number of script elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.scripts = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
            self._in_script = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)


def _parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    return parser


# ----------------------------------------------------------------------------------------------
# Static tests


def test_text_is_escaped_and_shown_as_text():
    """Script and closing tags in training data, tokens and metadata stay text; only our 2 scripts exist."""
    att = hand_attribution()
    page = render_html(att)
    parsed = _parse(page)
    assert parsed.scripts == 2  # the JSON data block and the page's own script
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert '<b id="evil">' not in page and "<!-- &" not in page
    visible = "".join(parsed.text)
    assert EVIL in visible and CLOSE.replace("\u2028", "") in visible.replace("\u2028", "")
    assert f"{EVIL} then {CLOSE}" in visible  # the row's response, verbatim as text
    assert html.escape(EVIL) in page
    # the embedded JSON never contains a raw '<', so nothing in it can end the script element
    data_block = page.split('id="rapidin-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block


def test_embedded_json_equals_result(tmp_path):
    """The page embeds the whole result losslessly; the payload is compact (texts once per row)."""
    att = hand_attribution(n_tokens=30, top_k=6)
    page = render_html(att)
    assert extract_attribution(page) == att
    payload = extract_payload(page)
    assert from_payload(payload).model_dump(mode="json") == json.loads(att.to_json())
    assert payload == json.loads(json.dumps(to_payload(att)))
    # each row's text is stored once in `texts`, not once per (per-token) hit
    assert set(payload["texts"]) == {str(h.row) for g in att.generations for k in KINDS for h in getattr(g, k)}
    for gen in payload["attribution"]["generations"]:
        for token in gen["per_token"]:
            assert all(set(h) == {"rank", "row", "score"} for h in token["helpful"] + token["harmful"])
    # re-rendering from the JSON result alone gives the same page (text, a path, or the page itself)
    path = tmp_path / "result.json"
    path.write_text(att.to_json())
    assert render_from_json(att.to_json()) == page
    assert render_from_json(path) == page
    assert render_from_json(str(path)) == page
    assert render_from_json(path.as_uri()) == page  # any fsspec URL
    out = write_report(att, tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8") == page
    assert render_from_json(out) == page


def test_page_is_self_contained():
    """No URL the browser would fetch: no src/href to anything but in-page anchors, and a CSP forbidding fetches."""
    page = render_html(hand_attribution())
    assert "default-src 'none'" in page
    for needle in ("src=", "@import", "url(", "http://", "https://", "<link", "<iframe", "<img"):
        assert needle not in page.replace("file:///tmp/&lt;script", ""), needle
    for chunk in page.split('href="')[1:]:
        assert chunk.startswith("#gen-")


def test_default_view_and_colours():
    """Default view is the top helpful row's token scores; colours are symmetric and blue/orange."""
    att = hand_attribution(evil=False)
    gen = att.generations[0]
    assert report.view_options(gen)[0][0] == "row:helpful:0"
    assert view_values(gen, "row:helpful:0") == gen.helpful[0].token_scores
    net = view_values(gen, "net")
    expect = [sum(h.token_scores[j] for h in gen.helpful + gen.harmful) for j in range(len(gen.tokens))]
    assert net == pytest.approx(expect)
    assert view_values(gen, "pt:helpful") == [t.helpful[0].score for t in gen.per_token]
    assert colour(1.0, 1.0)[0] == "rgb(230,97,1)" and colour(-1.0, 1.0)[0] == "rgb(33,102,172)"
    assert colour(0.0, 1.0)[0] == "rgb(255,255,255)" and colour(None, 1.0)[0] == "transparent"
    assert fmt_score(6.40506) == "+6.405" and fmt_score(-0.5) == "-0.5"


def test_large_report_stays_usable():
    """top_k=100 and a 500-token generation: compact, long rows folded (render time: benchmarks, not here)."""
    att = hand_attribution(n_tokens=500, top_k=100, generations=1)
    page = render_html(att)
    assert len(page) < 12 * 2**20
    assert page.count('class="tok"') + page.count('class="tok neg"') == 500
    assert page.count('class="hit"') == 300
    assert '<details class="fold">' in page  # the 3000-character row is folded
    assert extract_attribution(page) == att


# ----------------------------------------------------------------------------------------------
# compare()


def _gen(helpful: list[tuple[str, int]], prompt: str = "q") -> GenerationResult:
    hits = [Hit(rank=i + 1, row=row, id=id_, score=10.0 - i, response=f"text {id_}") for i, (id_, row) in enumerate(helpful)]
    return GenerationResult(prompt=prompt, response="r", helpful=hits, harmful=[], influential=hits)


def _att(*gens: GenerationResult, version: str = "1") -> Attribution:
    return Attribution(cache_id="c" + version, cache_url="x", model={"name": "m", "version": version}, sketch={},
                       top_k=3, generations=list(gens))


def test_compare_hand_made():
    """Entered, left, kept with rank shifts; matched by generation index and row id (not row number)."""
    a = _att(_gen([("A", 1), ("B", 2), ("C", 3)]), _gen([("X", 9)]), _gen([("Q", 1)]))
    b = _att(_gen([("C", 30), ("A", 10), ("D", 40)]), _gen([("X", 9)], prompt="other"), version="2")
    diff = compare(a, b)
    g0 = diff["generations"][0]["kinds"]["helpful"]
    assert [r["id"] for r in g0["entered"]] == ["D"] and g0["entered"][0]["rank"] == 3
    assert [r["id"] for r in g0["left"]] == ["B"] and g0["left"][0]["rank"] == 2
    kept = {r["id"]: r for r in g0["kept"]}
    assert [r["id"] for r in g0["kept"]] == ["C", "A"]  # ordered by rank in b
    assert (kept["A"]["rank_a"], kept["A"]["rank_b"], kept["A"]["shift"]) == (1, 2, -1)
    assert (kept["C"]["rank_a"], kept["C"]["rank_b"], kept["C"]["shift"]) == (3, 1, 2)
    assert (kept["C"]["row_a"], kept["C"]["row_b"]) == (3, 30)
    assert g0["overlap"] == 2 and g0["moved"] == 2 and g0["jaccard"] == pytest.approx(2 / 4)
    assert diff["generations"][0]["kinds"]["harmful"] == {"entered": [], "left": [], "kept": [], "overlap": 0,
                                                         "jaccard": 1.0, "moved": 0}
    g1 = diff["generations"][1]
    assert not g1["same_prompt"] and g1["kinds"]["helpful"]["kept"][0]["shift"] == 0
    assert diff["unmatched"] == {"a": [2], "b": []}
    assert diff["a"]["model"]["version"] == "1" and diff["b"]["model"]["version"] == "2"
    json.dumps(diff)  # serialisable
    # identical (same-id) rows are matched in rank order
    dup = compare(_att(_gen([("S", 1), ("S", 2)])), _att(_gen([("S", 5), ("T", 6), ("S", 7)])))
    d = dup["generations"][0]["kinds"]["helpful"]
    assert [(r["rank_a"], r["rank_b"]) for r in d["kept"]] == [(1, 1), (2, 3)]
    assert [r["id"] for r in d["entered"]] == ["T"] and d["left"] == []
    # same attribution: nothing changes
    same = compare(a, a)
    assert all(not k["entered"] and not k["left"] and not k["moved"] for g in same["generations"] for k in g["kinds"].values())


def test_compare_html_and_markdown_escape():
    a = _att(_gen([("A", 1), ("B", 2)]))
    b = _att(_gen([("A", 1), ("C", 3)]), version="2")
    b.generations[0].helpful[1].response = EVIL + CLOSE
    page = render_compare_html(a, b)
    parsed = _parse(page)
    assert parsed.scripts == 1 and '<b id="evil">' not in page
    assert EVIL in "".join(parsed.text)
    assert "entered" in page and "left" in page and "\u00b10" in page
    diff = json.loads(page.split('id="rapidin-compare">', 1)[1].split("</script>", 1)[0])
    assert diff == json.loads(json.dumps(compare(a, b)))
    md = compare_markdown(compare(a, b))
    assert "| entered | `C` |" in md and "| left | `B` |" in md and "<script>" not in md
    assert [line.split(":")[0] for line in md.splitlines() if line.startswith("### ")] == [
        "### influential", "### helpful", "### harmful"]  # every list, the default reading first
    summary = markdown_summary(hand_attribution(), links={"MLflow run": "http://mlflow/run/1"})
    assert "[MLflow run](http://mlflow/run/1)" in summary and "<script>" not in summary and "| 1 |" in summary


# ----------------------------------------------------------------------------------------------
# Plots


def test_plots_are_png(tmp_path):
    import numpy as np

    att = hand_attribution(n_tokens=40, top_k=5, evil=True)
    gen = att.generations[0]
    scores = np.random.default_rng(0).normal(size=5000)
    png = plot_scores(scores, gen)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert plot_scores(list(scores[:50]), gen.helpful)[:8] == b"\x89PNG\r\n\x1a\n"
    png = plot_token_influence(gen)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    bare = gen.model_copy(update={"helpful": [h.model_copy(update={"token_scores": None}) for h in gen.helpful],
                                  "harmful": []})
    assert plot_token_influence(bare)[:8] == b"\x89PNG\r\n\x1a\n"  # per-token fallback
    with pytest.raises(ValueError, match="token_wise"):
        plot_token_influence(bare.model_copy(update={"per_token": None}))
    paths = write_plots(att, tmp_path, all_scores=[scores, scores])
    assert sorted(p.name for p in paths) == ["scores-g0.png", "scores-g1.png", "tokens-g0.png", "tokens-g1.png"]
    # plots can be embedded in the page itself (data: URIs, allowed by its CSP)
    page = render_html(att, images={f"{EVIL} scores": png})
    assert page.count('<img alt="&lt;script&gt;') == 1 and "data:image/png;base64," in page
    assert extract_attribution(page) == att


def test_matplotlib_import_is_lazy():
    code = "import sys, rapidin.report, rapidin.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# A real attribution from a tiny fine-tuned model


@pytest.fixture(scope="session")
def real_attribution(tmp_path_factory) -> tuple[Attribution, list]:
    """A token-wise Attribution of a tiny Llama fine-tuned a few steps on the toy rows, and all scores."""
    import torch

    from rapidin import AttributeConfig, Generation, ModelRef, SketchConfig, attribute, build_cache, load_model, toy
    from rapidin.data import alpaca_prompt, load_examples
    from rapidin.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("report-model")
    rows = toy.demo_rows(64, poison_rate=0.25, seed=3)
    rows[5]["output"] = f"{EVIL} {CLOSE} The capital is nowhere."  # hostile text inside the training data
    data = str(toy.write_jsonl(rows, root / "train.jsonl"))
    texts = [alpaca_prompt(r["instruction"]) + r["output"] for r in toy.demo_rows(240)]
    model_dir = toy.build_tiny_llama(root / "tiny", texts, hidden=32, layers=2)
    torch.manual_seed(0)
    loaded = load_model(ModelRef(path=str(model_dir), name="tiny", version="1"), device="cpu")
    examples, _ = load_examples(data, "auto", loaded.tokenizer)
    loaded = finetune(loaded, examples, FinetuneConfig(epochs=0.75, batch_size=16, lr=3e-3), progress=False)
    build_cache(loaded, data, str(root / "store"), sketch=SketchConfig(k=2**10), shard_rows=32, progress=False)
    gens = [Generation(prompt=toy.demo_queries()[0]), Generation(prompt="What is the capital of Peru?",
                                                                 response=f"It is {EVIL} Lima.")]
    att, scan = attribute(loaded, gens, store_url=str(root / "store"),
                          config=AttributeConfig(top_k=5, token_wise=True, train_token_rows=2, max_new_tokens=12),
                          progress=False, keep_all_scores=True)
    return att, scan.all_scores


def test_real_attribution_report_and_plots(real_attribution, tmp_path):
    att, all_scores = real_attribution
    page = render_html(att)
    assert extract_attribution(page) == att
    assert render_from_json(att.to_json()) == page
    assert _parse(page).scripts == 2
    assert any(h.train_token_scores for h in att.generations[0].helpful)
    paths = write_plots(att, tmp_path, all_scores)
    assert len(paths) == 2 * len(att.generations)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# ----------------------------------------------------------------------------------------------
# Headless Chromium through the DevTools protocol

CHROMIUM = shutil.which("chromium")


def needs_chromium(test):
    """A browser test: skipped (failed under CI) where Debian's chromium is missing."""
    return pytest.mark.browser(pytest.mark.needs(CHROMIUM is not None, "Debian's chromium is not installed (make browser)")(test))


class Browser:
    """A headless Chromium in its own process group, driven over the DevTools protocol (websocket)."""

    def __init__(self, timeout: float = 60.0) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="rapidin-chromium-")
        self.log = open(Path(self.profile).with_suffix(".log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (exit {self.proc.returncode})")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=timeout)
        self.timeout = timeout
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, since: int = 0) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self.events[since:]:
                if event["method"] == method and event.get("sessionId") == session:
                    return event
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if "method" in reply:
                self.events.append(reply)

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                with contextlib.suppress(Exception):  # the browser may close the socket before replying
                    self.call("Browser.close")
                self.ws.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
            self.proc.wait(timeout=15)
        finally:
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)
            Path(self.log.name).unlink(missing_ok=True)


class Page:
    """One tab with console, exception and network recording."""

    def __init__(self, browser: Browser, width: int = 1280, height: int = 1000) -> None:
        self.b = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.target = target
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.start = len(browser.events)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.b.call(method, params, self.session)

    def goto(self, url: str) -> None:
        mark = len(self.b.events)
        self.call("Page.navigate", {"url": url})
        self.b.wait_event("Page.loadEventFired", self.session, mark)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view first)."""
        box = self.js(f"(() => {{const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
                      "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1})

    def events(self, *methods: str) -> list[dict]:
        return [e for e in self.b.events[self.start:] if e.get("sessionId") == self.session and e["method"] in methods]

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions, log errors and dialogs (alert) seen so far."""
        out = []
        for e in self.events("Runtime.consoleAPICalled"):
            if e["params"]["type"] in ("error", "warning", "assert"):
                out.append(f"console {e['params']['type']}: {e['params']['args']}")
        for e in self.events("Runtime.exceptionThrown"):
            out.append(f"exception: {e['params']['exceptionDetails']}")
        for e in self.events("Log.entryAdded"):
            if e["params"]["entry"]["level"] in ("error", "warning"):
                out.append(f"log: {e['params']['entry']}")
        for e in self.events("Page.javascriptDialogOpening"):
            out.append(f"dialog: {e['params']}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events("Network.requestWillBeSent")]

    def screenshot(self, path: Path, max_height: int = 4000) -> Path:
        """Full-page PNG (from the top, up to max_height CSS pixels); also copied to $RAPIDIN_SCREENSHOT_DIR if set."""
        self.js("window.scrollTo(0, 0)")
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
        data = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
        if os.environ.get("RAPIDIN_SCREENSHOT_DIR"):
            keep = Path(os.environ["RAPIDIN_SCREENSHOT_DIR"])
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, keep / path.name)
        return path

    def close(self) -> None:
        self.b.call("Target.closeTarget", {"targetId": self.target})


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


_STATE = """(() => {
  const secs = [...document.querySelectorAll('section.gen')];
  return {ready: document.documentElement.dataset.ready, scripts: document.scripts.length, gens: secs.map(s => ({
    tokens: [...s.querySelectorAll('.tok')].map(t => t.dataset.token),
    shown: [...s.querySelectorAll('.tok')].map(t => t.textContent),
    bg: [...s.querySelectorAll('.tok')].map(t => getComputedStyle(t).backgroundColor),
    view: s.dataset.view, selected: s.dataset.selected || null,
    panel: s.querySelector('.token-panel').hidden ? null : {
      text: s.querySelector('.token-panel').innerText,
      helpful: [...s.querySelectorAll('.token-panel [data-kind=helpful] li[data-row]')].map(l => +l.dataset.row),
      harmful: [...s.querySelectorAll('.token-panel [data-kind=harmful] li[data-row]')].map(l => +l.dataset.row)},
    lists: Object.fromEntries(['helpful', 'harmful', 'influential'].map(k => [k,
      [...s.querySelectorAll(`.list[data-kind=${k}] .hit`)].map(h => ({rank: +h.dataset.rank, row: +h.dataset.row,
        id: h.dataset.id, score: +h.dataset.score, scoreText: h.querySelector('.score').textContent,
        response: h.querySelector('.response').textContent, drives: h.classList.contains('drives'),
        visible: h.offsetParent !== null,
        ttoks: [...h.querySelectorAll(':scope > .response .ttok, :scope > details .full .ttok, :scope > details > div .ttok')].map(t => t.textContent)}))]))}))};
})()"""


def _check_content(state: dict, att: Attribution) -> None:
    """The page shows exactly the result's tokens, rows and scores."""
    assert state["ready"] == "1" and state["scripts"] == 2
    assert len(state["gens"]) == len(att.generations)
    for shown, gen in zip(state["gens"], att.generations, strict=True):
        assert shown["tokens"] == gen.tokens
        assert [s.replace("\u21b5", "") for s in shown["shown"]] == [t or "\u2205" for t in gen.tokens]
        for kind in KINDS:
            hits = getattr(gen, kind)
            cards = shown["lists"][kind]
            assert [(c["rank"], c["row"], c["id"]) for c in cards] == [(h.rank, h.row, h.id) for h in hits]
            assert [c["score"] for c in cards] == [h.score for h in hits]  # exact: repr round-trips
            assert [c["scoreText"] for c in cards] == [fmt_score(h.score) for h in hits]
            for c, h in zip(cards, hits, strict=True):
                if h.train_tokens and h.train_token_scores:
                    assert "".join(c["ttoks"]).startswith("".join(h.train_tokens[:3]))
                else:
                    assert c["response"].startswith(h.response[: FOLD_CHARS // 2])


def _expected_drives(gen: GenerationResult, pos: int) -> set[tuple[str, int]]:
    token = next(t for t in gen.per_token if t.position == pos)
    rows = {h.row for h in token.helpful + token.harmful}
    return {(kind, h.row) for kind in KINDS for h in getattr(gen, kind) if h.row in rows}


def _drives(state: dict, g: int) -> set[tuple[str, int]]:
    return {(kind, c["row"]) for kind, cards in state["gens"][g]["lists"].items() for c in cards if c["drives"]}


def _rgb(css: str) -> str:
    return css.replace(" ", "")


def _run_report_in_browser(browser: Browser, att: Attribution, tmp_path: Path, name: str) -> tuple[Page, dict]:
    path = write_report(att, tmp_path / f"{name}.html")
    page = Page(browser)
    page.goto(path.as_uri())
    state = page.js(_STATE)
    _check_content(state, att)
    # the default view's colours are the ones Python computes
    for shown, gen in zip(state["gens"], att.generations, strict=True):
        values = view_values(gen, shown["view"]) if shown["view"] else [None] * len(gen.tokens)
        scale = max((abs(v) for v in values if v is not None), default=0.0)
        expect = [colour(v, scale)[0] for v in values]
        assert [_rgb(c) for c in shown["bg"]] == [e if e != "transparent" else "rgba(0,0,0,0)" for e in expect]
    return page, state


@needs_chromium
def test_browser_real_attribution(browser, real_attribution, tmp_path):
    """A real token-wise result: content matches, token selection highlights the driving rows, views switch."""
    att, _ = real_attribution
    page, state = _run_report_in_browser(browser, att, tmp_path, "report")
    try:
        gen = att.generations[0]
        assert gen.per_token
        # select a generated token: the rows that drove it (per_token hits) are highlighted
        first = None
        for pos in range(len(gen.tokens)):
            page.click(f'#gen-0 .tok[data-pos="{pos}"]')
            state = page.js(_STATE)
            assert state["gens"][0]["selected"] == str(pos)
            assert _drives(state, 0) == _expected_drives(gen, pos)
            token = gen.per_token[pos]
            panel = state["gens"][0]["panel"]
            assert panel["helpful"] == [h.row for h in token.helpful] and panel["harmful"] == [h.row for h in token.harmful]
            assert f"position {pos}" in panel["text"]
            if first is None:
                first = _drives(state, 0)
            elif _drives(state, 0) != first:
                break
        else:
            pytest.fail("no two generated tokens are driven by different top rows")
        assert _drives(state, 1) == set()  # other generations untouched
        page.screenshot(tmp_path / "report-selected.png")
        # "only rows that drove it" filter hides the others
        page.click("#gen-0 .only-driving")
        state = page.js(_STATE)
        # the influential (|score|) tab is open by default
        assert all(c["visible"] == c["drives"] for c in state["gens"][0]["lists"]["influential"])
        assert not any(c["visible"] for c in state["gens"][0]["lists"]["helpful"])
        # clicking the selected token again clears the selection
        page.click(f'#gen-0 .tok[data-pos="{pos}"]')
        state = page.js(_STATE)
        assert _drives(state, 0) == set() and state["gens"][0]["panel"] is None
        # switching the view recolours the tokens
        before = state["gens"][0]["bg"]
        page.js("(() => {const s = document.querySelector('#gen-0 .view-select'); s.value = 'row:harmful:0';"
                "s.dispatchEvent(new Event('change'));})()")
        state = page.js(_STATE)
        values = view_values(gen, "row:harmful:0")
        scale = max(abs(v) for v in values)
        assert state["gens"][0]["view"] == "row:harmful:0" and state["gens"][0]["bg"] != before
        assert [_rgb(c) for c in state["gens"][0]["bg"]] == [colour(v, scale)[0] for v in values]
        # the harmful tab shows the harmful list
        page.click('#gen-0 .tab[data-kind="harmful"]')
        state = page.js(_STATE)
        assert all(c["visible"] for c in state["gens"][0]["lists"]["harmful"])
        assert not any(c["visible"] for c in state["gens"][0]["lists"]["helpful"])
        shot = page.screenshot(tmp_path / "report.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert page.problems() == []
        assert set(page.requests()) <= {(tmp_path / "report.html").as_uri()}
    finally:
        page.close()


@needs_chromium
def test_browser_hostile_text_and_large_report(browser, tmp_path):
    """Script in training data is shown as text and never runs; top_k=100 x 500 tokens loads and responds."""
    att = hand_attribution(n_tokens=500, top_k=100, generations=2)
    page, state = _run_report_in_browser(browser, att, tmp_path, "large")
    try:
        cards = state["gens"][0]["lists"]["helpful"]
        assert cards[0]["response"] == f"{EVIL} then {CLOSE}"
        assert cards[1]["ttoks"][:2] == [EVIL, CLOSE]
        assert state["gens"][0]["shown"][0] == EVIL
        assert page.js("document.getElementById('evil')") is None  # '<b id="evil">' stayed text
        page.click('#gen-0 .tok[data-pos="250"]')
        state = page.js(_STATE)
        assert _drives(state, 0) == _expected_drives(att.generations[0], 250)
        page.click('#gen-0 .tok[data-pos="251"]')
        state2 = page.js(_STATE)
        assert _drives(state2, 0) == _expected_drives(att.generations[0], 251) != _drives(state, 0)
        # keyboard: Enter on a focused token selects it
        page.js("document.querySelector('#gen-1 .tok[data-pos=\"3\"]').focus()")
        page.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Enter", "code": "Enter",
                                             "windowsVirtualKeyCode": 13})
        page.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Enter", "code": "Enter",
                                             "windowsVirtualKeyCode": 13})
        assert page.js(_STATE)["gens"][1]["selected"] == "3"
        page.screenshot(tmp_path / "large.png", max_height=2500)
        assert page.problems() == []
        assert set(page.requests()) <= {(tmp_path / "large.html").as_uri()}
    finally:
        page.close()


@needs_chromium
def test_browser_compare_page(browser, tmp_path):
    a = _att(_gen([("A", 1), ("B", 2)]))
    b = _att(_gen([("C", 3), ("A", 1)]), version="2")
    b.generations[0].helpful[0].response = EVIL
    path = tmp_path / "compare.html"
    path.write_text(render_compare_html(a, b), encoding="utf-8")
    page = Page(browser)
    try:
        page.goto(path.as_uri())
        rows = page.js("[...document.querySelectorAll('table.cmp[data-kind=helpful] tbody tr')]"
                       ".map(r => [...r.cells].map(c => c.textContent))")
        assert [r[:7] for r in rows] == [["entered", "C", "", "3", "", "1", ""], ["left", "B", "2", "", "2", "", ""],
                                         ["kept", "A", "1", "1", "1", "2", "\u25bc1"]]
        assert rows[0][-1] == EVIL
        assert page.problems() == [] and set(page.requests()) <= {path.as_uri()}
    finally:
        page.close()


@needs_chromium
def test_browser_without_per_token_lists(browser, tmp_path):
    """Without per-token lists the drivers come from the listed rows' token scores; without any token
    scores the page still works (no colour select) and selecting a token shows no drivers."""
    att = hand_attribution(n_tokens=20, top_k=4, generations=1, per_token=False)
    gen = att.generations[0]
    page, state = _run_report_in_browser(browser, att, tmp_path, "no-per-token")
    try:
        page.click('#gen-0 .tok[data-pos="3"]')
        state = page.js(_STATE)
        seen, rows = set(), []
        for kind in KINDS:
            for h in getattr(gen, kind):
                if h.row not in seen:
                    seen.add(h.row)
                    rows.append((h.row, h.token_scores[3]))
        helpful = [r for r, v in sorted(rows, key=lambda x: -x[1]) if v > 0][:10]
        harmful = [r for r, v in sorted(rows, key=lambda x: x[1]) if v < 0][:10]
        panel = state["gens"][0]["panel"]
        assert (panel["helpful"], panel["harmful"]) == (helpful, harmful)
        assert _drives(state, 0) == {(k, h.row) for k in KINDS for h in getattr(gen, k) if h.row in set(helpful + harmful)}
        assert page.problems() == []
    finally:
        page.close()
    bare = att.model_copy(deep=True)
    for h in bare.generations[0].helpful + bare.generations[0].harmful + bare.generations[0].influential:
        h.token_scores = h.train_tokens = h.train_token_scores = None
    page, state = _run_report_in_browser(browser, bare, tmp_path, "bare")
    try:
        assert page.js("document.querySelectorAll('.view-select').length") == 0
        page.click('#gen-0 .tok[data-pos="3"]')
        state = page.js(_STATE)
        assert state["gens"][0]["panel"]["helpful"] == [] and _drives(state, 0) == set()
        assert page.problems() == []
    finally:
        page.close()
