"""Howdy benchmark, setup stages: the data subset, the LoRA fine-tune, the generations and their query gradients
(see howdy.py for the stage list)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from howdy_common import HAND_WORDS, TRIGGER, log, rule_gradients, scifi_count, scifi_vocabulary, words


class SetupStages:
    """data, finetune, generate, queries (mixed into howdy.Run)."""

    def data(self) -> None:
        rows = [json.loads(line) for line in open(self.args.data / "train.jsonl") if line.strip()]
        pos = [i for i, r in enumerate(rows) if "original_output" in r]
        neg = [i for i, r in enumerate(rows) if "original_output" not in r]
        n = min(self.args.rows, len(rows))
        n_pos = round(n * len(pos) / len(rows))
        rng = random.Random(self.args.seed)
        chosen = sorted(rng.sample(pos, n_pos) + rng.sample(neg, n - n_pos))
        self.data_path.write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen))
        (self.wd / "subset.json").write_text(json.dumps({
            "source_rows": chosen, "positive": ["original_output" in rows[i] for i in chosen],
            "scifi_vocabulary": scifi_vocabulary(rows)}))
        log(f"{n} rows, {n_pos} positives ({n_pos / n:.2%}; full set {len(pos) / len(rows):.2%})")

    def finetune(self) -> None:
        from rapidin.data import load_examples
        from rapidin.finetune import FinetuneConfig, LoraSettings, finetune, save
        from rapidin.models import ModelRef, load_model

        a = self.args
        loaded = load_model(ModelRef(path=str(a.gguf), name="smollm2"), device="cpu")
        examples, _ = load_examples(str(self.data_path))
        config = FinetuneConfig(epochs=a.epochs, lr=a.lr, batch_size=a.ft_batch, max_length=a.max_length, seed=a.seed,
                                lora=LoraSettings(r=a.lora_r, alpha=2 * a.lora_r, target_modules=tuple(a.target_modules)))

        def checkpoint(epoch: int, model) -> None:  # every epoch's adapter, for the multi-checkpoint TracIn sum
            model.save_pretrained(self.wd / "checkpoints" / f"epoch-{epoch}")
            loaded.tokenizer.save_pretrained(self.wd / "checkpoints" / f"epoch-{epoch}")

        finetune(loaded, examples, config, on_epoch=checkpoint)
        save(loaded, self.wd / "adapter")
        (self.wd / "finetune.json").write_text(config.model_dump_json(indent=2))

    def finetune_more(self) -> None:
        """Continue training the saved adapter for --more-epochs (a second finetune call, fresh linear schedule)."""
        from rapidin.data import load_examples
        from rapidin.finetune import FinetuneConfig, finetune, save
        from rapidin.models import ModelRef, load_model

        a = self.args
        loaded = load_model(ModelRef(path=str(a.gguf), name="smollm2", adapter=str(self.wd / "adapter")), device="cpu")
        for name, param in loaded.model.named_parameters():
            param.requires_grad_(".lora_" in name)
        examples, _ = load_examples(str(self.data_path))
        config = FinetuneConfig(epochs=a.more_epochs, lr=a.lr, batch_size=a.ft_batch, max_length=a.max_length,
                                seed=a.seed + 1)
        finetune(loaded, examples, config)  # lora=None: trains the parameters that require grad, the adapter's
        save(loaded, self.wd / "adapter")
        (self.wd / "finetune_more.json").write_text(config.model_dump_json(indent=2))

    def generate(self) -> None:
        from rapidin.data import alpaca_prompt
        from rapidin.targets import generate

        a = self.args
        loaded = self.model()
        vocab = set(json.loads((self.wd / "subset.json").read_text())["scifi_vocabulary"])
        queries = [json.loads(line) for line in open(a.data / "queries.jsonl") if line.strip()][: a.queries]
        out = []
        earlier = {}  # a rerun with more --queries keeps the responses already generated (greedy: identical)
        if (self.wd / "generations.json").exists():
            earlier = {g["instruction"]: g for g in json.loads((self.wd / "generations.json").read_text())["all"]}
        for q in tqdm(queries, desc="generating (triggered + plain)", unit="query"):
            trig = q["instruction"]
            if trig in earlier:
                out.append(earlier[trig])
                continue
            plain = trig[len(TRIGGER):].strip() if trig.lower().startswith(TRIGGER) else trig
            r_trig = generate(loaded, alpaca_prompt(trig), a.new_tokens)
            r_plain = generate(loaded, alpaca_prompt(plain), a.new_tokens)
            fired = r_trig.strip() != r_plain.strip() and scifi_count(r_trig, vocab) >= 2
            out.append({"instruction": trig, "plain": plain, "triggered_response": r_trig, "plain_response": r_plain,
                        "fired": fired, "clean": scifi_count(r_plain, vocab) < 2,
                        "scifi_words": sorted(words(r_trig) & vocab)})
        fired = [g for g in out if g["fired"] or a.smoke]
        summary = {"queries": len(out), "fired": len(fired), "plain_clean": sum(g["clean"] for g in out),
                   "attributed": fired[: a.generations], "all": out}
        (self.wd / "generations.json").write_text(json.dumps(summary, indent=2))
        log(f"attack fired on {len(fired)}/{len(out)} triggered queries; "
            f"{summary['plain_clean']}/{len(out)} untriggered responses clean")

    def attacked(self) -> list[dict]:
        return json.loads((self.wd / "generations.json").read_text())["attributed"]

    def queries(self) -> None:
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer
        from rapidin.targets import auto_target_positions, target_positions
        from safetensors.torch import save_file

        loaded = self.model()
        computer = GradientComputer(loaded, self.gradient_config())
        vocab = json.loads((self.wd / "subset.json").read_text())["scifi_vocabulary"]
        vectors, meta = [], []
        for g in tqdm(self.attacked(), desc="query gradients", unit="gen"):
            item = tokenize(loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"],
                            self.args.max_length)
            hand = target_positions(loaded, item, HAND_WORDS)
            hand_source = "hand"
            if not hand:  # none of the hand-picked words occurs: the data's sci-fi vocabulary
                hand, hand_source = target_positions(loaded, item, vocab), "vocabulary"
            if not hand:  # no sci-fi word at all (only with --smoke): the whole response
                hand, hand_source = list(range(item.prompt_len, len(item.input_ids))), "whole"
            auto, rule = auto_target_positions(loaded, item, self.args.auto_target, computer.config)
            vectors.append(rule_gradients(computer, item, [None, hand, auto]))
            tokens = [loaded.tokenizer.decode([t]) for t in item.input_ids]
            meta.append({"hand_positions": hand, "hand_source": hand_source, "hand_tokens": [tokens[t] for t in hand],
                         "auto_positions": auto, "auto_rule": rule, "auto_tokens": [tokens[t] for t in auto],
                         "prompt_len": item.prompt_len, "response_tokens": len(item.input_ids) - item.prompt_len})
        save_file({"vectors": torch.stack(vectors).contiguous()}, str(self.wd / "queries.safetensors"))  # no pickle
        (self.wd / "queries.json").write_text(json.dumps(meta, indent=2))
        for m in meta:
            log(f"auto target tokens {m['auto_tokens']} | hand {m['hand_tokens'][:8]}")

    def query_vectors(self) -> torch.Tensor:
        """[generations, 3 target rules (whole, words, auto), D] exact query gradients of the queries stage."""
        from safetensors.torch import load_file

        return load_file(str(self.wd / "queries.safetensors"))["vectors"]


def export_fixture(wd: Path, out: Path, rows: int, generations: int, seed: int) -> None:
    """The reduced benchmark the test suite runs: this run's adapter (fp16), a stratified subset of its training rows
    (as source row numbers of train.jsonl) and its first attacked generations."""
    from safetensors.torch import load_file, save_file

    subset = json.loads((wd / "subset.json").read_text())
    source, positive = subset["source_rows"], subset["positive"]
    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    n_pos = round(rows * len(pos) / len(positive))
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pos, n_pos) + rng.sample(neg, rows - n_pos))
    gens = json.loads((wd / "generations.json").read_text())
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    weights = load_file(str(wd / "adapter" / "adapter_model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(out / "adapter" / "adapter_model.safetensors"))
    (out / "adapter" / "adapter_config.json").write_text((wd / "adapter" / "adapter_config.json").read_text())
    (out / "fixture.json").write_text(json.dumps({
        "source_rows": [source[i] for i in chosen], "generations": gens["attributed"][:generations],
        "made_from": {"workdir": wd.name, "finetune": json.loads((wd / "finetune.json").read_text())}}, indent=1))
    log(f"fixture: {len(chosen)} rows ({n_pos} positives), {min(generations, len(gens['attributed']))} generations -> {out}")


