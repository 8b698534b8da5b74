"""MLflow tracking: one run per cache build, per attribution and per fine-tune; registry tags and versions.

Only non-secret values are logged: sketch/gradient options, timings, URLs of caches (no credentials),
and files this pipeline wrote. Settings (with the S3 keys) are never logged.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_UI_URL

import rapidin
from rapidin.plots import write_plots
from rapidin.precondition import PreconditionerRecord
from rapidin.report import render_html
from rapidin.results import Attribution
from rapidin.settings import Settings
from rapidin.store import Manifest

from .common import IO_RETRIES, dtype_bytes, settings
from .models import LOGGED_MODEL_TAG, ResolvedModel, mlflow_client

CACHE_URL_TAG = "rapidin.cache_url"
CACHE_ID_TAG = "rapidin.cache_id"
CACHE_RUN_TAG = "rapidin.cache_run_id"
DATA_URL_TAG = "rapidin.data_url"
CHECKPOINTS_TAG = "rapidin.checkpoints"  # the checkpoints a fine-tune kept, e.g. "epoch-1,epoch-2"


def public_uri(uri: str) -> str:
    """A URI with any user:password@ removed."""
    return re.sub(r"//[^/@]+@", "//", uri)


# MLflow 3 opens an experiment without this tag in its GenAI view (traces); these runs belong in the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: Any, s: Settings) -> str:
    """The configured experiment's id, created (with the configured artifact root) if missing."""
    exp = client.get_experiment_by_name(s.mlflow_experiment)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:  # an experiment made before this tag existed, or by hand
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    try:
        return client.create_experiment(s.mlflow_experiment, artifact_location=s.mlflow_artifact_location,
                                        tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another run
        exp = client.get_experiment_by_name(s.mlflow_experiment)
        if exp is None:
            raise
        return exp.experiment_id


def run_link(s: Settings, exp_id: str, run_id: str) -> str:
    """Where a person opens the run: a UI URL for a tracking server, else the `mlflow ui` command. The URL opens
    MLflow 3's "Model training" view (runs, metrics, artifacts); its UI starts in the GenAI view otherwise."""
    uri = public_uri(s.mlflow_tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"
    return f"`mlflow ui --backend-store-uri {uri}` then open experiment {exp_id}, run {run_id}"


def common_tags(manifest: Manifest, kind: str) -> dict[str, str]:
    """Tags every run about a cache carries."""
    return {
        "rapidin.kind": kind,
        "model_name": str(manifest.model.get("name")),
        "model_version": str(manifest.model.get("version")),
        "model_fingerprint": str(manifest.model.get("fingerprint")),
        "dataset_fingerprint": str(manifest.dataset.get("fingerprint")),
        "cache_id": manifest.cache_id,
        "rapidin_version": rapidin.__version__,
    }


def sketch_params(manifest: Manifest) -> dict[str, Any]:
    """K, λ, seed, method, dtype, D and the gradient options."""
    cfg = manifest.sketch.config
    g = manifest.gradient
    return {"K": cfg.k, "lambda": cfg.lam, "seed": cfg.seed, "method": cfg.method, "dtype": cfg.dtype,
            "D": manifest.sketch.d, "max_length": g.max_length, "normalize": g.normalize,
            "params": ",".join(g.params) or "(default)", "adapter_tensors": g.adapter_tensors,
            "shard_rows": manifest.shard_rows}


def ratio_metrics(manifest: Manifest) -> dict[str, float]:
    """Compression: D/K, and bytes ratio fp32 gradient vs stored sketch; cache size."""
    cfg, d = manifest.sketch.config, manifest.sketch.d
    return {"compression_ratio": d / cfg.k, "bytes_ratio": (d * 4) / (cfg.k * dtype_bytes(cfg.dtype)),
            "cache_bytes": float(sum(s.bytes for s in manifest.shards)), "cache_rows": float(manifest.num_rows)}


def _log(client: Any, run_id: str, params: dict[str, Any], metrics: dict[str, float],
         tags: dict[str, str] | None = None) -> None:
    """Params, metrics and tags in one request."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run this MLflow run belongs to (its id, name and UI link), when there is one; MLflow shows the
    link as the run's source."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    run = ctx.flow_run
    ui = PREFECT_UI_URL.value()
    url = f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else ""
    return {"prefect.flow_run_id": str(run.id), "prefect.flow_run_name": run.name, "prefect.flow_run_url": url,
            "mlflow.source.type": "JOB", "mlflow.source.name": url or f"prefect flow run {run.name}"}


def _start(client: Any, s: Settings, tags: dict[str, str], name: str) -> tuple[str, str]:
    """A new run, named distinctly (the Prefect flow run's name, else the time) and linked to its flow run."""
    exp = experiment_id(client, s)
    context = prefect_tags()
    suffix = context.get("prefect.flow_run_name") or time.strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(exp, tags=tags | context, run_name=f"{name} · {suffix}")
    return exp, run.info.run_id


def start_run(kind: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> dict[str, str]:
    """Open the MLflow run of a job when its work starts (its duration is then the job's), with what is known so far."""
    s = settings()
    client = mlflow_client(s)
    exp, run_id = _start(client, s, {"rapidin.kind": kind, "rapidin_version": rapidin.__version__, **tags}, name)
    _log(client, run_id, params, {})
    return {"run_id": run_id, "experiment_id": exp, "link": run_link(s, exp, run_id)}


def fail_run(run: dict[str, str], error: BaseException) -> None:
    """End a job's run as FAILED with the reason (one line) as its description and `rapidin.error` tag."""
    client = mlflow_client(settings())
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:5000]
    _log(client, run["run_id"], {}, {}, {"rapidin.error": reason, "mlflow.note.content": f"Failed: {reason}"})
    client.set_terminated(run["run_id"], "FAILED")


def preconditioner_metrics(records: list[PreconditionerRecord]) -> dict[str, float]:
    """Fit seconds and stored bytes of each fitted preconditioner."""
    return {f"preconditioner_{r.kind}_{what}": float(value) for r in records
            for what, value in (("seconds", r.seconds), ("bytes", r.bytes))}


def log_cache_build(run: dict[str, str], manifest: Manifest, model: ResolvedModel, cache_url: str,
                    seconds: dict[str, float], extra_params: dict[str, Any] | None = None,
                    preconditioners: list[PreconditionerRecord] = ()) -> dict[str, str]:
    """Complete a cache build's run (opened by start_run; its caller ends it FAILED with the reason if this raises):
    its tags, ratios, timings and manifest; then FINISHED, and the registered model version points at its cache."""
    s = settings()
    client = mlflow_client(s)
    run_id = run["run_id"]
    link_model(client, run_id, model)
    timings = manifest.timings
    build = seconds.get("build", 0.0)
    metrics = ratio_metrics(manifest) | {
        "seconds_load": seconds.get("load", 0.0),
        "seconds_plan": seconds.get("plan", 0.0),
        "seconds_gradients": timings.get("gradients", 0.0),
        "seconds_sketch": timings.get("sketch", 0.0),
        "seconds_write": timings.get("write", 0.0),
        "seconds_build": build,
        "seconds_total": seconds.get("total", 0.0),
        "examples_per_s": manifest.num_rows / build if build > 0 else 0.0,
        "shards": float(len(manifest.shards)),
    } | preconditioner_metrics(list(preconditioners))
    tags = common_tags(manifest, "cache") | {"cache_url": public_uri(cache_url)}
    _log(client, run_id, sketch_params(manifest) | (extra_params or {}), metrics, tags)
    client.log_text(run_id, manifest.model_dump_json(indent=2), "manifest.json")
    client.set_terminated(run_id, "FINISHED")
    if model.registry and not model.checkpoint and in_default_store(cache_url, s):
        tag_model_version(model.registry.name, model.registry.version, cache_url, manifest.cache_id, run_id)
    return run


def link_model(client: Any, run_id: str, model: ResolvedModel | None) -> None:
    """Name the registered version's logged model as the run's input (MLflow 3's link from a run to its model)."""
    if model is not None and model.registry is not None and model.registry.model_id:
        from mlflow.entities import LoggedModelInput

        client.log_inputs(run_id, models=[LoggedModelInput(model_id=model.registry.model_id)])


def in_default_store(cache_url: str, s: Settings) -> bool:
    """Whether a cache lives under the configured store root: only those become a version's cache of record
    (a cache built into an ad-hoc store for an experiment does not move the version's tag)."""
    return cache_url.startswith(s.store_url.rstrip("/") + "/")


def tag_model_version(name: str, version: str, cache_url: str, cache_id: str, run_id: str | None = None) -> None:
    """Point a registered model version at its gradient cache."""
    client = mlflow_client(settings())
    client.set_model_version_tag(name, version, CACHE_URL_TAG, public_uri(cache_url))
    client.set_model_version_tag(name, version, CACHE_ID_TAG, cache_id)
    if run_id:
        client.set_model_version_tag(name, version, CACHE_RUN_TAG, run_id)


def log_attribution(run: dict[str, str], attribution: Attribution, manifest: Manifest, seconds: dict[str, float],
                    extra_params: dict[str, Any] | None = None, model: ResolvedModel | None = None) -> dict[str, str]:
    """Complete an attribution's run (opened by start_run): tags, sketch params, retrieval timings, the generations,
    the top-k as JSON and Parquet, the report and plots; then FINISHED."""
    client = mlflow_client(settings())
    run_id = run["run_id"]
    tags = common_tags(manifest, "attribution") | {"cache_url": public_uri(attribution.cache_url)}
    scan = seconds.get("scan", 0.0)
    metrics = ratio_metrics(manifest) | {
        "retrieval_seconds": scan,
        "bytes_scanned": float(attribution.bytes_scanned),
        "rows_scanned": float(attribution.rows_scanned),
        "bytes_scanned_per_s": attribution.bytes_scanned / scan if scan > 0 else 0.0,
        "seconds_load": seconds.get("load", 0.0),
        "seconds_queries": seconds.get("queries", 0.0),
        "seconds_assemble": seconds.get("assemble", 0.0),
        "seconds_total": seconds.get("total", 0.0),
        "generations": float(len(attribution.generations)),
    }
    _log(client, run_id, sketch_params(manifest) | (extra_params or {}), metrics, tags)
    link_model(client, run_id, model)
    client.log_text(run_id, manifest.model_dump_json(indent=2), "manifest.json")
    client.log_dict(run_id, [{"prompt": g.prompt, "response": g.response, "generated": g.generated}
                             for g in attribution.generations], "generations.json")
    client.log_text(run_id, attribution.to_json(), "attribution.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "topk.parquet"
        path.write_bytes(attribution.to_parquet())
        client.log_artifact(run_id, str(path))
    client.log_text(run_id, attribution.to_csv(), "topk.csv")  # the table MLflow's viewer can show
    client.log_text(run_id, render_html(attribution), "report.html")
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_plots(attribution, tmp):
            client.log_artifact(run_id, str(path), "plots")
    client.set_terminated(run_id, "FINISHED")
    return run


def register_model_dir(local_dir: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                       tags: dict[str, str], version_tags: dict[str, str], alias: str | None = None) -> dict[str, str]:
    """Log a saved model directory as run artifacts and register it as a new version of `name`."""
    from mlflow.exceptions import MlflowException

    s = settings()
    client = mlflow_client(s)
    exp, run_id = _start(client, s, {"rapidin.kind": "finetune", "model_name": name,
                                     "rapidin_version": rapidin.__version__, **tags}, f"finetune {name}")
    try:
        _log(client, run_id, params, metrics)
        # MLflow 3's model: a logged model, output of this run; the version promotes it, and the runs that use the
        # version name it as their input, so each run's row in the runs table links to the model and its version
        from mlflow.entities import LoggedModelOutput

        logged = client.create_logged_model(exp, name=name, source_run_id=run_id, model_type="rapidin-finetune")
        client.log_model_artifacts(logged.model_id, local_dir)
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise
    # source: the logged model's artifact location (MLflow's sqlite registry resolves a models:/<id> source through
    # the process-wide tracking URI, which need not be this client's)
    mv = client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                     tags=version_tags | {LOGGED_MODEL_TAG: logged.model_id}, model_id=logged.model_id)
    client.set_logged_model_tags(logged.model_id,
                                 {"mlflow.modelVersions": json.dumps([{"name": name, "version": str(mv.version)}])})
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    client.set_tag(run_id, "model_version", str(mv.version))
    return {"name": name, "version": str(mv.version), "run_id": run_id, "experiment_id": exp,
            "link": run_link(s, exp, run_id)}


@task(name="log-cache-run", **IO_RETRIES, cache_policy=NO_CACHE)
def log_cache_run(run: dict[str, str], manifest: Manifest, model: ResolvedModel, cache_url: str,
                  seconds: dict[str, float], extra_params: dict[str, Any] | None = None,
                  preconditioners: list[PreconditionerRecord] = ()) -> dict[str, str]:
    """MLflow run for a cache build (+ model-version tag)."""
    return log_cache_build(run, manifest, model, cache_url, seconds, extra_params, preconditioners)


@task(name="log-preconditioners", **IO_RETRIES, cache_policy=NO_CACHE)
def log_preconditioners_task(run: dict[str, str], records: list[PreconditionerRecord], manifest: Manifest,
                             cache_url: str) -> None:
    """Complete the run of a fit on an already complete cache: the cache's tags, the fit's seconds and sizes."""
    client = mlflow_client(settings())
    _log(client, run["run_id"], {"preconditioners": ",".join(r.kind for r in records)},
         preconditioner_metrics(records), common_tags(manifest, "cache") | {"cache_url": public_uri(cache_url)})
    client.set_terminated(run["run_id"], "FINISHED")


@task(name="start-tracking-run", **IO_RETRIES, cache_policy=NO_CACHE)
def start_run_task(kind: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> dict[str, str]:
    """Open the job's MLflow run as its work starts."""
    return start_run(kind, name, tags, params)


@task(name="fail-tracking-run", **IO_RETRIES, cache_policy=NO_CACHE)
def fail_run_task(run: dict[str, str], error: BaseException) -> None:
    """End the job's MLflow run as FAILED, with the reason."""
    fail_run(run, error)


@task(name="log-attribution-run", **IO_RETRIES, cache_policy=NO_CACHE)
def log_attribution_run(run: dict[str, str], attribution: Attribution, manifest: Manifest, seconds: dict[str, float],
                        extra_params: dict[str, Any] | None = None, model: ResolvedModel | None = None) -> dict[str, str]:
    """Complete the attribution's MLflow run."""
    return log_attribution(run, attribution, manifest, seconds, extra_params, model)


@task(name="tag-model-version", **IO_RETRIES, cache_policy=NO_CACHE)
def tag_model_version_task(name: str, version: str, cache_url: str, cache_id: str) -> None:
    """Point a registered version at an already complete cache."""
    tag_model_version(name, version, cache_url, cache_id)


@task(name="register-model", cache_policy=NO_CACHE)  # no retry: a retry could register a second version
def register_model(local_dir: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                   tags: dict[str, str], version_tags: dict[str, str], alias: str | None = None) -> dict[str, str]:
    """Log and register a fine-tuned model directory as a new MLflow model version."""
    return register_model_dir(local_dir, name, params, metrics, tags, version_tags, alias)


