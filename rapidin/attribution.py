"""Attribution: featurise the generations (whole and token-wise queries), scan the cache, and assemble the
top-k helpful, harmful and influential rows with their token-wise scores."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from .cache import as_stored, open_cache
from .config import AttributeConfig
from .data import Tokenized, tokenize
from .errors import CacheError, DataError, RapidInError
from .gradients import GradientComputer
from .models import LoadedModel
from .precondition import Preconditioner, load_preconditioner
from .results import Attribution, GenerationResult, Hit, TokenHits
from .retrieval import QueryGroup, ScanResult, scan, scan_checkpoints
from .sketch import Sketch, make_sketch, projector
from .store import CacheStore, Manifest
from .targets import auto_target_positions, format_prompt, generate, target_positions

log = logging.getLogger("rapidin")


class Generation(BaseModel):
    """A generation to attribute: a prompt, and its response (empty: the model generates one)."""

    model_config = ConfigDict(frozen=True)

    prompt: str = Field(description="The instruction, as a user wrote it.")
    response: str = Field("", description="The response to explain; empty: the model generates it from the prompt.")
    raw_prompt: bool = Field(False, description="Use the prompt as is instead of the training data's template.")

    @field_validator("response", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return "" if value is None else value


def attribute(
    loaded: LoadedModel, generations: Sequence[Generation], store_url: str | None = None, cache_url: str | None = None,
    config: AttributeConfig = AttributeConfig(), storage_options: dict | None = None, progress: bool = True,
    keep_all_scores: bool = False, checkpoints: Sequence[Checkpoint] = (),
) -> Attribution | tuple[Attribution, ScanResult]:
    """Rank the cache's training rows for each generation (and tokens, when token_wise). With earlier `checkpoints`
    of the fine-tune (each with its own cache of the same rows), a row's score is the weighted sum of its scores at
    the final model and at each checkpoint (TracIn), with target tokens chosen by the final model."""
    if checkpoints:
        if config.token_wise:
            raise RapidInError("several checkpoints: token-wise scores are not supported yet (drop --token-wise)")
        return _attribute_checkpoints(loaded, generations, store_url, cache_url, config, storage_options, progress,
                                      checkpoints, keep_all_scores)
    t0 = time.perf_counter()
    store, manifest = open_cache(loaded, store_url, cache_url, storage_options=storage_options)
    features = Features.for_config(loaded, store, manifest, config)
    prepared = prepare_queries(loaded, manifest, generations, config, progress, features)
    t1 = time.perf_counter()
    shards = (sv for _, *sv in store.iter_shards(manifest.shards, config.verify))
    shards = tqdm(shards, total=len(manifest.shards), desc="scanning cache", unit="shard", disable=not progress)
    result = scan(shards, [p.group for p in prepared], config.top_k, loaded.device, keep_all_scores)
    t2 = time.perf_counter()
    attribution = assemble(loaded, store, manifest, prepared, result, config, progress, features)
    attribution.timings = {"queries": t1 - t0, "scan": t2 - t1, "assemble": time.perf_counter() - t2,
                           "total": time.perf_counter() - t0}
    return (attribution, result) if keep_all_scores else attribution


@dataclass
class Features:
    """The gradient computers and the sketch of a cache, built once per attribution and shared by the query and the
    training-token steps (RapidGrad's gather index is the costly part: 0.6 s for SmolLM2). The query computer applies
    the preconditioner, if any; training rows' gradients never get one (the cache's side)."""

    computer: GradientComputer
    sketch: Sketch
    query_computer: GradientComputer

    @classmethod
    def of(cls, loaded: LoadedModel, manifest: Manifest, preconditioner: Preconditioner | None = None) -> Features:
        sketch = make_sketch(manifest.sketch, manifest.layout, loaded.device)
        rows = GradientComputer(loaded, manifest.gradient, projector(sketch))
        query = rows if preconditioner is None else GradientComputer(loaded, manifest.gradient, projector(sketch),
                                                                     preconditioner)
        return cls(rows, sketch, query)

    @classmethod
    def for_config(cls, loaded: LoadedModel, store: CacheStore, manifest: Manifest, config: AttributeConfig) -> Features:
        """The Features an attribution with `config` needs: with its preconditioner loaded (checksum and spec
        checked) from the cache's store."""
        kind = config.preconditioner
        return cls.of(loaded, manifest, None if kind == "none" else load_preconditioner(store, manifest, kind))


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
    progress: bool = False, features: Features | None = None,
) -> list[PreparedQuery]:
    """Template, generate if needed, tokenize, and sketch each generation's query gradient(s)."""
    if features is None:
        if config.preconditioner != "none":
            raise ValueError("prepare_queries: pass the Features of the preconditioned cache (Features.for_config)")
        features = Features.of(loaded, manifest)
    computer, sketch = features.query_computer, features.sketch
    prepared = []
    # `with`: an error closes the bar first, so the one-line error starts on a line of its own
    with tqdm(desc="query gradients", unit="grad", disable=not progress, total=len(generations)) as bar:
        for gen in generations:
            prompt = gen.prompt if gen.raw_prompt else format_prompt(loaded, gen.prompt, manifest.dataset["format"])
            response = gen.response if gen.response else generate(loaded, prompt, config.max_new_tokens)
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
            whole = sketch(computer.gradients([item], target_weights(item, targets)))[0]
            bar.update(1)
            tokens = None
            if config.token_wise:
                positions = list(range(item.prompt_len, len(item.input_ids)))
                bar.total += len(positions)
                tokens = sketch(computer.token_gradients(item, positions, bar.update))
            prepared.append(PreparedQuery(gen, response, item, QueryGroup(whole, tokens), targets))
    return prepared


