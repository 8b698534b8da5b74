"""Preconditioned influence: score = <S g_row, S H^-1 g_gen>, with H a curvature estimate fitted once per model
version from the training rows and applied to the generation's gradient only, so a cache built without one stays
valid (the rows' side is unchanged).

Per attributed Linear layer (a block-diagonal H over layers), from the per-example gradients dW_n = sum_t g_t x_t^T
of the cache's own loss (the empirical Fisher: the training rows' own labels):

diagonal  H = mean_n dW_n * dW_n (the gradient's second moment per weight); H^-1 v = v / (H + damping).
ekfac     K-FAC's eigenbases (George et al. 2018): Q_A, Q_G the eigenvectors of A = mean_t x_t x_t^T and
          G = mean_t g_t g_t^T over the rows' tokens; the eigenvalues corrected to the per-example gradients,
          Lambda = mean_n (Q_G^T dW_n Q_A)^2; H^-1 v = Q_G ((Q_G^T v Q_A) / (Lambda + damping)) Q_A^T.

Damping is kronfluence's heuristic: 0.1 x the mean of the layer's eigenvalues (diagonal: of its second moments).
Only eigenvectors of A and G are used, so their scale (tokens counted, loss averaged or summed) does not matter.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from . import __version__
from .errors import CacheError
from .gradients import GradientComputer, length_batches, per_example_gradients
from .store import CacheStore, Manifest, tensors_in

FittedKind = Literal["diagonal", "ekfac"]
DAMPING_SCALE = 0.1  # kronfluence's heuristic damping: this times the mean eigenvalue of the layer
FACTORS = {"diagonal": ("second_moment",), "ekfac": ("qa", "qg", "eigenvalues")}


class PreconditionerRecord(BaseModel):
    """The commit record of a fitted preconditioner: what it was fitted on (a spec guard) and its file's checksum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FittedKind
    cache_id: str
    layout: list[tuple[str, tuple[int, ...]]]
    rows: int
    tokens: int
    damping_scale: float
    damping: list[float]
    file: str
    sha256: str
    bytes: int
    seconds: float
    rapidin_version: str


