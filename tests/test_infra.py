"""infra/: the production compose file, Dockerfile and Helm values, checked as far as an offline machine can:
they parse, images are pinned, services are health-checked, GPU workers reserve GPUs, secrets come only from
the env file, and every setting, file, flag and entry point they name exists."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROD = ROOT / "infra" / "production"
COMPOSE = yaml.safe_load((PROD / "docker-compose.yml").read_text())  # safe_load resolves the `<<` merges
SERVICES: dict[str, dict] = COMPOSE["services"]
VALUES = yaml.safe_load((ROOT / "infra" / "k8s" / "prefect-worker-values.yaml").read_text())
DOCKERFILE = (PROD / "Dockerfile").read_text()
K8S_TEMPLATE = json.loads((ROOT / "deployments" / "gpu-kubernetes.json").read_text())
INFRA_FILES = [PROD / "docker-compose.yml", PROD / "Dockerfile", PROD / "env.example",
               ROOT / "infra" / "k8s" / "prefect-worker-values.yaml", ROOT / "infra" / "README.md",
               ROOT / "infra" / "local" / "stack.py", ROOT / "infra" / "local" / "README.md",
               ROOT / "deployments" / "gpu-kubernetes.json", ROOT / "deployments" / "prefect.yaml"]
WORKDIR = "/opt/rapidin"


def pinned(image: str) -> bool:
    """repo:TAG with a full x.y[.z] version in TAG (not latest, not a floating major), or repo@sha256:..."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and "$" not in image and bool(re.match(r"v?\d+\.\d+", tag))


