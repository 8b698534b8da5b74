"""Batched per-example (and per-token) gradients equal a brute-force batch-1 autograd loop."""

import re

import pytest
import torch

from rapidin.config import GradientConfig
from rapidin.data import load_examples, tokenize
from rapidin.gradients import GradientComputer


def brute_force(loaded, computer, item, weights=None, hf_loss=False):
    """Independent of the library's collate and loss: one example, no padding, plain autograd on the attributed
    weights, per-tensor L2 normalisation. The loss is the mean next-token cross-entropy over the response (or over
    the positions whose weight is 1), either written out here with F.cross_entropy or, with hf_loss, Hugging Face's
    own `model(..., labels=...)` (which shifts the labels itself, but computes in float32 even for a float64 model)."""
    model = loaded.model
    params = dict(model.named_parameters())
    names = [name for name, _ in computer.layout]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    ids = torch.tensor([item.input_ids], device=loaded.device)
    labels = ids.clone()
    if weights is None:
        labels[0, : item.prompt_len] = -100
    else:
        labels[0, weights[: ids.shape[1]] == 0] = -100
    if hf_loss:
        loss = model(input_ids=ids, labels=labels).loss
    else:
        logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.cat([(g / g.norm()).flatten() for g in grads])


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def items_of(loaded, data, n=6, max_length=128):
    examples, _ = load_examples(data)
    return [tokenize(loaded.tokenizer, ex.prompt, ex.response, max_length) for ex in examples[:n]]


def test_batched_equals_loop_float64(tiny, toy_data):
    tiny.model.double()
    computer = GradientComputer(tiny, GradientConfig(batch_size=6))
    items = items_of(tiny, toy_data)
    assert len({len(it.input_ids) for it in items}) > 1  # padding is exercised
    batched = computer.gradients(items)
    for b, item in enumerate(items):
        assert relative_error(batched[b], brute_force(tiny, computer, item)) < 1e-10


def test_half_precision_on_cpu_attends_eagerly_with_the_same_math(tiny, tiny_dir, toy_data):
    """bfloat16 on a CPU loads eager attention (for speed); the math is the same: in float64 its batched gradients
    equal the default (SDPA) model's brute-force loop within float32's bound (eager attention takes its softmax in
    float32 whatever the model's dtype: u = 2^-24 over ~170-term reductions, as in the float32 test below)."""
    from rapidin.models import ModelRef, load_model

    half = load_model(ModelRef(path=tiny_dir, dtype="bfloat16"), device="cpu")
    assert half.model.config._attn_implementation == "eager"
    assert tiny.model.config._attn_implementation != "eager"
    tiny.model.double()
    half.model.double().load_state_dict(tiny.model.state_dict())  # the weights' bits lost in bfloat16
    items = items_of(tiny, toy_data)
    batched = GradientComputer(half, GradientConfig(batch_size=6)).gradients(items)
    computer = GradientComputer(tiny, GradientConfig())
    for b, item in enumerate(items):
        assert relative_error(batched[b], brute_force(tiny, computer, item)) < 1e-5


def test_batched_equals_loop_float32(tiny, toy_data):
    computer = GradientComputer(tiny, GradientConfig())
    items = items_of(tiny, toy_data)
    batched = computer.gradients(items)
    for b, item in enumerate(items):
        # float32 (u = 2^-24 ~ 6e-8) through reductions of ~100 terms: ~1e-5 relative is n*u for n ~ 170
        assert relative_error(batched[b], brute_force(tiny, computer, item, hf_loss=True)) < 1e-5


def test_layer_normalisation_and_layout(tiny, toy_data):
    computer = GradientComputer(tiny, GradientConfig())
    grads = computer.gradients(items_of(tiny, toy_data, n=2))
    offset = 0
    for _, shape in computer.layout:
        n = int(torch.tensor(shape).prod())
        assert torch.allclose(grads[:, offset : offset + n].norm(dim=1), torch.ones(2), atol=1e-5)
        offset += n
    assert offset == computer.dim == grads.shape[1]
    # embeddings are not Linear; lm_head is untied here and attributed
    assert any(name.startswith("lm_head") for name, _ in computer.layout)


