"""int8 storage of cached rows: one scale per row, so each row keeps its own range (a quarter of float32's bytes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Int8Rows:
    """An int8 cache shard's rows: values [n, K] (int8) times one float32 scale per row (its max |entry| / 127).
    Scans read it like a tensor of rows (shape, slicing, bytes) and apply the scales to the scores."""

    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, vectors: torch.Tensor) -> Int8Rows:
        """Each entry rounded to the nearest multiple of its row's scale: within scale / 2 of it (plus float32
        rounding of the division, relative 2^-24)."""
        v = vectors.float()
        scales = v.abs().amax(dim=1) / 127
        values = torch.round(v / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(values, scales)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def numel(self) -> int:
        return self.values.numel()

    def element_size(self) -> int:
        return 1

    def __getitem__(self, key) -> Int8Rows:
        return Int8Rows(self.values[key], self.scales[key])

    def float(self) -> torch.Tensor:
        """The rows decoded to float32."""
        return self.values.float() * self.scales[:, None]


INT32_EXACT_K = (2**31 - 1) // (127 * 127)  # longest int8 dot product whose int32 sum cannot overflow (133,143)


@dataclass(frozen=True)
class Int8Queries:
    """Query vectors [Q, K] as a sum of int8 parts, q = sum_p scale_p * part_p up to the last part's rounding, so an
    int8 row's score is exact int32 arithmetic (torch._int_mm: VNNI/AMX kernels, several times the float32 GEMM's
    rate) plus that rounding. Each next scale is 1/254 of the last (the rest after rounding fits [-127, 127] again):
    three parts leave each entry within max|q| / (2 * 127 * 254^2) ~ 6e-8 max|q| of it, float32's own precision."""

    matrix: torch.Tensor  # [K, P * Q] int8: the P parts side by side, so one integer GEMM scores all of them
    scales: torch.Tensor  # [P, Q] float64       (at 8 queries 2.8x faster than a GEMM per part; at 64, 1.4x)

    @classmethod
    def split(cls, queries: torch.Tensor, count: int = 3, block: int = 2048) -> Int8Queries:
        first = queries.abs().amax(dim=1).double() / 127
        scales = torch.stack([torch.where(first > 0, first, 1.0) / 254**p for p in range(count)])  # [P, Q]
        parts = torch.empty(count, *queries.shape, dtype=torch.int8)
        for start in range(0, queries.shape[1], block):  # a block of columns at a time stays in cache: 4x faster
            rest = queries[:, start : start + block].double()
            for p, scale in enumerate(scales[:, :, None]):
                part = (rest / scale).round_().clamp_(-127, 127)
                parts[p, :, start : start + block] = part
                rest.addcmul_(part, scale, value=-1)
        return cls(parts.flatten(0, 1).T, scales)  # _int_mm reads the transposed view as is

    @property
    def parts(self) -> list[torch.Tensor]:
        """The int8 parts, [K, Q] each."""
        return list(self.matrix.tensor_split(len(self.scales), dim=1))

    def scores(self, rows: Int8Rows) -> torch.Tensor:
        """[n, Q] float32 scores of the rows (values x row scale) against the queries."""
        products = torch._int_mm(rows.values, self.matrix).view(rows.shape[0], *self.scales.shape)
        total = (products.double() * self.scales).sum(1)
        return (total * rows.scales.double()[:, None]).float()