def _command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_every_file_parses() -> None:
    assert SERVICES and VALUES["worker"] and K8S_TEMPLATE["job_configuration"]
    assert re.search(r"^FROM \S+", DOCKERFILE, re.M)
    env = dict(line.split("=", 1) for line in (PROD / "env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env and all(v.startswith("change-me") for v in env.values())  # placeholders, never real values


def test_every_image_is_pinned() -> None:
    images = {name: s["image"] for name, s in SERVICES.items()}
    images["Dockerfile FROM"] = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)[0]
    w = VALUES["worker"]["image"]
    images["helm worker"] = f"{w['repository']}:{w['prefectTag']}"
    images["k8s job"] = K8S_TEMPLATE["variables"]["properties"]["image"]["default"]
    loose = {k: v for k, v in images.items() if not pinned(v)}
    assert not loose, f"unpinned images: {loose}"
    assert {"postgres", "chrislusf/seaweedfs", "prefecthq/prefect", "ghcr.io/rapidin/rapidin"} <= {
        i.rpartition(":")[0] for i in images.values()}
    torch = re.search(r"TORCH_VERSION=(\S+)", DOCKERFILE)
    assert torch and re.fullmatch(r"\d+\.\d+\.\d+", torch[1]) and '"torch==${TORCH_VERSION}"' in DOCKERFILE
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"\ntorch=={torch[1]}\n" in constraints, "the image pins the torch version the tests run with"
    extras = re.findall(r'"([\w-]+)==([^"$]+)"', DOCKERFILE)
    assert extras and all(re.fullmatch(r"\d+(\.\d+)+", v) for _, v in extras), extras
    # the same Prefect everywhere: deployments/prefect.yaml, the server image, the Helm worker
    version = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["prefect-version"]
    assert SERVICES["prefect-server"]["image"].startswith(f"prefecthq/prefect:{version}-")
    assert w["prefectTag"].startswith(f"{version}-")


def test_every_service_is_health_checked_or_waits_for_one() -> None:
    one_shots = {n for n, s in SERVICES.items() if s.get("restart") == "no"}
    for name, service in SERVICES.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, how in deps.items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            cond = how["condition"]
            assert cond in ("service_healthy", "service_completed_successfully"), (name, dep, cond)
            if cond == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s health, which has no check"
            else:
                assert dep in one_shots, f"{name} waits for {dep} to finish, but {dep} restarts"
        if name in one_shots:
            assert any(h["condition"] == "service_healthy" for h in deps.values()), f"{name} waits for nothing"
        else:
            hc = service.get("healthcheck")
            assert hc and hc["test"] and hc.get("retries", 0) >= 3, f"{name} has no health check"
            assert service.get("restart") == "unless-stopped", name
    # the start order is a DAG (no service waits for itself through others)
    seen: dict[str, int] = {}

    def depth(n: str, path: tuple = ()) -> int:
        assert n not in path, f"dependency cycle {path + (n,)}"
        if n not in seen:
            seen[n] = 1 + max((depth(d, path + (n,)) for d in SERVICES[n].get("depends_on", {})), default=0)
        return seen[n]

    assert depth("gpu-worker-0") > depth("prefect-setup") > depth("prefect-server") > depth("prefect-db")


def test_gpu_workers_each_reserve_their_gpu_and_poll_its_queue() -> None:
    gpu = {n: s for n, s in SERVICES.items() if _command(s).startswith("prefect worker start --pool gpu")}
    queues = int(SERVICES["cpu-worker"]["environment"]["RAPIDIN_GPU_QUEUES"])
    assert len(gpu) == queues >= 2
    ids = []
    for name, service in gpu.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        (gpu_id,) = device["device_ids"]
        assert f"--work-queue gpu-{gpu_id}" in _command(service), f"{name}: queue gpu-{gpu_id} for GPU {gpu_id}"
        assert service["environment"]["RAPIDIN_DEVICE"] == "cuda"
        ids.append(gpu_id)
    assert sorted(ids) == [str(i) for i in range(queues)]
    setup = _command(SERVICES["prefect-setup"])
    assert all(f"gpu-{i}" in setup for i in range(queues)), "prefect-setup creates every gpu-i queue"
    for name, service in SERVICES.items():
        if name not in gpu:
            assert "deploy" not in service, f"{name} reserves devices it does not need"


def test_secrets_come_only_from_the_env_file() -> None:
    text = "\n".join(ln for ln in (PROD / "docker-compose.yml").read_text().splitlines()
                     if not ln.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = {line.split("=", 1)[0] for line in (PROD / "env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert required == example == {"RAPIDIN_S3_ACCESS_KEY", "RAPIDIN_S3_SECRET_KEY", "PREFECT_DB_PASSWORD",
                                   "MLFLOW_DB_PASSWORD"}
    assert not re.findall(r"\$\{\w+:-", text), "no silent defaults for interpolated values"
    secretish = re.compile(r"(SECRET|PASSWORD|ACCESS_KEY)")
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key) or secretish.search(str(value)):
                assert re.search(r"\$\{\w+:\?", str(value)), f"{name}.{key} must come from the env file"
        # compose would paste an interpolated value into argv (visible in `ps`); secrets travel as env only
        assert not re.search(r"\$\{\w*(SECRET|PASSWORD|ACCESS_KEY)", _command(service)), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert ".env" in (PROD / ".gitignore").read_text().split()


def test_every_rapidin_variable_is_a_settings_field() -> None:
    from rapidin.settings import Settings

    fields = {f"RAPIDIN_{name.upper()}" for name in Settings.model_fields}
    used = {}
    for path in INFRA_FILES:
        for var in re.findall(r"RAPIDIN_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            used.setdefault(var, path.relative_to(ROOT).as_posix())
    unknown = {v: p for v, p in used.items() if v not in fields}
    assert not unknown, f"not fields of rapidin.settings.Settings: {unknown}"
    assert len(used) >= 8


def test_referenced_files_commands_and_flags_exist() -> None:
    # files the compose commands and the Helm instructions name
    texts = "\n".join(p.read_text() for p in INFRA_FILES)
    paths = set(re.findall(r"\b((?:deployments|infra|flows|tasks|rapidin)/[\w./-]+\.(?:yaml|yml|json|py))", texts))
    assert {"deployments/prefect.yaml", "deployments/gpu-process.json", "deployments/gpu-kubernetes.json"} <= paths
    assert not [p for p in paths if not (ROOT / p).exists()]
    # the Dockerfile copies what exists and works where the deployments and the k8s template expect
    for src in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), s
    assert re.search(rf"^WORKDIR {WORKDIR}$", DOCKERFILE, re.M)
    assert K8S_TEMPLATE["variables"]["properties"]["working_dir"]["default"] == WORKDIR
    assert all(s.get("working_dir") == WORKDIR for n, s in SERVICES.items() if "prefect" in _command(s)
               and s["image"].startswith("ghcr.io/rapidin/"))
    # console scripts the project image runs come from the project's own dependencies
    import shutil
    import sys

    venv_bin = Path(sys.executable).parent
    for name, service in SERVICES.items():
        if service["image"].startswith("ghcr.io/rapidin/"):
            exe = service["command"][0] if isinstance(service["command"], list) else service["command"].split()[0]
            assert exe in ("python", "/bin/sh") or (venv_bin / exe).exists() or shutil.which(exe), (name, exe)
    # every `prefect worker start` flag is one the installed Prefect accepts
    from prefect.cli import worker

    flags = {n for p in inspect.signature(worker.start).parameters.values()
             for meta in getattr(p.annotation, "__metadata__", ()) for n in getattr(meta, "name", ()) or ()}
    for name, service in SERVICES.items():
        cmd = service.get("command")
        if isinstance(cmd, list) and cmd[:3] == ["prefect", "worker", "start"]:
            used = {a for a in cmd if a.startswith("--")}
            assert used <= flags, (name, used - flags)
    # MLflow is configured through the server's own option variables
    from mlflow.cli import server

    envvars = {p.envvar for p in server.params if p.envvar}
    mlflow_env = {k for k in SERVICES["mlflow"]["environment"] if k.startswith("MLFLOW_") and k not in (
        "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION")}
    assert mlflow_env and mlflow_env <= envvars, mlflow_env - envvars


def test_helm_values_run_a_kubernetes_worker_on_the_gpu_pool_with_the_deployments_template() -> None:
    from prefect.utilities.templating import apply_values

    config = VALUES["worker"]["config"]
    assert config["workPool"] == "gpu" and config["type"] == "kubernetes"
    assert VALUES["worker"]["apiConfig"] == "selfHostedServer"
    assert VALUES["worker"]["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    # the template is not duplicated: it comes from deployments/ through --set-file
    assert config["baseJobTemplate"]["configuration"] is None
    set_file = "--set-file worker.config.baseJobTemplate.configuration=deployments/gpu-kubernetes.json"
    for doc in (ROOT / "infra" / "k8s" / "prefect-worker-values.yaml", ROOT / "infra" / "README.md"):
        assert set_file in doc.read_text(), doc
    defaults = {k: v.get("default") for k, v in K8S_TEMPLATE["variables"]["properties"].items()}
    rendered = apply_values(K8S_TEMPLATE["job_configuration"], defaults)
    (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (secret,) = container["envFrom"]
    assert secret["secretRef"]["name"] == "rapidin-s3"
    assert "secret generic rapidin-s3" in (ROOT / "infra" / "README.md").read_text()
    assert not any(re.search(r"SECRET|ACCESS_KEY", str(v)) for v in (defaults["env"] or {}).values())


@pytest.mark.parametrize("image", ["postgres:16", "postgres:latest", "postgres", "x/y:3-python3.12", "a:${TAG}"])
def test_pinned_rejects_floating_tags(image: str) -> None:
    assert not pinned(image)
    assert pinned("postgres:16.6-alpine") and pinned("prefecthq/prefect:3.9.1-python3.12")
