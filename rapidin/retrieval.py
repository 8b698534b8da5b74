"""Streaming top-k retrieval over a cache: one matrix product per shard, exact merges.

Ranking keys: helpful = score, harmful = -score, influential = |score|; ties go to the lower row
number, so any split of the shards over workers merges to exactly the one-scan result.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CacheError
from .quantize import INT32_EXACT_K, Int8Queries, Int8Rows

KINDS = ("helpful", "harmful", "influential")


def _key(kind: str, scores: torch.Tensor) -> torch.Tensor:
    if kind == "helpful":
        return scores
    if kind == "harmful":
        return -scores
    return scores.abs()


@dataclass
class TopK:
    """Best k rows per query column for one ranking kind, with an optional payload per kept row."""

    kind: str
    k: int
    scores: torch.Tensor  # [k', m]
    rows: torch.Tensor  # [k', m] int64
    payload: torch.Tensor | None = None  # [k', m, P]

    @classmethod
    def empty(cls, kind: str, k: int, m: int, payload_dim: int | None = None) -> TopK:
        """No rows seen yet."""
        payload = torch.zeros(0, m, payload_dim) if payload_dim is not None else None
        return cls(kind, k, torch.zeros(0, m), torch.zeros(0, m, dtype=torch.long), payload)

    def update(self, scores: torch.Tensor, rows: torch.Tensor, payload: torch.Tensor | None = None) -> TopK:
        """Merge candidates scores [n, m] for rows [n] (or [n, m]) and payload [n, m, P]."""
        rows = rows.reshape(-1, 1).expand_as(scores) if rows.dim() == 1 else rows
        scores, rows, payload = self._contenders(scores.float().cpu(), rows.long().cpu(), payload)
        all_scores = torch.cat([self.scores, scores])
        all_rows = torch.cat([self.rows, rows])
        by_row = torch.sort(all_rows, dim=0, stable=True).indices
        all_scores, all_rows = all_scores.gather(0, by_row), all_rows.gather(0, by_row)
        order = torch.sort(_key(self.kind, all_scores), dim=0, descending=True, stable=True).indices[: self.k]
        new_payload = None
        if self.payload is not None and payload is not None:
            all_payload = torch.cat([self.payload, payload.float().cpu()])
            expand = lambda idx: idx[..., None].expand(-1, -1, all_payload.shape[2])  # noqa: E731
            new_payload = all_payload.gather(0, expand(by_row)).gather(0, expand(order))
        return TopK(self.kind, self.k, all_scores.gather(0, order), all_rows.gather(0, order), new_payload)

    def _contenders(self, scores: torch.Tensor, rows: torch.Tensor, payload: torch.Tensor | None):
        """Per column, only the k new rows with the best keys go on to the exact merge (two sorts of 2k rows instead
        of k + n: 46% of a million-row scan at K = 1,024 was these sorts): any other new row has k new rows with a
        strictly better key. If a column's k-th key ties with a row left out, which to keep depends on the row
        numbers, so then every new row goes on."""
        if scores.shape[0] <= 2 * self.k:
            return scores, rows, payload
        key = _key(self.kind, scores)
        best = torch.topk(key, self.k, dim=0)
        kth = best.values[-1:]
        if ((key == kth).sum(0) != (best.values == kth).sum(0)).any():
            return scores, rows, payload
        picked = best.indices
        if payload is not None:
            payload = payload.gather(0, picked[..., None].expand(-1, -1, payload.shape[2]))
        return scores.gather(0, picked), rows.gather(0, picked), payload

    def merge(self, other: TopK) -> TopK:
        """Exact merge of two partial results over disjoint rows."""
        return self.update(other.scores, other.rows, other.payload)

    @classmethod
    def side_by_side(cls, tops: list[TopK]) -> TopK:
        """Lists of one kind over the same rows (so of equal length) as one list of all their columns."""
        payload = None if tops[0].payload is None else torch.cat([t.payload for t in tops], dim=1)
        return cls(tops[0].kind, tops[0].k, torch.cat([t.scores for t in tops], dim=1),
                   torch.cat([t.rows for t in tops], dim=1), payload)

    def split(self, widths: list[int]) -> list[TopK]:
        """Inverse of side_by_side: the lists of these column counts."""
        out, start = [], 0
        for w in widths:
            cols = slice(start, start + w)
            payload = None if self.payload is None else self.payload[:, cols]
            out.append(TopK(self.kind, self.k, self.scores[:, cols], self.rows[:, cols], payload))
            start += w
        return out


def _update_lists(lists: list[dict[str, TopK]], members: list[int], scores: torch.Tensor, rows: torch.Tensor,
                  payload: torch.Tensor | None = None) -> None:
    """Merge a shard's scores [n, columns of all members] into the lists of these members, for each kind in one
    update: a scan of 64 generations made 192 small top-k merges per shard, most of the 64-query scan's time."""
    for kd in KINDS:
        tops = [lists[g][kd] for g in members]
        merged = TopK.side_by_side(tops).update(scores, rows, payload)
        for g, top in zip(members, merged.split([t.scores.shape[1] for t in tops]), strict=True):
            lists[g][kd] = top


