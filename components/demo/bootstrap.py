"""Train the demo's models from scratch on the CPU: a tokenizer, an instruct LM and a reward model.

    bootstrap(data_dir, out_dir) -> BootstrapReport

1. Tokenizer: byte-level BPE on the SFT corpus. Byte-level tokens carry their leading space, so
   a decoded completion appended to its prompt (`prompt + completion`) is the review itself.
   It adds <bos> in front of every text and pads on the left (for generation).
2. Instruct model: a small GPT-2 trained on sft.jsonl, each text followed by <eos> so it stops.
3. Reward model: a GPT-2 with one output, its body initialised from the instruct model (as in
   InstructGPT), trained with the Bradley-Terry loss -logsigmoid(r(prompt+chosen) -
   r(prompt+rejected)) on preferences.jsonl, a slice of pairs held out.

Both are saved with `save_pretrained` (safetensors) next to the tokenizer, so they load exactly
like hub models: `AutoModelForCausalLM` / `AutoModelForSequenceClassification` / `AutoTokenizer`
`.from_pretrained(out_dir / "instruct" | "reward")`.

Callers batch with left padding and usually pass no position_ids, which shifts GPT-2's absolute
positions by the padding; `generate` does not. Training adds a random offset to the positions so
both models give the same answer either way.

`out_dir/bootstrap.json` records the data version, the settings and the metrics; a second call
with the same data and settings returns it without training (skipped=True).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from components.config import GenerationConfig, RewardTrainingConfig
from components.data.preferences import PreferencePair
from components.demo.domain import DATA_FILES
from components.demo.gold import gold_score, is_gold_positive, is_well_formed
from components.rl.reward import RewardScorer
from components.reward.training import RewardTrainer, encode_pairs, pad_right
from components.rl.generation import generate
from components.tracking.runs import file_lock



@dataclass(frozen=True)
class BootstrapSettings:
    seed: int = 0
    vocab_size: int = 1024  # BPE target; the closed domain needs fewer, so every word is one token
    n_embd: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 128
    max_position_offset: int = 24  # random shift of positions in training (see module docstring)
    lm_steps: int = 250
    lm_batch_size: int = 64
    lm_learning_rate: float = 3e-3
    reward_steps: int = 600
    reward_batch_size: int = 32  # pairs per step
    reward_learning_rate: float = 1e-3
    center_rewards_coef: float = 0.01  # keeps r near 0 (TRL's center_rewards_coefficient)
    reward_holdout: float = 0.1
    eval_samples: int = 256
    max_new_tokens: int = 24
    num_threads: int | None = None  # None: every core
    progress: bool = True  # a live bar in a terminal, a line per stage elsewhere; does not change the result

    def fingerprint(self) -> dict:
        """The settings that change the result: what decides whether a bootstrap can be reused."""
        return {key: value for key, value in asdict(self).items() if key not in ("progress", "num_threads")}


@dataclass
class BootstrapReport:
    instruct_dir: Path
    reward_dir: Path
    data_md5: str
    reward_accuracy: float  # held-out pairs, against the true (gold) preference
    reward_accuracy_labels: float  # the same pairs, against the annotators' noisy labels
    reward_sample_auc: float  # on the instruct model's samples: P(r(gold-positive) > r(other))
    instruct_gold_positive_share: float
    instruct_well_formed_share: float
    instruct_eos_share: float  # samples that stopped with <eos> within max_new_tokens
    timings: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    skipped: bool = False

    def to_json(self) -> dict:
        return {**asdict(self), "instruct_dir": str(self.instruct_dir), "reward_dir": str(self.reward_dir)}


def data_md5(data_dir: Path) -> str:
    """One md5 over the three demo files (names and contents)."""
    digest = hashlib.md5()
    for name in DATA_FILES:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; `alignflow demo data` generates the demo data")
        digest.update(f"{name} {hashlib.md5(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        row = json.loads(line)
        missing = [name for name in fields if not isinstance(row.get(name), str)]
        if missing:
            raise ValueError(f"{path}:{number}: missing string field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- Tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    bos = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


# --- Batching ----------------------------------------------------------------------------------


def _pad_right(sequences: list[list[int]], pad_id: int, max_offset: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Right-padded batch; half the rows get their positions shifted by a random offset in
    [1, max_offset], the other half start at 0 as `generate` and right-padded callers do."""
    batch = pad_right(pad_id)(sequences, generator)
    offsets = torch.randint(1, max_offset + 1, (len(sequences), 1), generator=generator)
    offsets *= torch.rand((len(sequences), 1), generator=generator) < 0.5
    position_ids = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0) + offsets
    return {**batch, "position_ids": position_ids}


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- Instruct model ----------------------------------------------------------------------------


