"""The public API: plan/build a gradient cache, open it safely, attribute generations."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from . import __version__
from .config import GradientConfig, SketchConfig
from .data import DataFormat, Example, Tokenized, alpaca_prompt, dataset_fingerprint, load_examples, tokenize
from .errors import CacheError, DataError
from .gradients import GradientComputer
from .models import LoadedModel
from .results import Attribution, GenerationResult, Hit, TokenHits
from .retrieval import QueryGroup, ScanResult, scan
from .sketch import RapidGrad, make_spec
from .store import CacheStore, Manifest, ShardInfo, compute_cache_id, find_caches

log = logging.getLogger("rapidin")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CachePlan:
    """A cache about to be (or being) built: its store, manifest and tokenized rows."""

    store: CacheStore
    manifest: Manifest
    examples: list[Example]
    items: list[Tokenized | None]  # None = bad row, skipped
    notice: str | None = None  # set when the stored plan overrides this request's shard_rows / batch_size


def plan_cache(
    loaded: LoadedModel, data_url: str, store_root: str, sketch: SketchConfig = SketchConfig(),
    gradient: GradientConfig = GradientConfig(), shard_rows: int = 256, fmt: DataFormat = "auto",
    skip_bad_rows: bool = False, storage_options: dict | None = None, data_storage_options: dict | None = None,
) -> CachePlan:
    """Read and tokenize the data, fix the sketch and cache id, and write the manifest draft."""
    examples, fmt = load_examples(data_url, fmt, loaded.tokenizer, data_storage_options)
    items = [_tokenize_row(loaded, data_url, ex, gradient.max_length, skip_bad_rows) for ex in examples]
    computer = GradientComputer(loaded, gradient)
    spec = make_spec(sketch, computer.dim)
    data_fp = dataset_fingerprint(examples, fmt)
    cache_id = compute_cache_id(loaded.fingerprint, data_fp, gradient, spec, computer.layout)
    url = CacheStore.location(store_root, loaded.name, loaded.version, cache_id)
    store = CacheStore(url, storage_options)
    manifest = Manifest(
        cache_id=cache_id,
        model={"name": loaded.name, "version": loaded.version, "fingerprint": loaded.fingerprint,
               "path": loaded.ref.path, "adapter": loaded.ref.adapter},
        dataset={"url": data_url, "fingerprint": data_fp, "format": fmt, "rows": len(examples)},
        gradient=gradient, sketch=spec, layout=computer.layout, shard_rows=shard_rows, num_rows=len(examples),
        rapidin_version=__version__,
        stats={"truncated": sum(1 for it in items if it is not None and it.truncated),
               "skipped": sum(1 for it in items if it is None)},
    )
    stored = store.create_manifest(manifest)
    if not store.exists("examples.parquet"):
        store.write_table("examples.parquet", _examples_table(examples, items))
    return CachePlan(store, stored, examples, items, _plan_notice(stored, manifest))


def _plan_notice(stored: Manifest, requested: Manifest) -> str | None:
    """One line when the cache's stored plan differs from the request (the stored plan is kept)."""
    keep = {"shard_rows": stored.shard_rows, "batch_size": stored.gradient.batch_size}
    asked = {"shard_rows": requested.shard_rows, "batch_size": requested.gradient.batch_size}
    if keep == asked or stored.complete:
        return None
    diff = ", ".join(f"{k}={keep[k]} (not {asked[k]})" for k in keep if keep[k] != asked[k])
    return f"cache {stored.cache_id} was started with {diff}: resuming with its stored plan, so its bytes match an uninterrupted build"


def _tokenize_row(loaded: LoadedModel, url: str, ex: Example, max_length: int, skip: bool) -> Tokenized | None:
    item = tokenize(loaded.tokenizer, ex.prompt, ex.response, max_length)
    if ex.response.strip() and len(item.input_ids) > item.prompt_len:
        return item
    if skip:
        return None
    why = "response is empty" if not ex.response.strip() else f"no response tokens left after truncation to {max_length}"
    raise DataError(f"{url}:{ex.line}: {why} (pass --skip-bad-rows to skip such rows)")