@dataclass
class QueryGroup:
    """One generation's queries: column 0 is the whole (or target) query, then one per generated token."""

    whole: torch.Tensor  # [K]
    tokens: torch.Tensor | None = None  # [T, K]


@dataclass
class ScanResult:
    """Running top-k per generation: whole-query lists (with per-token payload) and per-token lists."""

    k: int
    whole: list[dict[str, TopK]] = field(default_factory=list)
    tokens: list[dict[str, TopK] | None] = field(default_factory=list)
    rows_scanned: int = 0
    bytes_scanned: int = 0
    all_scores: list[torch.Tensor] | None = None  # optional whole-query score of every row, per generation
    all_rows: torch.Tensor | None = None  # the rows those scores belong to
    queries: torch.Tensor | None = None  # with keep_all_scores: the [Q, K] query matrix the rows were scored with

    def merge(self, other: ScanResult) -> ScanResult:
        """Exact merge of scans over disjoint shards."""
        merged = ScanResult(self.k, rows_scanned=self.rows_scanned + other.rows_scanned,
                            bytes_scanned=self.bytes_scanned + other.bytes_scanned)
        merged.whole = [{kd: a[kd].merge(b[kd]) for kd in KINDS} for a, b in zip(self.whole, other.whole, strict=True)]
        merged.tokens = [
            None if a is None else {kd: a[kd].merge(b[kd]) for kd in KINDS}
            for a, b in zip(self.tokens, other.tokens, strict=True)
        ]
        return merged

    def to_bytes(self) -> bytes:
        """Serialise with safetensors (no pickle) to pass between workers."""
        tensors: dict[str, torch.Tensor] = {}
        for g, (whole, tokens) in enumerate(zip(self.whole, self.tokens, strict=True)):
            for prefix, group in (("w", whole), ("t", tokens)):
                for kd, top in (group or {}).items():
                    tensors[f"{prefix}.{g}.{kd}.scores"] = top.scores.contiguous()
                    tensors[f"{prefix}.{g}.{kd}.rows"] = top.rows.contiguous()
                    if top.payload is not None:
                        tensors[f"{prefix}.{g}.{kd}.payload"] = top.payload.contiguous()
        meta = {"k": str(self.k), "groups": str(len(self.whole)), "rows_scanned": str(self.rows_scanned),
                "bytes_scanned": str(self.bytes_scanned),
                "has_tokens": ",".join("1" if t is not None else "0" for t in self.tokens)}
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> ScanResult:
        """Inverse of to_bytes."""
        header_len = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
        tensors = st_load(data)
        result = cls(int(meta["k"]), rows_scanned=int(meta["rows_scanned"]), bytes_scanned=int(meta["bytes_scanned"]))
        flags = meta["has_tokens"].split(",") if meta["has_tokens"] else []
        for g in range(int(meta["groups"])):
            result.whole.append({kd: _top_from(tensors, f"w.{g}.{kd}", kd, result.k) for kd in KINDS})
            result.tokens.append({kd: _top_from(tensors, f"t.{g}.{kd}", kd, result.k) for kd in KINDS}
                                 if flags[g] == "1" else None)
        return result


