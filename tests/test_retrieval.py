"""Streaming top-k equals a brute-force ranking; partial scans merge exactly."""

import itertools

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
    # generations with equal token counts (or none) are merged side by side: families of 2, 2 and 1 here
    groups = [QueryGroup(torch.randn(dim, generator=gen), torch.randn(4, dim, generator=gen)),
              QueryGroup(vectors[10].float()), QueryGroup(torch.randn(dim, generator=gen)),
              QueryGroup(torch.randn(dim, generator=gen), torch.randn(2, dim, generator=gen)),
              QueryGroup(torch.randn(dim, generator=gen), torch.randn(4, dim, generator=gen))]
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
            for j, kind in itertools.product(range(group.tokens.shape[0]), KINDS):
                rows, _ = brute(vectors.float() @ group.tokens[j], kind, 7)
                assert result.tokens[g][kind].rows[:, j].tolist() == rows
        else:
            assert result.tokens[g] is None
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
    for g in (0, 3, 4):
        assert torch.equal(merged.tokens[g]["harmful"].rows, whole.tokens[g]["harmful"].rows)
    assert merged.rows_scanned == 300


def test_all_scores_cover_every_row():
    vectors, groups = make()
    result = scan(shards_of(vectors, [0, 123, 300]), groups, k=3, keep_all_scores=True)
    assert result.all_rows.tolist() == list(range(300))
    assert torch.allclose(result.all_scores[0], vectors.float() @ groups[0].whole, atol=1e-4)


def test_blocked_fp16_scores_are_float32_dot_products(monkeypatch):
    """The CPU path converts an fp16 shard a block of rows at a time (blocks forced to 3 rows here, so a shard spans
    several, one of them partial; one query and several): every score must be within float32's dot-product error
    bound of the exact (float64) score, |fl(v.q) - v.q| <= gamma_K * sum|v_i q_i|, gamma_K = K u / (1 - K u),
    u = 2^-24."""
    import rapidin.retrieval as retrieval

    k = 1000
    monkeypatch.setattr(retrieval, "BLOCK_BYTES", 3 * 4 * k)
    monkeypatch.setattr(retrieval, "MIN_BLOCK_ROWS", 3)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(11, k, generator=gen).half()
    u = 2.0**-24
    for n_queries in (1, 4):
        queries = torch.randn(n_queries, k, generator=gen)
        scores, buffer = retrieval.shard_scores(vectors, queries, torch.empty(0))
        exact = vectors.double() @ queries.double().T
        bound = (k * u / (1 - k * u)) * (vectors.double().abs() @ queries.double().abs().T)
        assert scores.dtype == torch.float32 and scores.shape == (11, n_queries) and buffer.numel() == 3 * k
        assert ((scores.double() - exact).abs() <= bound).all()
        again, _ = retrieval.shard_scores(vectors, queries, buffer)  # the buffer is reused, results unchanged
        assert torch.equal(again, scores)


def test_top_k_under_heavy_ties_equals_brute_force():
    """Scores from a handful of values, so nearly every shard has ties at its k-th key: the pre-selection of k new
    rows per column must then leave the choice to the exact merge (ties to the lower row), in every kind."""
    from rapidin.retrieval import TopK

    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 4, (200, 5), generator=gen).float()
    scores[:, 4] = torch.arange(200).float()  # a column without ties: the pre-selected path
    for kind in KINDS:
        top = TopK.empty(kind, 6, 5, 2)
        for a, b in [(0, 64), (64, 130), (130, 200)]:
            payload = torch.stack([scores[a:b], -scores[a:b]], dim=2)
            top = top.update(scores[a:b], torch.arange(a, b), payload)
        for col in range(5):
            rows, want = brute(scores[:, col], kind, 6)
            assert top.rows[:, col].tolist() == rows and torch.equal(top.scores[:, col], want), (kind, col)
            assert torch.equal(top.payload[:, col, 1], -want)