def _examples_table(examples: list[Example], items: list[Tokenized | None]) -> list[dict]:
    return [
        {"row": ex.row, "id": ex.id, "line": ex.line, "prompt": ex.prompt, "response": ex.response,
         "tokens": len(it.input_ids) if it else 0, "prompt_tokens": it.prompt_len if it else 0,
         "truncated": bool(it and it.truncated), "skipped": it is None}
        for ex, it in zip(examples, items, strict=True)
    ]


def build_shards(
    plan: CachePlan, loaded: LoadedModel, indices: Sequence[int] | None = None, progress: bool = True,
    on_shard: Callable[[ShardInfo, int, int], None] | None = None,
) -> list[ShardInfo]:
    """Compute and commit the given shards (default: all); committed, intact shards are skipped."""
    manifest = plan.manifest
    computer = GradientComputer(loaded, manifest.gradient)
    sketch = RapidGrad(manifest.sketch, loaded.device)
    dtype = _DTYPES[manifest.sketch.config.dtype]
    todo = list(range(manifest.num_shards)) if indices is None else list(indices)
    done: list[ShardInfo] = []
    # `with`: a failure closes the bar first, so the CLI's one-line error starts on a line of its own
    with tqdm(total=sum(_rows(manifest, i) for i in todo), desc="caching gradients", unit="ex",
              disable=not progress) as bar:
        for index in todo:
            info = plan.store.committed_shard(index, manifest.shard_range(index))
            if info is None:
                info = _build_shard(plan, computer, sketch, dtype, index, bar.update)
            else:
                bar.update(_rows(manifest, index))
            done.append(info)
            if on_shard:
                on_shard(info, len(done), len(todo))
    return done


def _rows(manifest: Manifest, index: int) -> int:
    start, stop = manifest.shard_range(index)
    return stop - start


def _build_shard(plan: CachePlan, computer: GradientComputer, sketch: RapidGrad, dtype: torch.dtype, index: int,
                 advance: Callable[[int], object]) -> ShardInfo:
    start, stop = plan.manifest.shard_range(index)
    rows = [r for r in range(start, stop) if plan.items[r] is not None]
    advance(stop - start - len(rows))  # skipped rows count as done
    seconds = {"gradients": 0.0, "sketch": 0.0, "write": 0.0}
    parts = []
    batch = computer.config.batch_size
    for b in range(0, len(rows), batch):
        t0 = time.perf_counter()
        grads = computer.gradients([plan.items[r] for r in rows[b : b + batch]])
        t1 = time.perf_counter()
        # "+ 0.0" turns -0.0 into +0.0: zeros whose sign depends on thread scheduling must not change bytes
        parts.append((sketch(grads).to(dtype) + 0.0).cpu())
        seconds["gradients"] += t1 - t0
        seconds["sketch"] += time.perf_counter() - t1
        advance(len(rows[b : b + batch]))
    k = plan.manifest.sketch.config.k
    vectors = torch.cat(parts) if parts else torch.zeros(0, k, dtype=dtype)
    t2 = time.perf_counter()
    info = plan.store.commit_shard(index, start, stop, vectors, torch.tensor(rows, dtype=torch.long), seconds)
    return info.model_copy(update={"seconds": {**seconds, "write": time.perf_counter() - t2}})


def finalize_cache(plan: CachePlan, extra_timings: dict[str, float] | None = None) -> Manifest:
    """Mark the cache complete once every shard of the stored plan is committed with its planned rows; refuses
    if one is missing or the committed rows are not exactly 0..N-1 once each."""
    stored = plan.store.read_manifest()
    if stored.complete:
        plan.manifest = stored
        return stored
    shards = []
    for index in range(stored.num_shards):
        info = plan.store.committed_shard(index, stored.shard_range(index), verify=False)
        if info is None:
            raise CacheError(f"{plan.store.url}: shard {index} (rows {stored.shard_range(index)}) is not committed "
                             "yet; rerun the cache build to resume")
        shards.append(info)
    _check_coverage(plan.store.url, stored, shards)
    timings = {key: sum(s.seconds.get(key, 0.0) for s in shards) for key in ("gradients", "sketch", "write")}
    timings.update(extra_timings or {})
    manifest = stored.model_copy(update={"complete": True, "shards": shards, "timings": timings})
    plan.store.write_manifest(manifest)
    plan.manifest = manifest
    return manifest