def _top_from(tensors: dict[str, torch.Tensor], prefix: str, kind: str, k: int) -> TopK:
    return TopK(kind, k, tensors[f"{prefix}.scores"], tensors[f"{prefix}.rows"], tensors.get(f"{prefix}.payload"))


def new_scan(groups: list[QueryGroup], k: int, keep_all_scores: bool = False,
             payload: int | None = None) -> ScanResult:
    """An empty scan for these query groups; each kept whole-query row carries its per-token scores, or `payload`
    values if given (several checkpoints: one score per checkpoint)."""
    result = ScanResult(k, all_scores=[] if keep_all_scores else None,
                        all_rows=torch.zeros(0, dtype=torch.long) if keep_all_scores else None)
    for g in groups:
        t = 0 if g.tokens is None else g.tokens.shape[0]
        result.whole.append({kd: TopK.empty(kd, k, 1, t if payload is None else payload) for kd in KINDS})
        result.tokens.append(None if g.tokens is None else {kd: TopK.empty(kd, k, t) for kd in KINDS})
        if keep_all_scores:
            result.all_scores.append(torch.zeros(0))
    return result


BLOCK_BYTES = 2 * 2**20  # fp32 rows converted at a time: they stay in cache (L2) between conversion and product
MIN_BLOCK_ROWS = 128  # ... but with several queries the product is a GEMM, whose kernels need a tall block


