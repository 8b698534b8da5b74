"""Model references and loading: HF directory, GGUF file, LoRA adapter, fsspec URL."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import ModelError
from .urls import check_url

ModelDtype = Literal["float32", "bfloat16", "float16"]
_REMOTE = re.compile(r"^[a-z][a-z0-9+]*://")


class ModelRef(BaseModel):
    """Where a model lives and how to load it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="HF model directory, .gguf file, or fsspec URL of either.")
    adapter: str | None = Field(None, description="PEFT/LoRA adapter directory (or URL) applied on top.")
    name: str | None = Field(None, description="Model name in the store (default: from the path).")
    version: str | None = Field(None, description="Model version in the store (default: fingerprint prefix).")
    dtype: ModelDtype = Field("float32", description="Weights dtype on the device.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (off unless asked).")

    def display_name(self) -> str:
        """Store-safe model name."""
        raw = self.name or Path(self.path.rstrip("/")).name.removesuffix(".gguf") or "model"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", raw)


@dataclass
class LoadedModel:
    """A model on its device with tokenizer, identity and whether an adapter is applied."""

    model: Any
    tokenizer: Any
    ref: ModelRef
    fingerprint: str
    has_adapter: bool
    device: torch.device

    @property
    def name(self) -> str:
        """Model name used in the store and in tracking."""
        return self.ref.display_name()

    @property
    def version(self) -> str:
        """Model version used in the store and in tracking."""
        return self.ref.version or self.fingerprint[:12]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; validates cuda:N."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device: unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device: '{device}' requested but CUDA is not available on this machine")
    return dev


def default_cache_dir() -> str:
    """Where local copies of remote models and dequantised GGUF files go: RAPIDIN_MODEL_CACHE_DIR (Settings)."""
    from .settings import Settings

    return Settings().model_cache_dir


def localize(path: str, cache_dir: str | None = None, storage_options: dict | None = None) -> str:
    """Copy a remote (fsspec URL) model file or directory to a local cache dir; local paths pass through."""
    check_url(path, "model", ModelError)
    cache_dir = cache_dir or default_cache_dir()
    if not _REMOTE.match(path) or path.startswith("file://"):
        return path.removeprefix("file://")
    target = Path(os.path.expanduser(cache_dir)) / hashlib.sha256(path.encode()).hexdigest()[:16]
    done = target / ".complete"
    if not done.exists():
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        try:
            is_dir = fs.isdir(root)
            target.mkdir(parents=True, exist_ok=True)
            if is_dir:
                fs.get(root.rstrip("/") + "/", str(target) + "/", recursive=True)
            else:
                fs.get(root, str(target / Path(root).name))
        except FileNotFoundError:
            raise ModelError(f"{path}: model not found") from None
        except OSError as exc:
            raise ModelError(f"{path}: cannot fetch model ({type(exc).__name__}: {exc})") from None
        done.touch()
    files = [p for p in target.iterdir() if p.name != ".complete"]
    return str(files[0]) if len(files) == 1 and files[0].suffix == ".gguf" else str(target)


def load_model(
    ref: ModelRef, device: str = "auto", storage_options: dict | None = None, cache_dir: str | None = None
) -> LoadedModel:
    """Load tokenizer + causal LM (+ adapter) onto a device, in eval mode, with a weight fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_dir or default_cache_dir()

    dev = resolve_device(device)
    local = localize(ref.path, cache_dir, storage_options)
    if not os.path.exists(local):
        raise ModelError(f"{ref.path}: model path does not exist")
    kwargs: dict[str, Any] = {"trust_remote_code": ref.trust_remote_code}
    directory = local
    try:
        if local.endswith(".gguf"):
            directory = _dequantised_gguf(local, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, ref.dtype),
                                                     **_attention(ref.dtype, dev), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{ref.path}: cannot load model ({_first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if ref.adapter:
        model = _apply_adapter(model, localize(ref.adapter, cache_dir, storage_options), ref.adapter)
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, ref, model_fingerprint(model, tokenizer), bool(ref.adapter), dev)


def _dequantised_gguf(path: str, cache_dir: str) -> str:
    """Transformers re-parses a GGUF file on every load (tens of seconds even for 135M parameters), so convert it
    once to a safetensors directory under cache_dir, keyed by the file's sha256, and load that from then on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    target = Path(cache_dir).expanduser() / "gguf" / digest.hexdigest()[:32]
    if (target / ".complete").exists():
        return str(target)
    parent, name = str(Path(path).parent), Path(path).name
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    AutoTokenizer.from_pretrained(parent, gguf_file=name).save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantised: save them as plain float32
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(tmp)
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, target)  # atomic: a concurrent loader either sees the whole directory or none
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _attention(dtype: str, device: torch.device) -> dict[str, str]:
    """Half precision on a CPU attends eagerly: PyTorch's CPU flash-attention backward in bfloat16 cost 4x its
    float32 time in a SmolLM2 gradient pass (0.62 against 0.14 s), eager matmuls run on the CPU's bf16 units."""
    return {"attn_implementation": "eager"} if dtype != "float32" and device.type == "cpu" else {}


def _apply_adapter(model: Any, local: str, shown: str) -> Any:
    from peft import PeftModel

    if not os.path.exists(os.path.join(local, "adapter_config.json")):
        raise ModelError(f"{shown}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, local, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"{shown}: adapter does not fit the base model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def model_fingerprint(model: Any, tokenizer: Any) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes) and the tokenizer vocabulary."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(repr(vocab).encode())
    return digest.hexdigest()[:32]


# Feed-forward sublayers across architectures: Llama/Mistral/Qwen/Gemma/GPT-2/NeoX `mlp`, OPT `fc1`/`fc2`,
# Mixtral `experts`, T5 `DenseReluDense`, Falcon/others `feed_forward`/`ffn`.
MLP_MODULE = re.compile(r"(^|\.)(mlp|feed_forward|ffn|fc1|fc2|experts|DenseReluDense)(\.|$)")


def attributed_modules(model: Any, patterns: tuple[str, ...], has_adapter: bool,
                       adapter_tensors: str = "all") -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear modules whose weights are attributed (see GradientConfig.params and .adapter_tensors)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linears = [
        (name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied
    ]
    if patterns:
        regexes = [re.compile(p) for p in patterns]
        chosen = [(n, m) for n, m in linears if any(r.search(n + ".weight") for r in regexes)]
        what = f"the patterns {list(patterns)}"
    elif has_adapter:
        chosen = [(n, m) for n, m in linears if ".lora_" in n]
        what = "the adapter (no lora_ Linear layers)"
        if adapter_tensors != "all":
            chosen = [(n, m) for n, m in chosen if ".lora_B" in n]
        if adapter_tensors == "mlp_b":  # falls back to every LoRA B when the adapter has no feed-forward layer
            chosen = [(n, m) for n, m in chosen if MLP_MODULE.search(n)] or chosen
    else:
        chosen, what = linears, "the model (no nn.Linear layers)"
    if not chosen:
        raise ModelError(f"no attributed parameters match {what}")
    return chosen