class Preconditioner:
    """Fitted factors of one kind, per attributed layer; `apply` multiplies per-layer gradients by H^-1."""

    def __init__(self, kind: FittedKind, layout: Sequence[tuple[str, Sequence[int]]],
                 factors: list[dict[str, torch.Tensor]], damping: list[float]) -> None:
        self.kind = kind
        self.layout = [(name, tuple(shape)) for name, shape in layout]
        self.factors = factors
        self.damping = damping
        self._moved: dict[tuple, list[dict[str, torch.Tensor]]] = {}

    def apply(self, layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H^-1 applied to each layer's gradients [B, o, i] (the layout's order)."""
        if len(layers) != len(self.factors):
            raise CacheError(f"{self.kind} preconditioner: fitted on {len(self.factors)} layers, got {len(layers)}")
        out = []
        for v, f, damping in zip(layers, self._on(layers[0].device, layers[0].dtype), self.damping, strict=True):
            if self.kind == "diagonal":
                out.append(v / (f["second_moment"] + damping))
            else:
                rotated = f["qg"].T @ v @ f["qa"]
                out.append(f["qg"] @ (rotated / (f["eigenvalues"] + damping)) @ f["qa"].T)
        return out

    def _on(self, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
        """The factors on this device and dtype, moved once (not for every query: EK-FAC's can be ~1 GB)."""
        key = (device, dtype)
        if key not in self._moved:
            self._moved = {key: [{n: t.to(device, dtype) for n, t in f.items()} for f in self.factors]}
        return self._moved[key]

    def to_bytes(self) -> bytes:
        tensors = {f"{m}.{name}": t.contiguous().cpu() for m, factors in enumerate(self.factors)
                   for name, t in factors.items()}
        return st_save(tensors, metadata={"kind": self.kind})


def fit_preconditioners(
    computer: GradientComputer, items: Sequence, kinds: Sequence[FittedKind], progress: bool = True,
    on_gradients: Callable[[list[int], list[torch.Tensor]], object] | None = None,
) -> dict[FittedKind, tuple[Preconditioner, dict]]:
    """Fit each kind from the rows' per-example gradients (one pass over the rows; two with ekfac).
    Returns kind -> (preconditioner, {"rows", "tokens", "seconds"}). `on_gradients(indices, layers)` sees each
    batch's per-example layer gradients [B, o, i] of the first pass (for callers that need them too)."""
    kinds = list(dict.fromkeys(kinds))
    t0 = time.perf_counter()
    batches = length_batches(items, computer.config.batch_size)
    second, cov_a, cov_g, tokens = _first_pass(computer, items, batches, kinds, progress, on_gradients)
    info = {"rows": len(items), "tokens": tokens, "seconds": time.perf_counter() - t0}
    fitted: dict[FittedKind, tuple[Preconditioner, dict]] = {}
    if "diagonal" in kinds:
        moments = [s / len(items) for s in second]
        fitted["diagonal"] = (Preconditioner("diagonal", computer.layout, [{"second_moment": s} for s in moments],
                                             [DAMPING_SCALE * float(s.mean()) for s in moments]), info)
    if "ekfac" in kinds:
        bases = [(_eigenvectors(a), _eigenvectors(g)) for a, g in zip(cov_a, cov_g, strict=True)]
        lams = _corrected_eigenvalues(computer, items, batches, bases, progress)
        factors = [{"qa": qa, "qg": qg, "eigenvalues": lam} for (qa, qg), lam in zip(bases, lams, strict=True)]
        fitted["ekfac"] = (Preconditioner("ekfac", computer.layout, factors,
                                          [DAMPING_SCALE * float(lam.mean()) for lam in lams]),
                           {**info, "seconds": time.perf_counter() - t0})
    return fitted


def _first_pass(computer: GradientComputer, items: Sequence, batches: list[list[int]], kinds: list[str],
                progress: bool, on_gradients) -> tuple[list, list, list, int]:
    """Per layer: the summed squared per-example gradients (diagonal) and the summed token covariances of inputs
    and output gradients (ekfac); and the number of tokens."""
    n = len(computer.layout)
    second: list = [None] * n
    cov_a: list = [None] * n
    cov_g: list = [None] * n
    tokens = 0
    with tqdm(total=len(items), desc="fitting preconditioner (pass 1)", unit="ex", disable=not progress) as bar:
        for batch in batches:
            inputs, grads_out, mask = computer.layer_signals([items[i] for i in batch])
            valid = mask.bool()
            tokens += int(valid.sum())
            layers = ([per_example_gradients(x, g) for x, g in zip(inputs, grads_out, strict=True)]
                      if "diagonal" in kinds or on_gradients else [])
            if on_gradients:
                on_gradients(batch, layers)
            for m, (x, g) in enumerate(zip(inputs, grads_out, strict=True)):
                if "diagonal" in kinds:
                    second[m] = _add(second[m], layers[m].square().sum(0))
                if "ekfac" in kinds:
                    xs, gs = _float(x[valid]), _float(g[valid])
                    cov_a[m], cov_g[m] = _add(cov_a[m], xs.T @ xs), _add(cov_g[m], gs.T @ gs)
            bar.update(len(batch))
    return second, cov_a, cov_g, tokens


def _corrected_eigenvalues(computer: GradientComputer, items: Sequence, batches: list[list[int]],
                           bases: list[tuple[torch.Tensor, torch.Tensor]], progress: bool) -> list[torch.Tensor]:
    """EK-FAC's second pass: Lambda = mean_n (Q_G^T dW_n Q_A)^2 per layer."""
    total: list = [None] * len(bases)
    with tqdm(total=len(items), desc="fitting preconditioner (pass 2)", unit="ex", disable=not progress) as bar:
        for batch in batches:
            inputs, grads_out, _ = computer.layer_signals([items[i] for i in batch])
            for m, (x, g) in enumerate(zip(inputs, grads_out, strict=True)):
                qa, qg = (q.to(x.device) for q in bases[m])
                rotated = qg.T @ per_example_gradients(x, g).to(qa.dtype) @ qa
                total[m] = _add(total[m], rotated.square().sum(0))
            bar.update(len(batch))
    return [t / len(items) for t in total]


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _eigenvectors(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric covariance, computed in float64 (columns), returned in its dtype."""
    _, vectors = torch.linalg.eigh(cov.double())
    return vectors.to(cov.dtype)


def record_name(kind: FittedKind) -> str:
    return f"preconditioners/{kind}.json"


def save_preconditioner(store: CacheStore, manifest: Manifest, fitted: Preconditioner, info: dict) -> PreconditionerRecord:
    """Write the factors, then the record: a preconditioner counts only once its record exists."""
    data = fitted.to_bytes()
    file = f"preconditioners/{fitted.kind}.safetensors"
    record = PreconditionerRecord(
        kind=fitted.kind, cache_id=manifest.cache_id, layout=fitted.layout, rows=info["rows"], tokens=info["tokens"],
        damping_scale=DAMPING_SCALE, damping=fitted.damping, file=file, sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data), seconds=info["seconds"], rapidin_version=__version__)
    store.write_bytes(file, data)
    store.write_bytes(record_name(fitted.kind), record.model_dump_json(indent=2).encode())
    return record


def read_record(store: CacheStore, manifest: Manifest, kind: FittedKind) -> PreconditionerRecord | None:
    """The kind's commit record if it was fitted for this very cache; None if never fitted."""
    if not store.exists(record_name(kind)):
        return None
    try:
        record = PreconditionerRecord.model_validate_json(store.read_bytes(record_name(kind)))
    except ValueError as exc:
        raise CacheError(f"{store.url}/{record_name(kind)}: invalid record ({str(exc).splitlines()[0]})") from None
    layout = [(name, tuple(shape)) for name, shape in manifest.layout]
    if record.cache_id != manifest.cache_id or record.layout != layout:
        raise CacheError(f"{store.url}/{record_name(kind)}: fitted for cache {record.cache_id}, not {manifest.cache_id}"
                         " (another model, data set or gradient setting); fit it again for this cache")
    return record


def load_preconditioner(store: CacheStore, manifest: Manifest, kind: FittedKind) -> Preconditioner:
    """The fitted preconditioner of this cache, checksum verified; refuses one fitted for other settings."""
    record = read_record(store, manifest, kind)
    if record is None:
        raise CacheError(f"{store.url}: no {kind} preconditioner fitted for this cache; fit it with `rapidin cache "
                         f"--preconditioners {kind}` (or the cache flow's preconditioners option)")
    data = _intact_bytes(store, record)
    if data is None:
        raise CacheError(f"{store.url}/{record.file}: missing or corrupted (checksum mismatch); rerun the cache build "
                         f"with --preconditioners {kind} to fit it again")
    tensors = tensors_in(bytearray(data))
    factors = [{name: tensors[f"{m}.{name}"] for name in FACTORS[kind]} for m in range(len(record.layout))]
    return Preconditioner(kind, record.layout, factors, record.damping)


def _intact_bytes(store: CacheStore, record: PreconditionerRecord) -> bytes | None:
    if not store.exists(record.file):
        return None
    data = store.read_bytes(record.file)
    return data if len(data) == record.bytes and hashlib.sha256(data).hexdigest() == record.sha256 else None


def ensure_preconditioners(store: CacheStore, manifest: Manifest, computer: GradientComputer, items: Sequence,
                           kinds: Sequence[FittedKind], progress: bool = True) -> list[PreconditionerRecord]:
    """Fit and save the kinds this cache lacks (or holds corrupted); intact ones are kept. Returns every kind's
    record."""
    records = {kind: read_record(store, manifest, kind) for kind in dict.fromkeys(kinds)}
    missing = [kind for kind, r in records.items() if r is None or _intact_bytes(store, r) is None]
    if missing:
        rows = [it for it in items if it is not None]
        for fitted, info in fit_preconditioners(computer, rows, missing, progress).values():
            records[fitted.kind] = save_preconditioner(store, manifest, fitted, info)
    return list(records.values())
