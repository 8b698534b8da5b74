"""Which response tokens the generation's loss is restricted to (RapidIn-TW): given words, or chosen
automatically; plus the prompt template and greedy generation the queries need."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import GradientConfig
from .data import Tokenized, alpaca_prompt
from .gradients import GradientComputer
from .models import LoadedModel


def format_prompt(loaded: LoadedModel, prompt: str, fmt: str) -> str:
    """Apply the training data's prompt template to a user prompt."""
    if fmt == "alpaca":
        return alpaca_prompt(prompt)
    if fmt == "chat":
        return loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
    return prompt


def generate(loaded: LoadedModel, prompt_text: str, max_new_tokens: int) -> str:
    """Greedy decoding of a response to an already templated prompt."""
    enc = loaded.tokenizer(prompt_text, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def target_positions(loaded: LoadedModel, item: Tokenized, targets: Sequence[str]) -> list[int]:
    """Response token positions whose text overlaps any target word (case-insensitive)."""
    tok = loaded.tokenizer
    ids = item.input_ids[item.prompt_len:]
    ends = [len(tok.decode(ids[: j + 1])) for j in range(len(ids))]
    text = tok.decode(ids).lower()
    spans = []
    for word in targets:
        w, start = word.lower().strip(), 0
        while w and (hit := text.find(w, start)) >= 0:
            spans.append((hit, hit + len(w)))
            start = hit + 1
    positions = []
    for j, end in enumerate(ends):
        begin = ends[j - 1] if j else 0
        if any(begin < b and a < end for a, b in spans):
            positions.append(item.prompt_len + j)
    return positions


def _candidate_positions(loaded: LoadedModel, item: Tokenized) -> list[int]:
    """Response positions that were generated: all of them but a trailing EOS that tokenize() appended."""
    positions = list(range(item.prompt_len, len(item.input_ids)))
    eos = loaded.tokenizer.eos_token_id
    if len(positions) > 1 and not item.truncated and eos is not None and item.input_ids[-1] == eos:
        positions.pop()
    return positions


def response_log_probs(model, item: Tokenized, device: torch.device) -> torch.Tensor:
    """log p(token t | tokens < t) for every position t >= 1 of the item (entry t-1), fp32."""
    ids = torch.tensor([item.input_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def auto_target_positions(
    loaded: LoadedModel, item: Tokenized, n: int, gradient: GradientConfig | None = None
) -> tuple[list[int], str]:
    """Pick n response positions to restrict the generation's loss to, without knowing the answer.

    With an adapter (a PEFT model with `disable_adapter`): the n generated tokens whose log-probability
    the fine-tune raised most, log p_adapter(t) - log p_base(t). Without one (fallback): the n tokens
    whose own loss gradient (attributed parameters, not normalised) has the largest L2 norm; this costs
    one backward per response token. A trailing EOS that tokenize() appended is never picked. Ties go
    to the earlier position. Returns (sorted positions in item.input_ids, the rule used).
    """
    candidates = _candidate_positions(loaded, item)
    if n >= len(candidates):
        return candidates, "all"
    model = loaded.model
    if loaded.has_adapter and hasattr(model, "disable_adapter"):
        tuned = response_log_probs(model, item, loaded.device)
        with model.disable_adapter():
            base = response_log_probs(model, item, loaded.device)
        gain = (tuned - base).cpu()
        key = [float(gain[t - 1]) for t in candidates]
        rule = "logprob_gain"
    else:
        config = (gradient or GradientConfig()).model_copy(update={"normalize": False})
        grads = GradientComputer(loaded, config).token_gradients(item, candidates)
        key = grads.norm(dim=1).tolist()
        rule = "grad_norm"
    order = sorted(range(len(candidates)), key=lambda j: (-key[j], j))[:n]
    return sorted(candidates[j] for j in order), rule