def _check_coverage(url: str, manifest: Manifest, shards: list[ShardInfo]) -> None:
    """The shards' row ranges tile 0..N-1 and hold every row that was not skipped."""
    edges = [(s.start, s.stop) for s in shards]
    starts_at_previous_stop = [a for a, _ in edges] == [0, *[b for _, b in edges[:-1]]]
    if not starts_at_previous_stop or any(b <= a for a, b in edges) or (edges[-1][1] if edges else 0) != manifest.num_rows:
        raise CacheError(f"{url}: committed shards cover rows {edges}, not 0..{manifest.num_rows - 1} once each")
    expected = manifest.num_rows - manifest.stats.get("skipped", 0)
    if sum(s.rows for s in shards) != expected:
        raise CacheError(f"{url}: committed shards hold {sum(s.rows for s in shards)} rows, expected {expected}")


def build_cache(loaded: LoadedModel, data_url: str, store_root: str, progress: bool = True, **options) -> Manifest:
    """plan_cache + build_shards + finalize_cache; a rerun skips intact shards and rebuilds corrupted ones."""
    t0 = time.perf_counter()
    plan = plan_cache(loaded, data_url, store_root, **options)
    if plan.notice:
        log.warning(plan.notice)
    build_shards(plan, loaded, progress=progress)
    return finalize_cache(plan, {"total": time.perf_counter() - t0})


def open_cache(
    loaded: LoadedModel, store_root: str | None = None, cache_url: str | None = None, sketch: SketchConfig | None = None,
    storage_options: dict | None = None,
) -> tuple[CacheStore, Manifest]:
    """Open a complete cache that was built with this model (and sketch, if given); refuse any other."""
    if cache_url is None:
        if store_root is None:
            raise CacheError("give a cache URL or a store root")
        urls = find_caches(store_root, loaded.name, loaded.version, storage_options)
        if not urls:
            raise CacheError(f"{store_root}: no cache for model {loaded.name} version {loaded.version}; run `rapidin cache` first")
        matching = [u for u in urls if CacheStore(u, storage_options).read_manifest().model.get("fingerprint") == loaded.fingerprint]
        if len(matching) > 1:
            raise CacheError(f"{store_root}: {len(matching)} caches fit this model; choose one with --cache ({', '.join(matching)})")
        cache_url = (matching or urls)[0]
    store = CacheStore(cache_url, storage_options)
    manifest = store.read_manifest()
    if manifest.model.get("fingerprint") != loaded.fingerprint:
        raise CacheError(f"{cache_url}: cache was built with another model (fingerprint {manifest.model.get('fingerprint')}, "
                         f"loaded model has {loaded.fingerprint})")
    if sketch is not None and sketch != manifest.sketch.config:
        raise CacheError(f"{cache_url}: cache was built with sketch {manifest.sketch.config.model_dump()}, not {sketch.model_dump()}")
    if not manifest.complete:
        raise CacheError(f"{cache_url}: cache is incomplete ({manifest.num_shards} shards planned); rerun `rapidin cache` to finish it")
    return store, manifest


