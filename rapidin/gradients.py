"""Per-example (and per-token) loss gradients in batches, layer-wise L2-normalised, fp32.

One forward and one backward per batch: forward hooks keep each attributed Linear layer's input
x[b, t, :], autograd gives the gradient of the summed per-example losses with respect to the layer's
output g[b, t, :], and example b's weight gradient is sum_t g[b, t]^T x[b, t] (examples do not
interact, so this equals a batch-1 loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .config import GradientConfig
from .data import Tokenized
from .models import LoadedModel, attributed_modules

if TYPE_CHECKING:
    from .precondition import Preconditioner
    from .sketch import KroneckerSketch


class GradientComputer:
    """Computes normalised, concatenated gradients of the attributed Linear weights."""

    def __init__(self, loaded: LoadedModel, config: GradientConfig, projector: KroneckerSketch | None = None,
                 preconditioner: Preconditioner | None = None) -> None:
        self.loaded = loaded
        self.config = config
        self.projector = projector  # set: gradients come out sketched, [B, K], never formed as [B, D] (unless
        self.preconditioner = preconditioner  # a preconditioner needs each layer's dense gradient: queries only)
        self.modules = attributed_modules(loaded.model, config.params, loaded.has_adapter, config.adapter_tensors)
        self._selected = {id(m.weight) for _, m in self.modules}
        self.layout = [(f"{name}.weight", tuple(m.weight.shape)) for name, m in self.modules]
        self.dim = sum(m.weight.numel() for _, m in self.modules)
        head = loaded.model.get_output_embeddings()
        # an attributed output layer needs its input at every position and per example, so it computes all logits
        self.trim_logits = head is not None and all(m is not head for _, m in self.modules)

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return self.loaded.device

    def gradients(self, items: Sequence[Tokenized], weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """[B, D] normalised gradients of each item's mean loss over its weighted target positions ([B, K] sketched
        ones with a projector; preconditioned first, with a preconditioner).

        weights[b][t] (optional) weighs the loss of predicting token t; default: response tokens.
        """
        inputs, grads_out, _ = self.layer_signals(items, weights)
        if self.projector is not None and self.preconditioner is None:
            return self.projector.project(inputs, grads_out, self.config.normalize)
        layers = [per_example_gradients(x, g) for x, g in zip(inputs, grads_out, strict=True)]
        if self.preconditioner is not None:
            layers = self.preconditioner.apply(layers)
        flat = self._assemble(layers)
        return flat if self.projector is None else self.projector.apply_dense(flat)

    def layer_signals(self, items: Sequence[Tokenized], weights: Sequence[torch.Tensor] | None = None,
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """One forward and one backward: each attributed layer's inputs x [B, T, i] and the gradients of the summed
        per-example losses at its outputs g [B, T, o], and the attention mask [B, T]."""
        ids, mask, loss_w = collate(items, self.loaded.tokenizer.pad_token_id or 0, self.device, weights)
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs.append(args[0].detach())
            outputs.append(out)

        saved = [(p, p.requires_grad) for p in self.loaded.model.parameters()]
        for p, _ in saved:
            p.requires_grad_(id(p) in self._selected)
        handles = [m.register_forward_hook(keep) for _, m in self.modules]
        try:
            loss = per_example_loss(self.loaded.model, ids, mask, loss_w, self.trim_logits).sum()
            grads_out = torch.autograd.grad(loss, outputs)
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved:
                p.requires_grad_(flag)
        return inputs, list(grads_out), mask

    @property
    def out_dim(self) -> int:
        """Width of what `gradients` returns: D, or K with a projector."""
        return self.dim if self.projector is None else self.projector.spec.config.k

    def _assemble(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """Per-example weight gradients [B, o, i], each tensor L2-normalised on its own, concatenated."""
        pieces = []
        for per_example in layers:
            per_example = per_example.flatten(1)
            if self.config.normalize:
                per_example = per_example / per_example.norm(dim=1, keepdim=True).clamp_min(1e-30)
            pieces.append(per_example)
        return torch.cat(pieces, dim=1)

    def token_gradients(self, item: Tokenized, positions: Sequence[int],
                        advance: Callable[[int], object] | None = None) -> torch.Tensor:
        """[len(positions), D]: the gradient of each single target token's loss (batched copies);
        `advance(n)` is called after each batch of n tokens (progress bars)."""
        rows = []
        for start in range(0, len(positions), self.config.batch_size):
            chunk = positions[start : start + self.config.batch_size]
            weights = [_one_hot(len(item.input_ids), t) for t in chunk]
            rows.append(self.gradients([item] * len(chunk), weights))
            if advance:
                advance(len(chunk))
        return torch.cat(rows) if rows else torch.zeros(0, self.out_dim, device=self.device)


def per_example_gradients(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, o, i]: example b's weight gradient sum_t g[b, t] x[b, t]^T, accumulated in at least fp32."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    return torch.einsum("bto,bti->boi", g.to(dtype), x.to(dtype))


def length_batches(items: Sequence[Tokenized], batch_size: int) -> list[list[int]]:
    """Indices of `items` in batches of similar length, so batches pad less (Hugging Face's group_by_length)."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def collate(
    items: Sequence[Tokenized], pad_id: int, device: torch.device, weights: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and per-position loss weights (default: response tokens)."""
    length = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    loss_w = torch.zeros((len(items), length), dtype=torch.float32)
    for b, it in enumerate(items):
        n = len(it.input_ids)
        ids[b, :n] = torch.tensor(it.input_ids)
        mask[b, :n] = 1
        if weights is None:
            loss_w[b, it.prompt_len : n] = 1.0
        else:
            loss_w[b, :n] = weights[b][:n]
    return ids.to(device), mask.to(device), loss_w.to(device)


def _one_hot(length: int, position: int) -> torch.Tensor:
    w = torch.zeros(length)
    w[position] = 1.0
    return w


def per_example_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, loss_w: torch.Tensor,
                     trim_logits: bool = True) -> torch.Tensor:
    """Weighted mean next-token cross-entropy per example (position t is predicted from t-1).

    With trim_logits the output layer runs only where a weighted token is predicted: the vocabulary projection is
    the largest matrix of a small LM (a fifth of SmolLM2-135M's forward), and the response is a third of a row.
    """
    rows, cols = (loss_w[:, 1:] != 0).nonzero(as_tuple=True)  # hidden state (row, col) predicts token col + 1
    with _logits_only_at(model, rows, cols, trim_logits) as trimmed:
        logits = model(input_ids=ids, attention_mask=mask).logits
    picked = logits[0] if trimmed else logits[rows, cols]
    log_probs = torch.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), dim=-1)
    token_nll = -log_probs.gather(-1, ids[rows, cols + 1, None]).squeeze(-1)
    summed = torch.zeros(ids.shape[0], dtype=token_nll.dtype, device=ids.device)
    summed = summed.index_add(0, rows, token_nll * loss_w[rows, cols + 1])
    return summed / loss_w[:, 1:].sum(1).clamp_min(1e-12)


@contextmanager
def _logits_only_at(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, enabled: bool) -> Iterator[bool]:
    """While active, the output layer sees only hidden[rows, cols] (as a [1, N, H] batch); yields whether it did."""
    head = model.get_output_embeddings() if enabled else None
    if head is None:
        yield False
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][rows, cols].unsqueeze(0), *args[1:]))
    try:
        yield True
    finally:
        handle.remove()