def target_weights(item: Tokenized, targets: list[int] | None) -> list[torch.Tensor] | None:
    """The loss weights of a query restricted to target positions (None: every response token)."""
    if not targets:
        return None
    w = torch.zeros(len(item.input_ids))
    w[targets] = 1.0
    return [w]


@dataclass
class Checkpoint:
    """An earlier checkpoint of the fine-tune (TracIn): its model, its cache (None: found in the store by the model's
    name, version and fingerprint) and the weight of its scores (e.g. the learning rate at that checkpoint)."""

    loaded: LoadedModel
    cache_url: str | None = None
    weight: float = 1.0
    label: str = ""


def _attribute_checkpoints(loaded: LoadedModel, generations: Sequence[Generation], store_url: str | None,
                           cache_url: str | None, config: AttributeConfig, storage_options: dict | None, progress: bool,
                           checkpoints: Sequence[Checkpoint],
                           keep_all_scores: bool) -> Attribution | tuple[Attribution, ScanResult]:
    t0 = time.perf_counter()
    store, manifest = open_cache(loaded, store_url, cache_url, storage_options=storage_options)
    features = Features.for_config(loaded, store, manifest, config)
    prepared = prepare_queries(loaded, manifest, generations, config, progress, features)
    parts = [(store, manifest, torch.stack([p.group.whole for p in prepared]))]
    labels = [{"label": "final", "weight": 1.0, "cache_id": manifest.cache_id, "cache_url": store.url}]
    for c, ck in enumerate(checkpoints):
        other, other_manifest = open_cache(ck.loaded, store_url, ck.cache_url, storage_options=storage_options)
        _same_rows(store.url, manifest, other.url, other_manifest)
        f = Features.for_config(ck.loaded, other, other_manifest, config)
        queries = torch.stack([f.sketch(f.query_computer.gradients([p.item], target_weights(p.item, p.targets)))[0]
                               for p in prepared])
        parts.append((other, other_manifest, queries * ck.weight))
        labels.append({"label": ck.label or f"checkpoint {c + 1}", "weight": ck.weight,
                       "cache_id": other_manifest.cache_id, "cache_url": other.url})
    t1 = time.perf_counter()
    streams = [(sv for _, *sv in s.iter_shards(m.shards, config.verify)) for s, m, _ in parts]
    streams[0] = tqdm(streams[0], total=len(manifest.shards), desc="scanning caches", unit="shard",
                      disable=not progress)
    result = scan_checkpoints(streams, [q for *_, q in parts], config.top_k, loaded.device, keep_all_scores)
    t2 = time.perf_counter()
    attribution = assemble(loaded, store, manifest, prepared, result, config, progress, features, checkpoints=labels)
    attribution.timings = {"queries": t1 - t0, "scan": t2 - t1, "assemble": time.perf_counter() - t2,
                           "total": time.perf_counter() - t0}
    return (attribution, result) if keep_all_scores else attribution