def test_lora_adapter_batched_equals_loop(tiny, toy_data):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tiny.model = get_peft_model(tiny.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tiny.model.double().eval()
    tiny.has_adapter = True
    computer = GradientComputer(tiny, GradientConfig.paper())
    assert all(".lora_" in name for name, _ in computer.layout) and len(computer.layout) == 8
    items = items_of(tiny, toy_data, n=4)
    batched = computer.gradients(items)
    for b, item in enumerate(items):
        assert relative_error(batched[b], brute_force(tiny, computer, item)) < 1e-10


@pytest.mark.parametrize(("modules", "tensors", "expected"), [
    (["q_proj", "v_proj", "gate_proj", "down_proj"], "mlp_b", {"gate_proj.lora_B", "down_proj.lora_B"}),
    (["q_proj", "v_proj"], "mlp_b", {"q_proj.lora_B", "v_proj.lora_B"}),  # no MLP layer adapted: every LoRA B
    (["q_proj", "gate_proj"], "b", {"q_proj.lora_B", "gate_proj.lora_B"}),
    (["q_proj", "gate_proj"], "all", {"q_proj.lora_A", "q_proj.lora_B", "gate_proj.lora_A", "gate_proj.lora_B"}),
])
def test_adapter_tensor_sets(tiny, modules, tensors, expected):
    from peft import LoraConfig, get_peft_model

    tiny.model = get_peft_model(tiny.model, LoraConfig(r=2, target_modules=modules))
    tiny.has_adapter = True
    layout = GradientComputer(tiny, GradientConfig(adapter_tensors=tensors)).layout
    short = {re.sub(r"^.*\.(\w+_proj)\.(lora_[AB]).*$", r"\1.\2", name) for name, _ in layout}
    assert short == expected and len(layout) == 2 * len(expected)  # two layers


def test_param_patterns_select_tensors(tiny):
    computer = GradientComputer(tiny, GradientConfig(params=(r"mlp\.down_proj",)))
    assert [name for name, _ in computer.layout] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]


def test_token_gradients_equal_single_token_losses(tiny, toy_data):
    tiny.model.double()
    computer = GradientComputer(tiny, GradientConfig(batch_size=3))
    item = items_of(tiny, toy_data, n=1)[0]
    positions = list(range(item.prompt_len, len(item.input_ids)))
    batched = computer.token_gradients(item, positions)
    assert batched.shape == (len(positions), computer.dim)
    for row, t in enumerate(positions):
        w = torch.zeros(len(item.input_ids))
        w[t] = 1.0
        assert relative_error(batched[row], brute_force(tiny, computer, item, w)) < 1e-10


def test_target_restricted_loss(tiny, toy_data):
    tiny.model.double()
    computer = GradientComputer(tiny, GradientConfig())
    item = items_of(tiny, toy_data, n=1)[0]
    w = torch.zeros(len(item.input_ids))
    w[[item.prompt_len, item.prompt_len + 2]] = 1.0
    got = computer.gradients([item], [w])[0]
    assert relative_error(got, brute_force(tiny, computer, item, w)) < 1e-10
    assert relative_error(got, computer.gradients([item])[0]) > 1e-3  # differs from the whole-response loss


def test_finetune_reports_each_finished_epoch(tiny, toy_data):
    """on_epoch fires once per full pass, with the model in eval mode, for the multi-checkpoint TracIn sum."""
    from rapidin.finetune import FinetuneConfig, finetune

    examples, _ = load_examples(toy_data)
    seen = []
    finetune(tiny, examples[:24], FinetuneConfig(epochs=3, batch_size=8, max_length=64), progress=False,
             on_epoch=lambda epoch, model: seen.append((epoch, model.training)))
    assert seen == [(1, False), (2, False), (3, False)]


def test_kept_checkpoints_default_to_the_epoch_nearest_40_percent():
    """The default TracIn checkpoint (measured on the Howdy benchmark: epoch 2 of 5); explicit lists win; () keeps
    none; a checkpoint must end before the last epoch."""
    from pydantic import ValidationError

    from rapidin.finetune import FinetuneConfig

    rule = {epochs: FinetuneConfig(epochs=epochs).checkpoint_epochs() for epochs in (0.5, 1, 2, 3, 5, 10, 30)}
    assert rule == {0.5: (), 1: (), 2: (1,), 3: (1,), 5: (2,), 10: (4,), 30: (12,)}
    assert FinetuneConfig(epochs=5, keep_checkpoints=(1, 3)).checkpoint_epochs() == (1, 3)
    assert FinetuneConfig(epochs=5, keep_checkpoints=()).checkpoint_epochs() == ()
    with pytest.raises(ValidationError, match="before the last"):
        FinetuneConfig(epochs=2, keep_checkpoints=(2,))
