"""RapidGrad: the paper's shuffle-sign-block-sum compression, rebuilt bit-for-bit from a spec.

The map S: R^D -> R^K pads the vector to D' = ceil(D/K)*K, applies lam rounds of shuffling
(each round views the vector as a (rows, D'/rows) matrix for a random divisor `rows` and permutes
its rows, then views it as (D'/cols, cols) and permutes its columns), multiplies element-wise by
random +-1 and sums each consecutive block of D'/K entries. Every random draw comes from a
splitmix64 hash of (seed, stream, index) computed here with numpy, so the map does not depend on
the torch or numpy RNG, the machine or the device.

The Kronecker sketch (method "kronecker", LoGra-style, for full-parameter models) draws its +-1 factors from the same
hash, and is applied inside the gradient pass (GradientComputer's projector) instead of to formed gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from .config import SketchConfig
from .errors import RapidInError

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser (uint64 arithmetic wraps as intended)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return z ^ (z >> np.uint64(31))


def _keys(seed: int, stream: int, n: int) -> np.ndarray:
    """n pseudo-random uint64 keys for one (seed, stream) pair."""
    base = _splitmix64(np.array([seed * 1_000_003 + stream], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _splitmix64(np.arange(n, dtype=np.uint64) + base)


def _permutation(seed: int, stream: int, n: int) -> np.ndarray:
    """A random permutation of range(n): argsort of hashed keys (splitmix64 is a bijection, so no ties)."""
    return np.argsort(_keys(seed, stream, n))


def _divisors(n: int) -> list[int]:
    """Divisors of n other than 1 and n (all of them when n is prime or 1)."""
    small = [d for d in range(2, int(n**0.5) + 1) if n % d == 0]
    found = sorted(set(small) | {n // d for d in small})
    return found or [1, n]


class RapidGradSpec(BaseModel):
    """Everything needed to rebuild the same S: the sketch config and the input dimension D."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: SketchConfig
    d: int

    @property
    def padded_d(self) -> int:
        """D rounded up to a multiple of K."""
        return -(-self.d // self.config.k) * self.config.k

    @property
    def block(self) -> int:
        """Entries summed into each output coordinate."""
        return self.padded_d // self.config.k

    def shuffle_steps(self) -> list[tuple[str, int, np.ndarray]]:
        """The 2*lam shuffle steps as (axis, size of permuted axis, permutation)."""
        divisors = _divisors(self.padded_d)
        steps = []
        for step in range(2 * self.config.lam):
            pick = int(_keys(self.config.seed, 2 * step, 1)[0] % np.uint64(len(divisors)))
            size = divisors[pick]
            axis = "rows" if step % 2 == 0 else "cols"
            steps.append((axis, size, _permutation(self.config.seed, 2 * step + 1, size)))
        return steps

    def signs(self) -> np.ndarray:
        """The random +-1 vector of length D' (float32)."""
        bits = _keys(self.config.seed, 1_000_000, self.padded_d) >> np.uint64(63)
        return (1.0 - 2.0 * bits.astype(np.float32)).astype(np.float32)

    def permutation(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All shuffle steps composed into one gather index: shuffled[p] = padded[perm[p]].

        O(lam * D) work, so it is built on the device that will use it (seconds on a GPU for D ~ 1e8).
        """
        dtype = torch.int32 if self.padded_d < 2**31 else torch.int64
        index = torch.arange(self.padded_d, dtype=dtype, device=device)
        for axis, size, perm in self.shuffle_steps():
            order = torch.from_numpy(perm).to(device)
            if axis == "rows":
                index = index.view(size, -1).index_select(0, order).view(-1)
            else:
                index = index.view(-1, size).index_select(1, order).reshape(-1)
        return index.long()


def make_spec(config: SketchConfig, d: int, layout: Sequence[tuple[str, Sequence[int]]] | None = None) -> RapidGradSpec:
    """Validate K <= D (and, given the layout, that the Kronecker sketch can use K) and return the spec."""
    if d < 1:
        raise RapidInError("sketch: the attributed parameters have no entries (D = 0)")
    if config.k > d:
        raise RapidInError(f"sketch: K = {config.k} is larger than the gradient dimension D = {d}; choose --k <= {d}")
    if config.method == "kronecker" and layout is not None:
        kronecker_factors(config.k, layout)
    return RapidGradSpec(config=config, d=d)


@functools.lru_cache(maxsize=4)
def _tables(spec: RapidGradSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather index, signs) on a device, built once per spec and device in a process."""
    return spec.permutation(device), torch.from_numpy(spec.signs()).to(device)


class RapidGrad:
    """Applies a RapidGradSpec to batches of vectors on any device."""

    def __init__(self, spec: RapidGradSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self._perm, self._signs = _tables(spec, self.device)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Compress [B, D] (or [D]) float vectors to [B, K] (or [K]) float32."""
        single = vectors.dim() == 1
        x = vectors.reshape(1, -1) if single else vectors
        if x.shape[1] != self.spec.d:
            raise RapidInError(f"sketch: expected vectors of dimension {self.spec.d}, got {x.shape[1]}")
        x = x.to(self.device, torch.float32)
        padded = torch.nn.functional.pad(x, (0, self.spec.padded_d - self.spec.d))
        shuffled = padded[:, self._perm] * self._signs
        out = shuffled.reshape(x.shape[0], self.spec.config.k, self.spec.block).sum(-1)
        return out[0] if single else out


def apply_by_rounds(spec: RapidGradSpec, vector: torch.Tensor) -> torch.Tensor:
    """The original per-step application (reshape, permute, λ times); the reference for tests and benchmarks."""
    vec = torch.nn.functional.pad(vector.to(torch.float32), (0, spec.padded_d - spec.d))
    for axis, size, perm in spec.shuffle_steps():
        index = torch.from_numpy(perm).to(vec.device)
        vec = vec.reshape(size, -1)[index, :] if axis == "rows" else vec.reshape(-1, size)[:, index]
        vec = vec.reshape(-1)
    vec = vec * torch.from_numpy(spec.signs()).to(vec.device)
    return vec.reshape(spec.config.k, spec.block).sum(-1)


def explicit_matrix(spec: RapidGradSpec) -> torch.Tensor:
    """S as a dense [K, D] matrix built from per-step permutation matrices (small D only)."""
    n = spec.padded_d
    transform = torch.eye(n, dtype=torch.float64)
    for axis, size, perm in spec.shuffle_steps():
        positions = np.arange(n).reshape(size, -1) if axis == "rows" else np.arange(n).reshape(-1, size)
        moved = positions[perm, :] if axis == "rows" else positions[:, perm]
        step = torch.zeros(n, n, dtype=torch.float64)
        step[torch.arange(n), torch.from_numpy(moved.reshape(-1))] = 1.0
        transform = step @ transform
    transform = torch.diag(torch.from_numpy(spec.signs()).double()) @ transform
    blocks = torch.kron(torch.eye(spec.config.k, dtype=torch.float64), torch.ones(1, spec.block, dtype=torch.float64))
    return (blocks @ transform)[:, : spec.d]


# ------------------------------------------------------------------------------------------------ Kronecker (LoGra)


def kronecker_factors(k: int, layout: Sequence[tuple[str, Sequence[int]]]) -> list[tuple[int, int]]:
    """Per attributed matrix [o, i]: the factor sizes (min(o, f), min(i, f)) for the largest f whose blocks fit in K
    together; the unused rest of K stays zero."""
    shapes = [(int(shape[0]), int(shape[1])) for _, shape in layout]

    def total(f: int) -> int:
        return sum(min(o, f) * min(i, f) for o, i in shapes)

    if not shapes or total(1) > k:
        raise RapidInError(f"sketch: the kronecker method needs K >= the {len(shapes)} attributed matrices; "
                           f"K = {k} is too small")
    low, high = 1, max(max(s) for s in shapes)
    while low < high:  # the largest f with total(f) <= k
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total(mid) <= k else (low, mid - 1)
    return [(min(o, low), min(i, low)) for o, i in shapes]


def _rademacher(seed: int, stream: int, rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] matrix of random +-1 (float32) from the seed's hash stream, like RapidGrad's signs."""
    bits = _keys(seed, stream, rows * cols) >> np.uint64(63)
    return torch.from_numpy((1.0 - 2.0 * bits.astype(np.float32)).reshape(rows, cols))


class KroneckerSketch:
    """Sketches each attributed Linear layer's per-example gradient G = sum_t g_t x_t^T [o, i] as
    P_o G P_i^T / sqrt(k_o k_i) = sum_t (P_o g_t)(P_i x_t)^T / sqrt(k_o k_i), with random +-1 factors P_o [k_o, o]
    and P_i [k_i, i] (LoGra's structured projection), so G itself is never formed: the cost is about the forward and
    backward passes and memory does not grow with D. E[P^T P] = k I for each factor, so inner products are unbiased.
    Layer-wise normalisation divides by the exact ||G||_F, from ||G||^2 = sum_{t,s} (g_t.g_s)(x_t.x_s)."""

    def __init__(self, spec: RapidGradSpec, layout: Sequence[tuple[str, Sequence[int]]],
                 device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.factors = kronecker_factors(spec.config.k, layout)
        self.projections = [
            (_rademacher(spec.config.seed, 2_000_000 + 2 * m, ko, int(shape[0])).to(self.device),
             _rademacher(spec.config.seed, 2_000_001 + 2 * m, ki, int(shape[1])).to(self.device))
            for m, ((_, shape), (ko, ki)) in enumerate(zip(layout, self.factors, strict=True))
        ]

    def project(self, inputs: Sequence[torch.Tensor], grads_out: Sequence[torch.Tensor], normalize: bool) -> torch.Tensor:
        """[B, K] from each layer's inputs x [B, T, i] and output gradients g [B, T, o]."""
        pieces = []
        for x, g, (p_out, p_in) in zip(inputs, grads_out, self.projections, strict=True):
            dtype = torch.promote_types(g.dtype, torch.float32)  # at least fp32 accumulation
            x, g = x.to(self.device, dtype), g.to(self.device, dtype)
            p_out, p_in = p_out.to(dtype), p_in.to(dtype)
            sketch = torch.einsum("bto,bti->boi", g @ p_out.T, x @ p_in.T).flatten(1)
            sketch = sketch / float(p_out.shape[0] * p_in.shape[0]) ** 0.5
            if normalize:
                squared = ((g @ g.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum((1, 2))
                sketch = sketch / squared.clamp_min(0).sqrt().clamp_min(1e-30)[:, None]
            pieces.append(sketch)
        return self._packed(pieces)

    def apply_dense(self, gradients: torch.Tensor) -> torch.Tensor:
        """[B, K] from already formed (layer-wise normalised) gradients [B, D] in the layout's order: P_o G P_i^T per
        layer, what `project` gives without forming G. For gradients computed before (benchmarks) and for checks."""
        pieces, offset = [], 0
        for (p_out, p_in) in self.projections:
            o, i = p_out.shape[1], p_in.shape[1]
            g = gradients[:, offset : offset + o * i].to(self.device, torch.float32).reshape(-1, o, i)
            offset += o * i
            pieces.append((p_out @ g @ p_in.T).flatten(1) / float(p_out.shape[0] * p_in.shape[0]) ** 0.5)
        if offset != gradients.shape[1]:
            raise RapidInError(f"sketch: expected gradients of dimension {offset}, got {gradients.shape[1]}")
        return self._packed(pieces)

    def _packed(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The layers' blocks side by side, zero-padded to K."""
        out = torch.cat(pieces, dim=1)
        return torch.nn.functional.pad(out, (0, self.spec.config.k - out.shape[1]))

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors from `project` are sketched already: returned as float32 on the sketch's device (as RapidGrad)."""
        if vectors.shape[-1] != self.spec.config.k:
            raise RapidInError(f"sketch: expected kronecker-sketched vectors of dimension {self.spec.config.k}, "
                               f"got {vectors.shape[-1]}")
        return vectors.to(self.device, torch.float32)


def make_sketch(spec: RapidGradSpec, layout: Sequence[tuple[str, Sequence[int]]],
                device: torch.device | str = "cpu") -> "Sketch":
    """The sketch a spec names: RapidGrad applies to [B, D] gradients, Kronecker projects inside the gradient pass."""
    if spec.config.method == "kronecker":
        return KroneckerSketch(spec, layout, device)
    return RapidGrad(spec, device)


Sketch = RapidGrad | KroneckerSketch


def projector(sketch: Sketch) -> KroneckerSketch | None:
    """What a GradientComputer must apply inside the gradient pass (the Kronecker sketch), or None."""
    return sketch if isinstance(sketch, KroneckerSketch) else None