def gpt2_config(tokenizer: PreTrainedTokenizerFast, *, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
                n_positions: int = 128, **extra) -> GPT2Config:
    """A GPT-2 for `tokenizer`'s vocabulary and special tokens, without dropout (the RL update's log-probabilities
    must equal the rollout's). The tests' tiny models are built with it too."""
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra,
    )


def _architecture(settings: BootstrapSettings) -> dict[str, int]:
    return {"n_embd": settings.n_embd, "n_layer": settings.n_layer, "n_head": settings.n_head,
            "n_positions": settings.n_positions}


def train_instruct(texts: list[str], tokenizer: PreTrainedTokenizerFast, settings: BootstrapSettings) -> GPT2LMHeadModel:
    """Next-token prediction on `<bos> text <eos>`; the <eos> teaches the model to stop."""
    model = GPT2LMHeadModel(gpt2_config(tokenizer, **_architecture(settings)))
    sequences = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lm_learning_rate, weight_decay=0.01)
    scheduler = _schedule(optimizer, settings.lm_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    bar = tqdm(range(settings.lm_steps), desc="instruct model", disable=None if settings.progress else True)
    for _ in bar:
        index = torch.randint(0, len(sequences), (settings.lm_batch_size,), generator=generator)
        batch = _pad_right([sequences[i] for i in index], tokenizer.pad_token_id, settings.max_position_offset, generator)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    _stage(settings, f"instruct model: {settings.lm_steps} steps, last loss {loss.item():.3f}")
    model.eval()
    return model


def _stage(settings: BootstrapSettings, line: str) -> None:
    """A line per finished stage where no live progress bar shows (output to a log, not a terminal)."""
    if settings.progress and not sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)


# --- Reward model ------------------------------------------------------------------------------


def train_reward(
    pairs: list[dict[str, str]], instruct: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, settings: BootstrapSettings
) -> GPT2ForSequenceClassification:
    """Bradley-Terry: minimise -logsigmoid(r(prompt+chosen) - r(prompt+rejected)), with the reward-model stage's
    trainer (components/reward/training.py), batches padded as `_pad_right` does (random position offsets)."""
    model = GPT2ForSequenceClassification(gpt2_config(tokenizer, **_architecture(settings), num_labels=1))
    model.transformer.load_state_dict(instruct.transformer.state_dict())
    encoded = encode_pairs([PreferencePair(p["prompt"], p["chosen"], p["rejected"], None, row) for row, p in enumerate(pairs, 1)],
                           tokenizer, append_eos=False)
    training = RewardTrainingConfig(learning_rate=settings.reward_learning_rate, batch_size=settings.reward_batch_size,
                                    max_steps=settings.reward_steps, center_rewards_coef=settings.center_rewards_coef,
                                    warmup_ratio=0.05, lr_schedule="cosine", min_lr_ratio=0.1, max_grad_norm=1.0,
                                    sampling="with_replacement")
    trainer = RewardTrainer(model, encoded, training, settings.seed, tokenizer.pad_token_id,
                            collate=lambda sequences, generator: _pad_right(sequences, tokenizer.pad_token_id,
                                                                            settings.max_position_offset, generator))
    bar = tqdm(total=trainer.steps, desc="reward model", disable=None if settings.progress else True)
    trainer.train(callback=lambda stats: (bar.update(1), bar.set_postfix(loss=f"{stats['train/loss']:.3f}", refresh=False)))
    bar.close()
    _stage(settings, f"reward model: {settings.reward_steps} steps, last loss {trainer.history[-1]['train/loss']:.3f}")
    return model


# --- Evaluation --------------------------------------------------------------------------------