class Generation(BaseModel):
    """A generation to attribute: a prompt, and its response (or None to generate one)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    response: str | None = None
    raw_prompt: bool = Field(False, description="Use the prompt as is instead of the training data's template.")


DEFAULT_AUTO_TARGET = 4  # benchmarks/README_quality.md: the measured best automatic target size on the Howdy backdoor


class AttributeConfig(BaseModel):
    """Retrieval options. The defaults answer "which training rows caused this generation?" as measured best on the
    Howdy backdoor (automatic target tokens; read the `influential` list); `AttributeConfig.paper()` is the
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
    verify: bool = Field(True, description="Check shard checksums while scanning.")

    @model_validator(mode="before")
    @classmethod
    def _one_target_kind(cls, data):
        if isinstance(data, dict) and data.get("target"):
            if data.get("auto_target"):
                raise ValueError("give either target words or auto_target, not both")
            data = {**data, "auto_target": 0}  # known target words replace the automatic choice
        return data

    @classmethod
    def paper(cls, **options) -> AttributeConfig:
        """The RapidIn paper's scoring: the whole generation's loss (no target restriction)."""
        return cls(**{"auto_target": 0, **options})


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


def attribute(
    loaded: LoadedModel, generations: Sequence[Generation], store_root: str | None = None, cache_url: str | None = None,
    config: AttributeConfig = AttributeConfig(), storage_options: dict | None = None, progress: bool = True,
    keep_all_scores: bool = False,
) -> Attribution | tuple[Attribution, ScanResult]:
    """Rank the cache's training rows for each generation (and tokens, when token_wise)."""
    t0 = time.perf_counter()
    store, manifest = open_cache(loaded, store_root, cache_url, storage_options=storage_options)
    prepared = prepare_queries(loaded, manifest, generations, config, progress)
    t1 = time.perf_counter()
    shards = (sv for _, *sv in store.iter_shards(manifest.shards, config.verify))
    shards = tqdm(shards, total=len(manifest.shards), desc="scanning cache", unit="shard", disable=not progress)
    result = scan(shards, [p.group for p in prepared], config.top_k, loaded.device, keep_all_scores)
    t2 = time.perf_counter()
    attribution = assemble(loaded, store, manifest, prepared, result, config, progress)
    attribution.timings = {"queries": t1 - t0, "scan": t2 - t1, "assemble": time.perf_counter() - t2,
                           "total": time.perf_counter() - t0}
    return (attribution, result) if keep_all_scores else attribution


@dataclass
class PreparedQuery:
    """A generation with its tokens and sketched query vectors."""

    generation: Generation
    response: str
    item: Tokenized
    group: QueryGroup
    targets: list[int] | None


def prepare_queries(
    loaded: LoadedModel, manifest: Manifest, generations: Sequence[Generation], config: AttributeConfig,
    progress: bool = False,
) -> list[PreparedQuery]:
    """Template, generate if needed, tokenize, and sketch each generation's query gradient(s)."""
    computer = GradientComputer(loaded, manifest.gradient)
    sketch = RapidGrad(manifest.sketch, loaded.device)
    prepared = []
    # `with`: an error closes the bar first, so the one-line error starts on a line of its own
    with tqdm(desc="query gradients", unit="grad", disable=not progress, total=len(generations)) as bar:
        for gen in generations:
            prompt = gen.prompt if gen.raw_prompt else format_prompt(loaded, gen.prompt, manifest.dataset["format"])
            response = gen.response if gen.response is not None else generate(loaded, prompt, config.max_new_tokens)
            item = tokenize(loaded.tokenizer, prompt, response, manifest.gradient.max_length)
            if len(item.input_ids) <= item.prompt_len:
                raise DataError(f"generation '{gen.prompt[:40]}': no response tokens within max_length {manifest.gradient.max_length}")
            targets = target_positions(loaded, item, config.target) if config.target else None
            if targets is not None and not targets:
                raise DataError(f"--target {list(config.target)}: none of these words occurs in the response {response[:80]!r}")
            if targets:
                missing = [w for w in config.target if not target_positions(loaded, item, [w])]
                if missing:
                    log.warning("--target %s: not in the response %r; scoring the other target words only",
                                missing, response[:80])
            if config.auto_target:
                targets, _ = auto_target_positions(loaded, item, config.auto_target, manifest.gradient)
            weights = None
            if targets:
                w = torch.zeros(len(item.input_ids))
                w[targets] = 1.0
                weights = [w]
            whole = sketch(computer.gradients([item], weights))[0]
            bar.update(1)
            tokens = None
            if config.token_wise:
                positions = list(range(item.prompt_len, len(item.input_ids)))
                bar.total += len(positions)
                tokens = sketch(computer.token_gradients(item, positions, bar.update))
            prepared.append(PreparedQuery(gen, response, item, QueryGroup(whole, tokens), targets))
    return prepared


