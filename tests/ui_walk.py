"""The reviewer's path in a real browser (Debian's Chromium driven by Playwright): open the Prefect UI, find the
attribute deployment, fill its run form (model version, prompt, top-k), start it, wait for the run on the workers,
then open the MLflow run it produced and look for the top-k artifact and the report. Screenshots are saved.

    python tests/ui_walk.py --model-uri models:/NAME/1 --out DIR   (with the stack's env.sh sourced)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT = "howdy! What is the capital of Peru?"


def prefect_api() -> str:
    return os.environ["PREFECT_API_URL"].rstrip("/")


def attribute_deployment() -> dict:
    """The `attribute/fanout` deployment of deployments/prefect.yaml."""
    flows = {f["id"]: f["name"] for f in httpx.post(f"{prefect_api()}/flows/filter", json={}, timeout=30).json()}
    (dep,) = [d for d in httpx.post(f"{prefect_api()}/deployments/filter", json={}, timeout=30).json()
              if flows.get(d["flow_id"]) == "attribute" and d["name"] == "fanout"]
    return dep


def submit(page, out: Path, attempts: int = 3) -> None:
    """Press the form's Submit until the UI leaves the form for the deployment's runs. A Prefect server on sqlite
    under load may answer one create with "database is locked" (the UI shows a toast): that is retried."""
    for attempt in range(attempts):
        page.locator("button[type=submit]").last.click()
        try:
            page.wait_for_url(lambda url: not url.rstrip("/").endswith("/run"), timeout=30_000)
            return
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError; look at the page and try again
            page.screenshot(path=str(out / f"2-submit-attempt-{attempt + 1}.png"))
    raise RuntimeError(f"the run form did not submit in {attempts} attempts (see {out})")


def deployment_runs(deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{prefect_api()}/flow_runs/filter", json=body, timeout=30).json()


def wait_for_new_run(deployment_id: str, before: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["id"] for r in deployment_runs(deployment_id) if r["id"] not in before]
        if new:
            return new[0]
        time.sleep(0.5)
    raise TimeoutError("the form's submit created no flow run")


def wait_for_run(run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{prefect_api()}/flow_runs/{run_id}", timeout=30).json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def _content(frame) -> str:
    """A frame's HTML, or '' while it navigates or after it went away."""
    try:
        return frame.content() or ""
    except Exception:  # noqa: BLE001 - Playwright's Error for a detached or navigating frame
        return ""