def _auc(positive: list[float], negative: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


# --- The whole bootstrap -----------------------------------------------------------------------


def _reusable(record_path: Path, md5: str, settings: BootstrapSettings, out_dir: Path) -> dict | None:
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    weights_present = all((out_dir / name / "model.safetensors").is_file() for name in ("instruct", "reward"))
    if record.get("data_md5") == md5 and record.get("settings") == settings.fingerprint() and weights_present:
        return record
    return None


def bootstrap(
    data_dir: Path = Path("data/demo"),
    out_dir: Path = Path("artifacts/demo"),
    settings: BootstrapSettings | None = None,
    force: bool = False,
) -> BootstrapReport:
    """Train tokenizer, instruct model and reward model into out_dir/{instruct,reward}. Two processes bootstrapping at
    once (two `make demo`s, or test workers) take turns: the second reuses what the first built."""
    settings = settings or BootstrapSettings()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock", timeout_seconds=1800):
        return _bootstrap(data_dir, out_dir, settings, force)


def _bootstrap(data_dir: Path, out_dir: Path, settings: BootstrapSettings, force: bool) -> BootstrapReport:
    md5 = data_md5(data_dir)
    record_path = out_dir / "bootstrap.json"
    if not force and (record := _reusable(record_path, md5, settings, out_dir)) is not None:
        report = record["report"]
        return BootstrapReport(**{**report, "instruct_dir": Path(report["instruct_dir"]), "reward_dir": Path(report["reward_dir"]), "skipped": True})

    timings: dict[str, float] = {}
    started = time.perf_counter()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    prompts = [row["prompt"] for row in read_jsonl(data_dir / "prompts.jsonl", ("prompt",))]
    texts = [row["text"] for row in read_jsonl(data_dir / "sft.jsonl", ("text",))]
    pairs = read_jsonl(data_dir / "preferences.jsonl", ("prompt", "chosen", "rejected"))
    random.Random(settings.seed).shuffle(pairs)
    holdout = max(1, int(len(pairs) * settings.reward_holdout))
    train_pairs, heldout_pairs = pairs[holdout:], pairs[:holdout]

    with _torch_threads(settings.num_threads):
        tokenizer = train_tokenizer(texts, settings.vocab_size, settings.n_positions)
        timings["tokenizer_s"] = time.perf_counter() - started

        clock = time.perf_counter()
        instruct = train_instruct(texts, tokenizer, settings)
        timings["instruct_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        reward = train_reward(train_pairs, instruct, tokenizer, settings)
        timings["reward_s"] = time.perf_counter() - clock

        # saved before the evaluation, whose scorer sets the tokenizer up for itself (left truncation)
        for name, model in (("instruct", instruct), ("reward", reward)):
            model.save_pretrained(out_dir / name)
            tokenizer.save_pretrained(out_dir / name)

        # The evaluation samples and scores as the pipeline does: its sampler (generate) and its scorer, which reads
        # each text as written (no EOS appended: the reward model was trained on texts without one).
        clock = time.perf_counter()
        scorer = RewardScorer(reward, tokenizer)
        chosen = scorer([pair["prompt"] for pair in heldout_pairs], [pair["chosen"] for pair in heldout_pairs]).tolist()
        rejected = scorer([pair["prompt"] for pair in heldout_pairs], [pair["rejected"] for pair in heldout_pairs]).tolist()
        prefers_chosen = [c > r for c, r in zip(chosen, rejected)]
        truly_chosen = [gold_score(p["prompt"] + p["chosen"]) > gold_score(p["prompt"] + p["rejected"]) for p in heldout_pairs]

        eval_prompts = random.Random(settings.seed).sample(prompts, min(settings.eval_samples, len(prompts)))
        generated = generate(instruct, tokenizer, eval_prompts, GenerationConfig(max_new_tokens=settings.max_new_tokens),
                             seed=settings.seed)
        samples = [prompt + completion for prompt, completion in zip(eval_prompts, generated.completions)]
        sample_scores = scorer(eval_prompts, generated.completions).tolist()
        positive = [is_gold_positive(text) for text in samples]
        timings["evaluate_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - started

    report = BootstrapReport(
        instruct_dir=out_dir / "instruct",
        reward_dir=out_dir / "reward",
        data_md5=md5,
        reward_accuracy=sum(p == t for p, t in zip(prefers_chosen, truly_chosen)) / len(heldout_pairs),
        reward_accuracy_labels=sum(prefers_chosen) / len(heldout_pairs),
        reward_sample_auc=_auc([s for s, g in zip(sample_scores, positive) if g], [s for s, g in zip(sample_scores, positive) if not g]),
        instruct_gold_positive_share=sum(positive) / len(samples),
        instruct_well_formed_share=sum(map(is_well_formed, samples)) / len(samples),
        instruct_eos_share=sum(generated.ended_with_eos) / len(samples),
        timings={name: round(seconds, 2) for name, seconds in timings.items()},
        samples=samples[:8],
    )
    record = {"data_md5": md5, "settings": settings.fingerprint(), "report": report.to_json()}
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return report