def assemble(
    loaded: LoadedModel, store: CacheStore, manifest: Manifest, prepared: list[PreparedQuery], result: ScanResult,
    config: AttributeConfig, progress: bool = False,
) -> Attribution:
    """Turn scan results into the typed Attribution, adding texts and per-training-token scores."""
    table = {r["row"]: r for r in store.read_table("examples.parquet")}
    tok = loaded.tokenizer
    score_tokens = config.token_wise and config.train_token_rows > 0
    computer = GradientComputer(loaded, manifest.gradient) if score_tokens else None
    sketch = RapidGrad(manifest.sketch, loaded.device) if score_tokens else None
    outputs = []
    for p, whole, per_token in zip(prepared, result.whole, result.tokens, strict=True):
        lists = {kind: _hits(top, table, column=0) for kind, top in whole.items()}
        if score_tokens:
            _score_train_tokens(computer, sketch, manifest, p, lists, table, config.train_token_rows, progress)
        tokens = [tok.decode([i]) for i in p.item.input_ids[p.item.prompt_len:]]
        token_hits = None
        if per_token is not None:
            token_hits = [TokenHits(position=j, token=tokens[j], helpful=_hits(per_token["helpful"], table, j),
                                    harmful=_hits(per_token["harmful"], table, j)) for j in range(len(tokens))]
        outputs.append(GenerationResult(
            prompt=p.generation.prompt, response=p.response, generated=p.generation.response is None, tokens=tokens,
            target_positions=[t - p.item.prompt_len for t in p.targets] if p.targets else None,
            per_token=token_hits, **lists))
    return Attribution(cache_id=manifest.cache_id, cache_url=store.url, model=manifest.model,
                       sketch=manifest.sketch.config.model_dump(), top_k=config.top_k, generations=outputs,
                       rows_scanned=result.rows_scanned, bytes_scanned=result.bytes_scanned)


def _hits(top, table: dict, column: int) -> list[Hit]:
    hits = []
    for rank in range(top.scores.shape[0]):
        row = int(top.rows[rank, column])
        info = table[row]
        payload = top.payload[rank, column].tolist() if top.payload is not None and top.payload.shape[2] else None
        hits.append(Hit(rank=rank + 1, row=row, id=info["id"], score=float(top.scores[rank, column]),
                        prompt=info["prompt"], response=info["response"], token_scores=payload))
    return hits


def _score_train_tokens(computer: GradientComputer, sketch: RapidGrad, manifest: Manifest, p: PreparedQuery,
                        lists: dict[str, list[Hit]], table: dict, n_rows: int, progress: bool) -> None:
    """I(t, z_i): each response token of the top rows of every list against the whole generation (same sketch);
    a row in several lists is scored once."""
    loaded = computer.loaded
    query = p.group.whole.to(loaded.device, torch.float32)
    hits = [hit for kind in ("influential", "helpful", "harmful") for hit in lists[kind][:n_rows]]
    scored: dict[int, tuple[list[str], list[float]]] = {}
    for hit in tqdm(hits, desc="training-token scores", unit="row", disable=not progress):
        if hit.row not in scored:
            info = table[hit.row]
            item = tokenize(loaded.tokenizer, info["prompt"], info["response"], manifest.gradient.max_length)
            positions = list(range(item.prompt_len, len(item.input_ids)))
            vectors = sketch(computer.token_gradients(item, positions)).to(_DTYPES[manifest.sketch.config.dtype])
            scored[hit.row] = ([loaded.tokenizer.decode([i]) for i in item.input_ids[item.prompt_len:]],
                               (vectors.float() @ query).tolist())
        hit.train_tokens, hit.train_token_scores = scored[hit.row]
