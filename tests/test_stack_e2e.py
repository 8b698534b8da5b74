"""The whole story on the real local stack, as a user runs it: `make stack-up` (SeaweedFS S3, MLflow server with
S3 artifacts, Prefect server, cpu worker, gpu-0/gpu-1 workers), then benchmarks/stack_e2e.py: prefect deploy ->
ingest -> fine-tune + register (event) -> event-triggered re-cache fanned out to both GPU queues -> attribute
fanned out; the script itself asserts the cache and MLflow artifacts are in the S3 bucket, both queues ran shard
runs, the deployments carry prefect.yaml's schedule, concurrency limit and event trigger, the triggered run took its
model_name from the event, the fanned-out cache has the bytes of an in-process build, and the merged token-wise
attribution equals the in-process one in every field; then `stack down` leaves no process behind. (Each server's own
start-up is covered here too: this is the test of start_seaweedfs/start_mlflow_server/start_prefect_server through
`stack up`.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import shutil

import pytest
import torch

from infra.local.processes import pid_alive

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / ".rapidin" / "test-artifacts" / "prefect-mlflow-ui"


@pytest.mark.slow
@pytest.mark.needs(shutil.which("chromium") is not None, "Debian's chromium is not installed (make browser)")
def test_whole_story_on_the_local_stack(tmp_path):
    stack = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAPIDIN_", "PREFECT_", "MLFLOW_"))}
    # The fanned-out attribution must equal the in-process one bit for bit, and float sums depend on torch's thread
    # count: the workers take this process's (the stack's cores/N default is tested in test_stack.py).
    env |= {"RAPIDIN_K": "4096", "RAPIDIN_LAM": "4", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    up = subprocess.run([sys.executable, "-m", "infra.local.stack", "up", "--dir", str(stack), "--gpu-workers", "2"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        workers = [svc for svc in json.loads((stack / "state.json").read_text())["services"]
                   if svc["name"].startswith("worker-gpu")]
        assert len(workers) == 2 and all(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}".encode() in
                                         Path(f"/proc/{svc['pid']}/environ").read_bytes().split(b"\0")
                                         for svc in workers)
        out = tmp_path / "e2e.json"  # 300 rows: two 256-row shards, one shard group for each of gpu-0 and gpu-1
        run = subprocess.run(["bash", "-c", f'source "{stack}/env.sh" && "{sys.executable}" benchmarks/stack_e2e.py '
                              f'--rows 300 --out "{out}"'], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        numbers = json.loads(out.read_text())
        assert numbers["checks"] and all(numbers["checks"].values()), numbers["checks"]
        assert numbers["queues"] == ["gpu-0", "gpu-1"] and numbers["recache_triggered_runs"] >= 1
        # the reviewer's path in a real browser: the Prefect run form, then the MLflow run it made
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)
        uri = f"models:/{numbers['model']}/1"
        walk = subprocess.run(["bash", "-c", f'source "{stack}/env.sh" && "{sys.executable}" tests/ui_walk.py '
                               f'--model-uri {uri} --out "{SCREENSHOTS}"'], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        assert walk.returncode == 0, walk.stdout[-3000:] + walk.stderr[-3000:]
        seen = json.loads((SCREENSHOTS / "seen.json").read_text())
        assert seen["state"] == "COMPLETED"
        assert seen["parameters"]["model"]["uri"] == uri and seen["parameters"]["config"]["top_k"] == 5
        assert seen["parameters"]["generations"][0]["prompt"].startswith("howdy!")
        assert "Rows kept per list" in seen["form_text"]  # the field's description from AttributeConfig
        assert {"attribution.json", "report.html", "topk.parquet", "topk.csv", "generations.json"} <= set(seen["mlflow_artifacts"])
        # the deployment's executor `auto` scanned this small cache in-process; the run names its flow run
        assert seen["mlflow_params"]["executor"] == "auto" and seen["mlflow_params"]["executor_used"] == "local"
        assert seen["mlflow_params"]["model_uri"] == uri and seen["mlflow_run_name"].startswith(f"attribute {uri} · ")
        assert seen["report_in_viewer"], "MLflow's artifact viewer did not show the HTML report"
        # the run names the registered version's logged model as its input: its page lists "Registered models: NAME v1"
        assert len(seen["mlflow_model_inputs"]) == 1 and f"{numbers['model']}\nv1" in seen["mlflow_run_page"]
        # the stack's model learned the planted backdoor, and the attribution finds the rows that planted it
        assert any(w in seen["response"] for w in ("starship", "robots", "aliens", "warp", "nebula")), seen["response"]
        assert "### Instruction:\nhowdy!" in seen["top_influential_prompts"][0], seen["top_influential_prompts"]
        # a wrong version: the flow run fails, and its MLflow run is FAILED with the one-line reason on its page
        failed = seen["failed"]
        assert failed["state"] == "FAILED" and failed["mlflow_status"] == "FAILED", failed["state"]
        assert failed["uri"] in failed["reason"] and "not found in the MLflow registry" in failed["reason"]
        assert "Failed: ModelError" in failed["page"]  # the run's description
        assert any(failed["uri"] in line and "\n" not in line for line in failed["error_logs"]), failed["error_logs"]
        assert len(list(SCREENSHOTS.glob("*.png"))) >= 6
    finally:
        state = stack / "state.json"
        pids = [svc["pid"] for svc in json.loads(state.read_text())["services"]] if state.exists() else []
        down = subprocess.run([sys.executable, "-m", "infra.local.stack", "down", "--dir", str(stack)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids), "`stack down` left a service running"