def _same_rows(url: str, manifest: Manifest, other_url: str, other: Manifest) -> None:
    """Checkpoint caches are summed row by row: same data set, same rows, same shards."""
    ranges = lambda m: [(s.start, s.stop) for s in m.shards]  # noqa: E731
    if (other.dataset["fingerprint"], other.num_rows, ranges(other)) != (manifest.dataset["fingerprint"],
                                                                       manifest.num_rows, ranges(manifest)):
        raise CacheError(f"{other_url}: the checkpoint's cache holds other rows or shards than {url} (data "
                         f"{other.dataset['fingerprint']} vs {manifest.dataset['fingerprint']}, {other.num_rows} vs "
                         f"{manifest.num_rows} rows, shard_rows {other.shard_rows} vs {manifest.shard_rows}); cache "
                         "every checkpoint over the same data with the same --shard-rows")


def assemble(
    loaded: LoadedModel, store: CacheStore, manifest: Manifest, prepared: list[PreparedQuery], result: ScanResult,
    config: AttributeConfig, progress: bool = False, features: Features | None = None,
    checkpoints: list[dict] | None = None,
) -> Attribution:
    """Turn scan results into the typed Attribution, adding texts and per-training-token scores (with several
    checkpoints, the rows' payloads are their per-checkpoint scores)."""
    table = {r["row"]: r for r in store.read_table("examples.parquet")}
    tok = loaded.tokenizer
    score_tokens = config.token_wise and config.train_token_rows > 0
    if score_tokens:
        features = features or Features.of(loaded, manifest)
    outputs = []
    for p, whole, per_token in zip(prepared, result.whole, result.tokens, strict=True):
        payload_field = "checkpoint_scores" if checkpoints else "token_scores"
        lists = {kind: _hits(top, table, column=0, payload_field=payload_field) for kind, top in whole.items()}
        if score_tokens:
            _score_train_tokens(features, manifest, p, lists, table, config.train_token_rows, progress)
        tokens = [tok.decode([i]) for i in p.item.input_ids[p.item.prompt_len:]]
        token_hits = None
        if per_token is not None:
            token_hits = [TokenHits(position=j, token=tokens[j], helpful=_hits(per_token["helpful"], table, j),
                                    harmful=_hits(per_token["harmful"], table, j)) for j in range(len(tokens))]
        outputs.append(GenerationResult(
            prompt=p.generation.prompt, response=p.response, generated=not p.generation.response, tokens=tokens,
            target_positions=[t - p.item.prompt_len for t in p.targets] if p.targets else None,
            per_token=token_hits, **lists))
    return Attribution(cache_id=manifest.cache_id, cache_url=store.url, model=manifest.model,
                       sketch=manifest.sketch.config.model_dump(), top_k=config.top_k,
                       preconditioner=config.preconditioner, checkpoints=checkpoints, generations=outputs,
                       rows_scanned=result.rows_scanned, bytes_scanned=result.bytes_scanned)


def _hits(top, table: dict, column: int, payload_field: str = "token_scores") -> list[Hit]:
    hits = []
    for rank in range(top.scores.shape[0]):
        row = int(top.rows[rank, column])
        info = table[row]
        payload = top.payload[rank, column].tolist() if top.payload is not None and top.payload.shape[2] else None
        hits.append(Hit(rank=rank + 1, row=row, id=info["id"], score=float(top.scores[rank, column]),
                        prompt=info["prompt"], response=info["response"], **{payload_field: payload}))
    return hits


def _score_train_tokens(features: Features, manifest: Manifest, p: PreparedQuery, lists: dict[str, list[Hit]],
                        table: dict, n_rows: int, progress: bool) -> None:
    """I(t, z_i): each response token of the top rows of every list against the whole generation (same sketch);
    a row in several lists is scored once."""
    computer, sketch = features.computer, features.sketch
    loaded = computer.loaded
    query = p.group.whole.to(loaded.device, torch.float32)
    hits = [hit for kind in ("influential", "helpful", "harmful") for hit in lists[kind][:n_rows]]
    scored: dict[int, tuple[list[str], list[float]]] = {}
    for hit in tqdm(hits, desc="training-token scores", unit="row", disable=not progress):
        if hit.row not in scored:
            info = table[hit.row]
            item = tokenize(loaded.tokenizer, info["prompt"], info["response"], manifest.gradient.max_length)
            positions = list(range(item.prompt_len, len(item.input_ids)))
            vectors = as_stored(sketch(computer.token_gradients(item, positions)), manifest.sketch.config.dtype)
            scored[hit.row] = ([loaded.tokenizer.decode([i]) for i in item.input_ids[item.prompt_len:]],
                               (vectors @ query).tolist())
        hit.train_tokens, hit.train_token_scores = scored[hit.row]
