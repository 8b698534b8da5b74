"""Validated, frozen option sets. Anything here that changes the numbers goes into the cache id."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

SketchMethod = Literal["rapidgrad", "kronecker"]
StorageDtype = Literal["float16", "bfloat16", "float32", "int8"]


class SketchConfig(BaseModel):
    """RapidGrad compression: K output dims, lam shuffle rounds, a seed, and the stored dtype."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: SketchMethod = Field("rapidgrad", description="Compression method: rapidgrad (the paper's: shuffles, "
                                 "signs and block sums of the whole [D] gradient, which each example then needs in "
                                 "memory) or kronecker (LoGra-style: each layer's gradient projected by two small "
                                 "random +-1 factors without forming it; memory flat in D, for full-parameter models).")
    k: int = Field(2**16, ge=1, le=2**24, description="Compressed dimension K (paper default 2^16); at most D.")
    lam: int = Field(20, ge=0, le=1000, description="Shuffle rounds λ (paper default 20; rapidgrad only).")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed; the same seed rebuilds the same map anywhere.")
    dtype: StorageDtype = Field("float16", description="Storage dtype of cached vectors (paper: fp16); int8: "
                                "half the bytes, each row rounded to 255 levels of its own scale (max |entry| / 127).")


class GradientConfig(BaseModel):
    """How per-example loss gradients are taken."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: tuple[str, ...] = Field(
        (),
        description="Regexes selecting attributed parameter names; empty = the adapter's tensors chosen by "
        "`adapter_tensors` if an adapter is loaded, else every nn.Linear weight not tied to an embedding.",
    )
    adapter_tensors: Literal["mlp_b", "b", "all"] = Field(
        "mlp_b",
        description="Adapter tensors attributed when `params` is empty: 'mlp_b' the LoRA B matrices of the "
        "feed-forward (MLP) layers, the measured best at finding the rows behind a behaviour "
        "(benchmarks/README_quality.md; falls back to 'b' when the adapter has no MLP layer); 'b' every LoRA B; "
        "'all' every LoRA tensor, as in the RapidIn paper.",
    )
    normalize: bool = Field(True, description="L2-normalise each parameter tensor's gradient (layer-wise).")
    max_length: int = Field(512, ge=2, le=2**17, description="Tokens per example; longer rows are truncated.")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per forward/backward pass. A resumed build keeps "
                            "the batch size it started with, so its bytes equal an uninterrupted build's.")

    @classmethod
    def paper(cls, **options) -> GradientConfig:
        """The RapidIn paper's choice: every adapter tensor (A and B of every adapted layer)."""
        return cls(**{"adapter_tensors": "all", **options})

    def fingerprint_fields(self) -> dict:
        """Fields that change the cached numbers (batch size does not)."""
        return self.model_dump(exclude={"batch_size"})


class BuildConfig(BaseModel):
    """How a cache build is cut into work: these do not change the cached numbers, only the unit of commit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard_rows: int = Field(256, ge=1, le=2**20, description="Rows per shard: the unit of commit, resume and scan. "
                            "A resumed build keeps the value the cache was started with.")
    skip_bad_rows: bool = Field(False, description="Skip (and count) rows with no response tokens instead of failing.")
    preconditioners: tuple[Literal["diagonal", "ekfac"], ...] = Field(
        (), description="Preconditioners to fit from the training rows once the cache is complete (stored beside "
        "it; attributions choose one with --preconditioner): diagonal (one more gradient pass) and/or ekfac (two).")

DEFAULT_AUTO_TARGET = 4  # benchmarks/README_quality.md: the measured best automatic target size on the Howdy backdoor


class AttributeConfig(BaseModel):
    """Retrieval options. The defaults answer "which training rows caused this generation?" as measured best on the
    Howdy backdoor (automatic target tokens; read the `influential` list); `AttributeConfig.paper()` (the form's `paper_scoring`) is the
    RapidIn paper's exact behaviour (the whole generation's loss; read the `helpful` list)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(20, ge=1, le=100_000, description="Rows kept per list.")
    token_wise: bool = Field(False, description="Also score each generated token and each top row's tokens.")
    train_token_rows: int = Field(5, ge=0, le=1000, description="Top rows of each list whose own tokens get scored "
                                  "(token-wise mode).")
    target: tuple[str, ...] = Field((), description="Restrict the generation's loss to these words (RapidIn-TW).")
    auto_target: int = Field(
        DEFAULT_AUTO_TARGET, ge=0, le=2**16,
        description="RapidIn-TW without knowing the answer: restrict the generation's loss to N automatically "
        "chosen response tokens (0 = the whole generation, as in the paper). With an adapter: the N tokens whose "
        "log-probability the fine-tune raised most (adapter on vs off); without one: the N tokens with the largest "
        "per-token loss-gradient norm. Off when `target` words are given.",
    )
    max_new_tokens: int = Field(64, ge=1, le=2**16, description="Tokens to generate when no response is given.")
    verify: bool = Field(False, description="Re-check every shard's SHA-256 while scanning (about 1.2 GB/s on one "
                         "core, 6x slower than the scan itself). Off, each shard's size and header are checked "
                         "against its commit record; checksums are verified when a build resumes and by "
                         "`rapidin inspect`.")
    preconditioner: Literal["none", "diagonal", "ekfac"] = Field(
        "none", description="Curvature applied to the generation's gradient before it is sketched: none (the paper's "
        "plain inner product), diagonal (the training gradients' second moment per weight) or ekfac (Kronecker-"
        "factored, eigenvalue-corrected, per layer). Fitted once per cache: `rapidin cache --preconditioners ...` or "
        "the cache flow's `preconditioners`.")
    paper_scoring: bool = Field(False, description="The RapidIn paper's scoring: the whole generation's loss (auto_target 0; "
                        "read the helpful list). Cannot be combined with auto_target.")

    @model_validator(mode="before")
    @classmethod
    def _one_target_kind(cls, data):
        if not isinstance(data, dict):
            return data
        if data.get("paper_scoring"):
            if data.get("auto_target"):
                raise ValueError("the paper's scoring uses the whole generation: it cannot be combined with auto_target")
            if data.get("preconditioner", "none") != "none":
                raise ValueError("the paper's scoring has no preconditioner: it cannot be combined with preconditioner")
            data = {**data, "auto_target": 0}
        if data.get("target"):
            if data.get("auto_target"):
                raise ValueError("give either target words or auto_target, not both")
            data = {**data, "auto_target": 0}  # known target words replace the automatic choice
        return data

    @classmethod
    def paper(cls, **options) -> AttributeConfig:
        """The RapidIn paper's scoring: the whole generation's loss (no target restriction)."""
        return cls(paper_scoring=True, **options)


def field_of(model: type[BaseModel], name: str) -> FieldInfo:
    """A model field's bounds and help without its default, to reuse as `Annotated[T, field_of(M, "x")]` on a flow
    or function parameter (whose default is `default_of(M, "x")`): defined once, enforced in both places."""
    info = model.model_fields[name]
    bounds = Field(description=info.description)
    bounds.metadata = list(info.metadata)  # ge/le/... as annotated-types constraints
    return bounds


def default_of(model: type[BaseModel], name: str):
    """A model field's default."""
    return model.model_fields[name].default
