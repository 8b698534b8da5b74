"""Streaming top-k equals a brute-force ranking; partial scans merge exactly."""

import torch

from rapidin.retrieval import KINDS, QueryGroup, ScanResult, scan


def shards_of(vectors, bounds):
    return [(vectors[a:b], torch.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def brute(scores, kind, k):
    """Sort rows by the kind's key, ties by row number."""
    key = {"helpful": scores, "harmful": -scores, "influential": scores.abs()}[kind]
    order = sorted(range(len(scores)), key=lambda r: (-float(key[r]), r))[:k]
    return order, scores[order]


def make(n=300, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, dim, generator=gen).half()
    vectors[50] = vectors[10]  # exact ties
    vectors[51] = -vectors[10]
    groups = [QueryGroup(torch.randn(dim, generator=gen), torch.randn(4, dim, generator=gen)), QueryGroup(vectors[10].float())]
    return vectors, groups


def test_scan_equals_brute_force():
    vectors, groups = make()
    result = scan(shards_of(vectors, [0, 100, 170, 300]), groups, k=7)
    for g, group in enumerate(groups):
        exact = vectors.float() @ group.whole
        for kind in KINDS:
            rows, scores = brute(exact, kind, 7)
            top = result.whole[g][kind]
            assert top.rows[:, 0].tolist() == rows
            assert torch.allclose(top.scores[:, 0], scores)
            if group.tokens is not None:  # payload = per-token scores of the kept rows
                assert torch.allclose(top.payload[:, 0], vectors[rows].float() @ group.tokens.T, atol=1e-5)
        if group.tokens is not None:
            for j in range(group.tokens.shape[0]):
                rows, _ = brute(vectors.float() @ group.tokens[j], "helpful", 7)
                assert result.tokens[g]["helpful"].rows[:, j].tolist() == rows
    assert result.whole[1]["helpful"].rows[:2, 0].tolist() == [10, 50]  # tie broken by row number
    assert result.rows_scanned == 300 and result.bytes_scanned == vectors.numel() * 2


def test_merge_of_partial_scans_equals_one_scan():
    vectors, groups = make(seed=3)
    bounds = [0, 40, 90, 150, 210, 300]
    shards = shards_of(vectors, bounds)
    whole = scan(shards, groups, k=9)
    parts = [scan(shards[i::2], groups, k=9) for i in range(2)] + [scan([], groups, k=9)]
    merged = parts[0].merge(ScanResult.from_bytes(parts[1].to_bytes())).merge(parts[2])
    for g in range(len(groups)):
        for kind in KINDS:
            assert torch.equal(merged.whole[g][kind].rows, whole.whole[g][kind].rows)
            assert torch.equal(merged.whole[g][kind].scores, whole.whole[g][kind].scores)
            if whole.whole[g][kind].payload is not None:
                assert torch.equal(merged.whole[g][kind].payload, whole.whole[g][kind].payload)
    assert torch.equal(merged.tokens[0]["harmful"].rows, whole.tokens[0]["harmful"].rows)
    assert merged.rows_scanned == 300


def test_all_scores_cover_every_row():
    vectors, groups = make()
    result = scan(shards_of(vectors, [0, 123, 300]), groups, k=3, keep_all_scores=True)
    assert result.all_rows.tolist() == list(range(300))
    assert torch.allclose(result.all_scores[0], vectors.float() @ groups[0].whole, atol=1e-4)