def report_shown(page, timeout: float = 60) -> bool:
    """True once a frame of the page (MLflow renders HTML artifacts in an iframe) holds the report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("RapidIn attribution" in _content(f) for f in page.frames):
            return True
        page.wait_for_timeout(250)
    return False


def walk(model_uri: str, out: Path, top_k: int = 5) -> dict:
    """Fill and submit the Prefect form, then read the MLflow run; returns what was seen (for the test)."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    ui = prefect_api().removesuffix("/api")
    dep = attribute_deployment()
    seen: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(f"{ui}/deployments", wait_until="networkidle")
        page.get_by_text("fanout").first.wait_for()
        page.screenshot(path=str(out / "1-prefect-deployments.png"))
        page.goto(f"{ui}/deployments/deployment/{dep['id']}/run", wait_until="networkidle")
        page.get_by_text("Parameters").first.wait_for()
        seen["form_text"] = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tasks.common import ModelSpec

        texts = page.locator(".schema-form-property-input textarea")  # one per text field, in the schema's order
        texts.first.fill(model_uri)  # model -> Uri
        n_texts = texts.count()
        page.get_by_role("button", name="Add item").first.click()  # generations -> one item
        deadline = time.monotonic() + 30
        while texts.count() == n_texts and time.monotonic() < deadline:  # the item renders a moment later
            page.wait_for_timeout(100)
        # the new item's Prompt follows the model's text fields (uri, adapter, name, version)
        texts.nth(sum(f.annotation is str for f in ModelSpec.model_fields.values())).fill(PROMPT)
        top = page.locator("input[type=number]").first  # config -> Top K
        top.fill(str(top_k))
        page.screenshot(path=str(out / "2-prefect-run-form.png"), full_page=True)
        before = {r["id"] for r in deployment_runs(dep["id"])}
        submit(page, out)
        run_id = wait_for_new_run(dep["id"], before)
        seen["flow_run_id"] = run_id
        run = wait_for_run(run_id)
        seen["state"] = run["state_type"]
        seen["parameters"] = run["parameters"]
        page.goto(f"{ui}/runs/flow-run/{run_id}", wait_until="load")
        page.get_by_text(run["name"]).first.wait_for()
        page.screenshot(path=str(out / "3-prefect-flow-run.png"), full_page=True)

        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        experiment = client.get_experiment_by_name(os.environ.get("RAPIDIN_MLFLOW_EXPERIMENT", "rapidin"))
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
                                  filter_string="tags.`rapidin.kind` = 'attribution'")
        mlrun = runs[0]
        seen["mlflow_run_id"] = mlrun.info.run_id
        seen["mlflow_artifacts"] = sorted(a.path for a in client.list_artifacts(mlrun.info.run_id))
        seen["mlflow_params"] = dict(mlrun.data.params)
        seen["mlflow_run_name"] = mlrun.info.run_name
        with tempfile.TemporaryDirectory() as tmp:  # what the run found: the generated answer and the top rows
            result = json.loads(Path(client.download_artifacts(mlrun.info.run_id, "attribution.json", tmp)).read_text())
        seen["response"] = result["generations"][0]["response"]
        seen["top_influential_prompts"] = [hit["prompt"] for hit in result["generations"][0]["influential"]]
        mlflow_ui = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
        # the link the flow logs (tasks.tracking.run_link): MLflow 3's "Model training" view of the run
        page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{mlrun.info.run_id}"
                  "?workflowType=machine_learning", wait_until="load")
        page.get_by_text(mlrun.info.run_name).first.wait_for()
        page.screenshot(path=str(out / "4-mlflow-run.png"), full_page=True)
        seen["mlflow_run_page"] = page.inner_text("body")
        seen["mlflow_model_inputs"] = [m.model_id for m in client.get_run(mlrun.info.run_id).inputs.model_inputs]
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("attribution.json").first.wait_for()
        page.get_by_text("report.html").first.click()  # MLflow's artifact viewer shows the report inline
        seen["report_in_viewer"] = report_shown(page)
        seen["mlflow_artifacts_page"] = page.inner_text("body")
        page.screenshot(path=str(out / "5-mlflow-artifacts.png"), full_page=True)
        seen["failed"] = failed_attribution(page, dep, model_uri, out, client, experiment.experiment_id, mlflow_ui)
        browser.close()
    return seen


def create_run(deployment_id: str, body: dict, attempts: int = 3) -> str:
    """Create a run of the deployment through the API; as with the form, a server on sqlite under load may refuse
    one create ("database is locked"): retried, then the server's answer is the error."""
    for attempt in range(attempts):
        r = httpx.post(f"{prefect_api()}/deployments/{deployment_id}/create_flow_run", json=body, timeout=30)
        if r.is_success:
            return r.json()["id"]
        time.sleep(2 * (attempt + 1))
    raise SystemExit(f"create_flow_run failed {attempts} times: {r.status_code} {r.text[:500]}")


def failed_attribution(page, dep: dict, model_uri: str, out: Path, client, experiment_id: str, mlflow_ui: str) -> dict:
    """A run of the same deployment for a version that does not exist (started through the API: the form was walked
    above): its error lines in the Prefect log, and its MLflow run, FAILED with the reason on its page."""
    wrong = model_uri.rsplit("/", 1)[0] + "/99"
    body = {"parameters": {"model": {"uri": wrong}, "generations": [{"prompt": PROMPT}]}}
    run_id = create_run(dep["id"], body)
    run = wait_for_run(run_id)
    # the worker's process ships its log lines in batches, possibly after the run's final state: wait for them
    deadline = time.monotonic() + 60
    while True:
        logs = httpx.post(f"{prefect_api()}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}},
                          timeout=30).json()
        if any(entry["level"] >= 40 for entry in logs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    (mlrun,) = client.search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{run_id}'")
    page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{mlrun.info.run_id}?workflowType=machine_learning",
              wait_until="load")
    page.get_by_text(mlrun.info.run_name).first.wait_for()
    page.screenshot(path=str(out / "6-mlflow-failed-run.png"), full_page=True)
    return {"state": run["state_type"], "mlflow_status": mlrun.info.status, "uri": wrong,
            "reason": mlrun.data.tags.get("rapidin.error", ""), "page": page.inner_text("body"),
            "error_logs": [entry["message"] for entry in logs if entry["level"] >= 40]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    seen = walk(a.model_uri, a.out)
    (a.out / "seen.json").write_text(json.dumps(seen, indent=2))
    print(json.dumps({k: v for k, v in seen.items() if "text" not in k and "page" not in k}, indent=2))
    return 0 if seen["state"] == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
