"""Validated, frozen option sets. Anything here that changes the numbers goes into the cache id."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SketchMethod = Literal["rapidgrad"]
StorageDtype = Literal["float16", "bfloat16", "float32"]


class SketchConfig(BaseModel):
    """RapidGrad compression: K output dims, lam shuffle rounds, a seed, and the stored dtype."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: SketchMethod = Field("rapidgrad", description="Compression method (the paper's RapidGrad).")
    k: int = Field(2**16, ge=1, description="Compressed dimension K (paper default 2^16).")
    lam: int = Field(20, ge=0, le=1000, description="Shuffle rounds λ (paper default 20).")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed; the same seed rebuilds the same map anywhere.")
    dtype: StorageDtype = Field("float16", description="Storage dtype of cached vectors (paper: fp16).")


class GradientConfig(BaseModel):
    """How per-example loss gradients are taken."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: tuple[str, ...] = Field(
        (),
        description="Regexes selecting attributed parameter names; empty = adapter tensors if an "
        "adapter is loaded, else every nn.Linear weight not tied to an embedding.",
    )
    normalize: bool = Field(True, description="L2-normalise each parameter tensor's gradient (layer-wise).")
    max_length: int = Field(512, ge=2, description="Tokens per example; longer rows are truncated.")
    batch_size: int = Field(8, ge=1, description="Examples per forward/backward pass (does not change numbers).")

    def fingerprint_fields(self) -> dict:
        """Fields that change the cached numbers (batch size does not)."""
        return self.model_dump(exclude={"batch_size"})
