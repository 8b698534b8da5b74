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
