"""kronfluence (a peer, installed by `make bench-peers` beside the venv) set up on this project's tokenised rows: the
loss on the response tokens (or on chosen target positions), rows padded per batch, the given Linear modules tracked.
Shared by the speed (peers.py) and quality (howdy.py --peers) benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def example(item, targets: list[int] | None = None) -> dict:
    """kronfluence's view of a row: its ids and labels (-100 outside the response, or outside `targets`, the
    positions whose token's prediction is scored, as rapidin's target weights)."""
    ids = torch.tensor(item.input_ids)
    labels = torch.full_like(ids, -100)
    keep = list(targets) if targets is not None else list(range(item.prompt_len, len(ids)))
    labels[keep] = ids[keep]
    return {"input_ids": ids, "labels": labels}


def collate_fn(pad: int):
    def collate(rows: list[dict]) -> dict:  # padded per batch, as rapidin's batches
        n = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": torch.full((len(rows), n), pad), "labels": torch.full((len(rows), n), -100),
               "attention_mask": torch.zeros(len(rows), n, dtype=torch.long)}
        for b, r in enumerate(rows):
            out["input_ids"][b, : len(r["input_ids"])] = r["input_ids"]
            out["labels"][b, : len(r["labels"])] = r["labels"]
            out["attention_mask"][b, : len(r["input_ids"])] = 1
        return out

    return collate


def causal_lm_task(modules: list[str]):
    """A kronfluence Task: summed next-token cross-entropy over the labelled positions (kronfluence's convention for
    language models); with sample=True, labels drawn from the model (its true-Fisher default)."""
    from kronfluence.task import Task

    class CausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]), 1).reshape(labels.shape)
                labels = torch.where(labels == -100, labels, drawn)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLMTask()
