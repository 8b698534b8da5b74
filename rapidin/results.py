"""Typed attribution results, serialisable to JSON, Parquet and CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

from pydantic import BaseModel, Field

TABLE_COLUMNS = ("generation", "kind", "rank", "row", "id", "score", "prompt", "response")

class Hit(BaseModel):
    """One training row in a top-k list."""

    rank: int
    row: int
    id: str
    score: float
    prompt: str = ""
    response: str = ""
    token_scores: list[float] | None = Field(None, description="I(t_j, z) for each generated token j.")
    train_tokens: list[str] | None = Field(None, description="Response tokens of this training row.")
    train_token_scores: list[float] | None = Field(None, description="I(t, z_i) for each of those tokens.")
    checkpoint_scores: list[float] | None = Field(None, description="Several checkpoints (TracIn): this row's weighted "
                                                  "score at each, in the order of Attribution.checkpoints; they sum to "
                                                  "its score.")


class TokenHits(BaseModel):
    """Top rows for one generated token."""

    position: int
    token: str
    helpful: list[Hit]
    harmful: list[Hit]


class GenerationResult(BaseModel):
    """Attribution of one generation."""

    prompt: str
    response: str
    generated: bool = False
    tokens: list[str] = Field(default_factory=list, description="Generated (response) tokens.")
    target_positions: list[int] | None = Field(None, description="Response tokens the loss was restricted to.")
    helpful: list[Hit] = Field(default_factory=list)
    harmful: list[Hit] = Field(default_factory=list)
    influential: list[Hit] = Field(default_factory=list)
    per_token: list[TokenHits] | None = None


class Attribution(BaseModel):
    """The result of one attribution run."""

    cache_id: str
    cache_url: str
    model: dict[str, Any]
    sketch: dict[str, Any]
    top_k: int
    preconditioner: str = Field("none", description="Curvature applied to the generations' gradients (none, "
                                "diagonal, ekfac).")
    checkpoints: list[dict[str, Any]] | None = Field(None, description="Several checkpoints (TracIn): label, weight, "
                                                     "cache id and URL of each, the final model first.")
    generations: list[GenerationResult]
    timings: dict[str, float] = Field(default_factory=dict)
    rows_scanned: int = 0
    bytes_scanned: int = 0

    def to_json(self) -> str:
        """JSON text."""
        return self.model_dump_json(indent=2)

    def table(self) -> list[dict]:
        """One flat row per (generation, list, rank)."""
        rows = []
        for g, gen in enumerate(self.generations):
            for kind in ("helpful", "harmful", "influential"):
                for hit in getattr(gen, kind):
                    rows.append(dict(zip(TABLE_COLUMNS, (g, kind, hit.rank, hit.row, hit.id, hit.score, hit.prompt,
                                                         hit.response), strict=True)))
        return rows

    def to_parquet(self) -> bytes:
        """Parquet bytes of table()."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.table()), buf)
        return buf.getvalue()

    def to_csv(self) -> str:
        """CSV text of table() (MLflow's artifact viewer shows it as a table; it cannot preview Parquet)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.table())
        return buf.getvalue()
