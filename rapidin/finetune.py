"""Fine-tuning (full or LoRA) with the same tokenization and loss masking that attribution uses."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from .data import Example, tokenize
from .gradients import collate, per_example_loss
from .models import LoadedModel


class LoraSettings(BaseModel):
    """LoRA adapter shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


class FinetuneConfig(BaseModel):
    """Training options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(256, ge=2)
    seed: int = 0
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    keep_checkpoints: tuple[int, ...] | None = Field(
        None, description="Epochs after which the model (the adapter, for LoRA) is kept as a checkpoint, for "
        "attributions that sum over checkpoints (TracIn, the attribute flow's default); each must end before the "
        "last epoch. None: the epoch nearest 40% of training (epoch 2 of 5; none under 2 epochs), chosen on the "
        "Howdy benchmark; []: keep none.")

    @model_validator(mode="after")
    def _checkpoints_inside_training(self) -> FinetuneConfig:
        kept = self.keep_checkpoints or ()
        bad = [e for e in kept if not 1 <= e < self.epochs]
        if bad:
            raise ValueError(f"keep_checkpoints {bad}: each must be an epoch from 1 to before the last ({self.epochs:g})")
        if len(set(kept)) != len(kept):
            raise ValueError(f"keep_checkpoints {list(kept)}: repeated epoch")
        return self

    def checkpoint_epochs(self) -> tuple[int, ...]:
        """The epochs whose checkpoints are kept (keep_checkpoints, or the default rule when it is None)."""
        if self.keep_checkpoints is not None:
            return self.keep_checkpoints
        epoch = round(0.4 * self.epochs)
        return (epoch,) if 1 <= epoch < self.epochs else ()

    def steps(self, rows: int) -> int:
        """Optimizer steps of a run over `rows` training rows."""
        return max(1, int(self.epochs * rows / self.batch_size))

    def epoch_learning_rates(self, rows: int) -> dict[int, float]:
        """Mean learning rate of the steps of each epoch (1-based; the last may be partial): TracIn's weight of the
        checkpoint that epoch ends at."""
        steps = self.steps(rows)
        per_epoch: dict[int, list[float]] = {}
        for step in range(steps):  # the schedule below: linear decay from lr to 0
            per_epoch.setdefault(step * self.batch_size // rows + 1, []).append(self.lr * (1.0 - step / steps))
        return {epoch: sum(v) / len(v) for epoch, v in per_epoch.items()}


def finetune(loaded: LoadedModel, examples: list[Example], config: FinetuneConfig, progress: bool = True,
             on_epoch: Callable[[int, torch.nn.Module], None] | None = None) -> LoadedModel:
    """Train in place (AdamW, response-only loss) and return the model (wrapped with PEFT for LoRA).

    ``on_epoch(epoch, model)`` is called after each full pass over the data (epochs counted from 1), e.g. to save
    the checkpoints that a multi-checkpoint TracIn sum needs.
    """
    torch.manual_seed(config.seed)
    model = loaded.model
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=0.0,
                          target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    items = [tokenize(loaded.tokenizer, ex.prompt, ex.response, config.max_length) for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.steps(len(items))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    rng = random.Random(config.seed)
    order: list[int] = []
    model.train()
    for step in tqdm(range(steps), desc="fine-tune", disable=not progress):
        if len(order) < config.batch_size:
            order += rng.sample(range(len(items)), len(items))
        batch = [items[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        ids, mask, loss_w = collate(batch, loaded.tokenizer.pad_token_id or 0, loaded.device)
        loss = per_example_loss(model, ids, mask, loss_w).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        epoch = (step + 1) * config.batch_size // len(items)  # full passes over the data so far
        if on_epoch is not None and epoch > step * config.batch_size // len(items):
            model.eval()
            on_epoch(epoch, model)
            model.train()
    model.eval()
    loaded.model = model
    loaded.has_adapter = config.lora is not None
    return loaded


def save(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Save the model (or just the adapter, for LoRA) with its tokenizer."""
    out_dir = Path(out_dir)
    loaded.model.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)
    return out_dir
