"""Backdoor-retrieval metrics under the protocol of the RapidIn paper and RISE (data/howdy README)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (higher score = predicted positive)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(float)
    if hits.sum() == 0:
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC via the rank-sum statistic, ties counted half; 0.5 when one class is absent."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def backdoor_metrics(scores: np.ndarray, rows: np.ndarray, positive: Sequence[bool], ks: Sequence[int] = (5, 10, 50)) -> dict:
    """auPRC, auROC over the K highest + K lowest rows, and precision over the K highest, for each K."""
    labels = np.asarray(positive, dtype=bool)[np.asarray(rows)]
    order = np.argsort(-np.asarray(scores), kind="stable")
    out = {}
    for k in ks:
        if 2 * k > len(order):
            continue
        chosen = np.concatenate([order[:k], order[-k:]])
        out[f"auprc@{k}"] = average_precision(scores[chosen], labels[chosen])
        out[f"auroc@{k}"] = roc_auc(scores[chosen], labels[chosen])
        out[f"precision@{k}"] = float(labels[order[:k]].mean())
    return out


TOP_LIST_METRICS = ("precision@k: share of poisoned rows among the top-k influential (|score|) rows; "
                    "AP@k: their average precision (1.0 = every poisoned row in the list ranks above every clean one)")


def top_list_metrics(poisoned_in_rank_order: Sequence[bool]) -> dict:
    """The demos' one metric, computable from a result's `influential` list alone (see TOP_LIST_METRICS)."""
    flags = np.asarray(poisoned_in_rank_order, dtype=float)
    k = len(flags)
    if k == 0:
        return {}
    precision_at = np.cumsum(flags) / np.arange(1, k + 1)
    ap = float((precision_at * flags).sum() / flags.sum()) if flags.sum() else 0.0
    return {f"precision@{k}": float(flags.mean()), f"AP@{k}": ap}