def shard_scores(vectors: torch.Tensor, queries: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [n, Q] (float32, on the CPU) of a shard's vectors [n, K] against queries [Q, K], and the reused buffer.

    On the CPU an fp16 shard is converted a block of rows at a time into one reused float32 buffer, which the product
    reads while it is still in cache: converting the whole shard first wrote and re-read twice its size in memory,
    and a float16 product rounds its results to float16. Each score is a float32 dot product either way. An int8
    shard's integer rows are scored the same way, then each score multiplied by its row's scale."""
    if isinstance(vectors, Int8Rows):
        scores, buffer = shard_scores(vectors.values, queries, buffer)
        return scores * vectors.scales.float()[:, None], buffer
    if queries.device.type != "cpu" or vectors.dtype == torch.float32:
        return (vectors.to(queries.device, torch.float32) @ queries.T).cpu(), buffer
    n, k = vectors.shape
    step = max(1, BLOCK_BYTES // (4 * k)) if queries.shape[0] == 1 else MIN_BLOCK_ROWS
    if buffer.numel() < step * k:
        buffer = torch.empty(step * k)
    scores = torch.empty(n, queries.shape[0])
    for start in range(0, n, step):
        rows = vectors[start : start + step]
        converted = buffer[: rows.numel()].view(rows.shape).copy_(rows)
        torch.mm(converted, queries.T, out=scores[start : start + rows.shape[0]])
    return scores, buffer


class ShardScorer:
    """Scores shards against one query matrix, keeping what is reused between shards: the float32 conversion buffer,
    and for int8 shards scored on the CPU, the queries split into int8 parts (exact int32 products, Int8Queries: 4.7x
    the blocked float32 path's rate at one query, 17x at eight)."""

    def __init__(self, queries: torch.Tensor) -> None:
        self.queries, self.buffer, self.int8 = queries, torch.empty(0), None

    def __call__(self, vectors: torch.Tensor | Int8Rows) -> torch.Tensor:
        if isinstance(vectors, Int8Rows) and self.queries.device.type == "cpu" and vectors.shape[1] <= INT32_EXACT_K:
            self.int8 = self.int8 or Int8Queries.split(self.queries)
            return self.int8.scores(vectors)
        scores, self.buffer = shard_scores(vectors, self.queries, self.buffer)
        return scores


def scan(
    shards: Iterable[tuple[torch.Tensor, torch.Tensor]], groups: list[QueryGroup], k: int,
    device: torch.device | str = "cpu", keep_all_scores: bool = False,
) -> ScanResult:
    """Score every query group against a stream of (vectors [n, K], rows [n]) shards."""
    columns = [torch.cat([g.whole[None], g.tokens]) if g.tokens is not None else g.whole[None] for g in groups]
    spans, start = [], 0
    for c in columns:
        spans.append((start, start + c.shape[0]))
        start += c.shape[0]
    queries = torch.cat(columns).to(device, torch.float32)  # [Q, K]
    result = new_scan(groups, k, keep_all_scores)
    if keep_all_scores:
        result.queries = queries.cpu()
    scorer = ShardScorer(queries)
    # generations with the same number of token queries (or none) are merged side by side
    families: dict[int | None, list[int]] = {}
    for g, group in enumerate(groups):
        families.setdefault(None if group.tokens is None else group.tokens.shape[0], []).append(g)
    columns = {t: (torch.tensor([spans[g][0] for g in members]),
                   torch.tensor([c for g in members for c in range(spans[g][0] + 1, spans[g][1])], dtype=torch.long))
               for t, members in families.items()}
    for vectors, rows in shards:
        scores = scorer(vectors)  # [n, Q]
        result.rows_scanned += rows.numel()
        if keep_all_scores:
            result.all_rows = torch.cat([result.all_rows, rows.long()])
        result.bytes_scanned += vectors.numel() * vectors.element_size()
        for t, members in families.items():
            whole, tokens = scores[:, columns[t][0]], scores[:, columns[t][1]]
            _update_lists(result.whole, members, whole, rows, tokens.view(len(rows), len(members), t or 0))
            if t is not None:
                _update_lists(result.tokens, members, tokens, rows)
        if keep_all_scores:
            for g, (a, _) in enumerate(spans):
                result.all_scores[g] = torch.cat([result.all_scores[g], scores[:, a]])
    return result


def scan_checkpoints(streams: list[Iterable[tuple[torch.Tensor, torch.Tensor]]], queries: list[torch.Tensor], k: int,
                     device: torch.device | str = "cpu", keep_all_scores: bool = False) -> ScanResult:
    """Several checkpoints (TracIn): each row's score is the sum of its scores in every checkpoint's cache against
    that checkpoint's queries [G, K_c] (weights folded in). The caches hold the same rows in the same shards, so they
    are streamed shard by shard in lockstep (memory flat in N); each kept row's payload is its score per checkpoint.
    With keep_all_scores, all_scores holds every row's summed score (queries: the final model's)."""
    matrices = [q.to(device, torch.float32) for q in queries]
    result = new_scan([QueryGroup(whole=q) for q in matrices[0]], k, keep_all_scores, payload=len(streams))
    if keep_all_scores:
        result.queries = matrices[0].cpu()
    scorers = [ShardScorer(m) for m in matrices]
    for shard, parts in enumerate(zip(*streams, strict=True)):
        rows = parts[0][1]
        per_checkpoint = []
        for c, (vectors, other_rows) in enumerate(parts):
            if not torch.equal(other_rows, rows):
                raise CacheError(f"checkpoint caches: shard {shard} holds other rows in cache {c} than in cache 0")
            scores = scorers[c](vectors)
            per_checkpoint.append(scores)
            result.bytes_scanned += vectors.numel() * vectors.element_size()
        stacked = torch.stack(per_checkpoint, dim=2)  # [n, G, C]
        total = stacked.sum(2)
        result.rows_scanned += rows.numel()
        if keep_all_scores:
            result.all_rows = torch.cat([result.all_rows, rows.long()])
        _update_lists(result.whole, list(range(total.shape[1])), total, rows, stacked)
        if keep_all_scores:
            for g in range(total.shape[1]):
                result.all_scores[g] = torch.cat([result.all_scores[g], total[:, g].cpu()])
    return result
