"""A real model from a GGUF file (SmolLM2-135M-Instruct, `make smollm2`): LoRA gradients, chat data, cache."""

import json
import os
from pathlib import Path

import pytest
import torch

from rapidin import AttributeConfig, Generation, GradientConfig, SketchConfig, attribute, build_cache
from rapidin.data import load_examples, tokenize
from rapidin.gradients import GradientComputer
from rapidin.models import ModelRef, load_model
from tests.test_gradients import brute_force

GGUF = Path(os.environ.get("RAPIDIN_TEST_GGUF", Path(__file__).parents[1] / ".rapidin/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
pytestmark = pytest.mark.needs(GGUF.exists(), f"{GGUF} missing: run `make smollm2`")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A random (non-zero) LoRA adapter on q_proj/v_proj saved like a fine-tune would."""
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelRef(path=str(GGUF)), device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def smol(adapter_dir):
    return load_model(ModelRef(path=str(GGUF), adapter=adapter_dir, name="smollm2", version="test"), device="cpu")


def test_gguf_lora_batched_equals_loop(smol, tmp_path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("What is 2+2?", "4."), ("Name a colour.", "Blue is a colour."), ("Hi!", "Hello, how can I help?")]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, fmt = load_examples(str(data), tokenizer=smol.tokenizer)
    assert fmt == "chat" and "<|im_start|>assistant" in examples[0].prompt  # the model's own chat template
    computer = GradientComputer(smol, GradientConfig())
    # default tensors: the adapter (q, v) has no MLP layer, so every LoRA B matrix
    assert len(computer.layout) == 2 * 30 and all(".lora_B" in n for n, _ in computer.layout)
    items = [tokenize(smol.tokenizer, e.prompt, e.response, 64) for e in examples]
    batched = computer.gradients(items)
    # The sides sum in other orders (other matrix shapes: the library computes logits only at response positions),
    # and float32 backpropagation through 30 layers has no useful a-priori bound (the vocabulary reduction alone,
    # n = 49152 terms, allows n*u = 3e-3 of its absolute sum). What is kept is the fp16 cache: agreement within fp16's
    # unit roundoff 2^-11 leaves the stored vectors within one rounding, and any real defect (a wrong position,
    # mask or layer) is O(1). The exact check is test_gradients' float64 comparison on the tiny model.
    tolerance = 2.0**-11
    for b, item in enumerate(items):
        # independent of the hook code: Hugging Face's labels loss and autograd on the LoRA weights, one example
        reference = brute_force(smol, computer, item, hf_loss=True)
        assert float((batched[b] - reference).norm() / reference.norm()) < tolerance
        # and alone (batch 1)
        single = computer.gradients([item])[0]
        assert float((single - reference).norm() / reference.norm()) < tolerance
    manifest = build_cache(smol, str(data), tmp_path.as_uri(), sketch=SketchConfig(k=2**12), progress=False)
    assert manifest.sketch.d == computer.dim and manifest.model["adapter"]
    result = attribute(smol, [Generation(prompt="What is 2+2?", response="4.")], store_url=tmp_path.as_uri(),
                       config=AttributeConfig(top_k=3), progress=False)
    assert result.generations[0].helpful[0].row == 0  # the identical training row is the most helpful


def test_gguf_is_dequantised_once_and_reused(smol, monkeypatch):
    """The fixture's load converted the GGUF file once to a safetensors directory keyed by its sha256 (in the
    model cache, RAPIDIN_MODEL_CACHE_DIR: the tests' own, never the user's); later loads read that directory,
    without parsing the GGUF file again, and give the same weights and tokenizer."""
    from rapidin.models import _dequantised_gguf, default_cache_dir

    assert default_cache_dir() == os.environ["RAPIDIN_MODEL_CACHE_DIR"]
    converted = Path(_dequantised_gguf(str(GGUF), default_cache_dir()))
    assert converted.is_relative_to(Path(default_cache_dir()))
    assert (converted / ".complete").exists() and (converted / "model.safetensors").exists()
    written = (converted / "model.safetensors").stat().st_mtime_ns
    import transformers

    parse = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: (
        _fail("the GGUF file was parsed again") if kw.get("gguf_file") else parse(*a, **kw)))
    again = load_model(ModelRef(path=str(GGUF), adapter=smol.ref.adapter, name="smollm2", version="test"), device="cpu")
    assert (converted / "model.safetensors").stat().st_mtime_ns == written
    assert again.fingerprint == smol.fingerprint
    assert "<|im_start|>" in again.tokenizer.chat_template


def _fail(message: str):
    raise AssertionError(message)
