"""`make install` installs what the README says: the pinned CPU torch, and no CUDA packages on a CPU machine."""

import re
from importlib.metadata import distributions
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def pinned(name: str) -> str:
    (version,) = re.findall(rf"^{name}==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    return version


def test_torch_is_the_readme_version_and_held_by_the_constraints():
    version = pinned("torch")
    assert f"torch=={version}" in (ROOT / "README.md").read_text()
    assert torch.__version__.split("+")[0] == version
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()  # every pip call of `make install` holds it


def test_no_cuda_packages_on_a_cpu_machine():
    if torch.cuda.is_available():  # a GPU machine installs CUDA torch on purpose (README "GPU")
        return
    cuda = sorted({d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia-")})
    assert cuda == [] and "+cpu" in torch.__version__, (torch.__version__, cuda)


def test_every_installed_dependency_is_pinned():
    """The constraints pin the whole environment, so pip has nothing to resolve (no backtracking, no drift)."""
    pins = {re.split(r"==", line)[0].lower().replace("_", "-")
            for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    installed = {d.metadata["Name"].lower().replace("_", "-") for d in distributions()} - {"rapidin", "pip"}
    assert installed <= pins | {"setuptools", "wheel"}, sorted(installed - pins)


def test_dependencies_are_byte_compiled():
    """`make install` leaves bytecode for every package: with PYTHONDONTWRITEBYTECODE set, as on CI, nothing is
    compiled on import, and each process of the suite would compile torch, Prefect and MLflow again."""
    import importlib.util

    import prefect

    for module in (torch, prefect):
        cached = Path(importlib.util.cache_from_source(module.__file__))
        assert cached.exists(), f"{module.__name__} has no bytecode: run `make install`"
