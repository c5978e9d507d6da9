"""Train a reward model on human preference pairs with the pairwise Bradley-Terry loss.

    r_c, r_r = r(x, y_chosen), r(x, y_rejected)       one forward over the 2B texts of B pairs
    loss = -log sigmoid(r_c - r_r - margin) + center_rewards_coef * mean(r^2)

The model is any `AutoModelForSequenceClassification` with one output (a causal LM's body gets a new scoring head,
as InstructGPT starts its reward model from the SFT model); LoRA optional. It reads each pair as the policy
pipeline's `RewardScorer` will score it (`components.rl.reward.reward_text`): prompt + answer, a conversation through
the tokenizer's chat template, and the EOS after the answer (`model.append_eos`).

Each step takes the next `batch_size` pairs of the epoch's order, a permutation drawn from (seed, epoch) alone
(`training.sampling: epochs`), or draws them at random from a seeded generator (`with_replacement`); the generator's
state, the optimizer's, the schedule's and the history are in every checkpoint: a run resumed from a checkpoint
takes the same steps as one that never stopped. A non-finite loss or gradient stops training before its optimizer step (`TrainingError`).

Dropout is off in training (`training.disable_dropout`, TRL's default too): every dropout module at p = 0 and the rates
attention layers keep as numbers (Llama's `attention_dropout`) at 0. Kept on, its masks come from torch's global
generator, which training takes from a state of its own, seeded from the run's seed and kept in every checkpoint;
nothing else of the process's draws reaches it. The same configuration and pairs therefore give the same steps, bit
for bit, on the same CPU with the same number of torch threads.

The demo kit's bootstrap trains the demo's reward model with this same trainer (components/demo/bootstrap.py).

Statistics of an optimizer step (to `train`'s callback; the flow logs them by `pairs`):

| name            | meaning                                                                        |
|-----------------|--------------------------------------------------------------------------------|
| train/loss      | the step's loss: Bradley-Terry (+ center_rewards_coef x mean score^2)          |
| train/accuracy  | share of the step's pairs whose chosen answer scores above the rejected one    |
| train/margin    | mean over the step's pairs of score(chosen) - score(rejected)                  |
| train/grad_norm | the gradient's global norm before clipping (training.max_grad_norm)            |
| train/lr        | learning rate of the step                                                      |
| step            | optimizer steps done                                                           |
| pairs           | preference pairs trained on: step x training.batch_size                        |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from components.config import RewardModelConfig, RewardTrainingConfig
from components.rl.reward import eos_suffix, reward_text
from components.checkpoint import write_atomically
from components.errors import TrainingError
from components.models.safety import loading
from components.models.loading import load_tokenizer, with_lora

Collate = Callable[[list[list[int]], torch.Generator], dict[str, torch.Tensor]]
STATE_FILE = "trainer_state.pt"


@dataclass
class EncodedPairs:
    """Token ids of each pair's two texts, and its margin (0 where the data gives none)."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    margins: list[float]

    def __len__(self) -> int:
        return len(self.chosen)


def pair_texts(pair, tokenizer: PreTrainedTokenizerBase, append_eos: bool, chat: bool) -> tuple[list[int], list[int]]:
    """The token ids of prompt + chosen and prompt + rejected, as the reward model reads them."""
    suffix = eos_suffix(tokenizer) if append_eos else ""
    ids = []
    for answer in (pair.chosen, pair.rejected):
        text, templated = reward_text(tokenizer, pair.prompt, answer, chat)
        ids.append(tokenizer(text if templated else text + suffix, add_special_tokens=not templated)["input_ids"])
    return ids[0], ids[1]


def encode_pairs(pairs: list, tokenizer: PreTrainedTokenizerBase, append_eos: bool = True) -> EncodedPairs:
    """`pairs` (components.data.preferences.PreferencePair) as token ids; conversations through the chat template when
    the tokenizer has one (as RewardScorer's conversation_format auto), else as transcripts."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    encoded = [pair_texts(pair, tokenizer, append_eos, chat) for pair in pairs]
    return EncodedPairs([c for c, _ in encoded], [r for _, r in encoded],
                        [0.0 if pair.margin is None else float(pair.margin) for pair in pairs])


def pad_right(pad_id: int) -> Collate:
    """Right padding with an attention mask: each row's last real token is where a decoder's head reads the score."""
    def collate(sequences: list[list[int]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        length = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return collate


def load_base(model: RewardModelConfig, seed: int, allow_pickle: bool | None = None):
    """(the reward model to train, its tokenizer): `model.base` with one output; a base without a trained scoring
    head gets one initialised with `seed`, as do LoRA's adapters. `model.base` must be a local path or hub id
    (registry URIs resolved)."""

    tokenizer = load_tokenizer(model.base, model.revision, padding_side="right")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = loading(model.base, "model.base", model.allow_pickle if allow_pickle is None else allow_pickle,
                          lambda **safe: AutoModelForSequenceClassification.from_pretrained(
                              model.base, revision=model.revision, num_labels=1, dtype=torch.float32, **safe))
        network.config.pad_token_id = tokenizer.pad_token_id
        if model.lora.enabled:  # its A matrices are drawn from torch's global generator, the seeded one here
            network = with_lora(network, model.lora, task_type="SEQ_CLS")
    return network, tokenizer


DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                   torch.nn.FeatureAlphaDropout)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of `model` at 0, in place: its dropout modules' p, and the float rates layers keep by name
    (`attention_dropout`, `dropout`, `layerdrop`); the model's config, which is what it is saved with, is left as it is."""
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(module, name, 0.0)


def lr_factor(step: int, steps: int, training: RewardTrainingConfig) -> float:
    """The learning rate at `step` as a share of the peak: linear warm-up, then cosine or linear decay to
    `min_lr_ratio`, or constant."""
    warmup = round(steps * training.warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    if training.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    floor = training.min_lr_ratio
    if training.lr_schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def total_steps(training: RewardTrainingConfig, num_pairs: int) -> int:
    return training.max_steps or max(1, math.ceil(training.epochs * num_pairs / training.batch_size))


class RewardTrainer:
    """Bradley-Terry training of `model` on `pairs`; `collate` batches token ids (default: right padding)."""

    def __init__(self, model: torch.nn.Module, pairs: EncodedPairs, training: RewardTrainingConfig, seed: int,
                 pad_id: int, collate: Collate | None = None):
        if len(pairs) == 0:
            raise ValueError("no training pairs")
        self.model, self.pairs, self.training = model, pairs, training
        if training.disable_dropout:
            disable_dropout(model)
        self.collate = collate or pad_right(pad_id)
        self.steps = total_steps(training, len(pairs))
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, self.steps, training))
        self.generator = torch.Generator().manual_seed(seed + 1)
        # torch's global generator as training finds it: dropout's masks (and any other global draw of the model's)
        self.global_rng = torch.Generator().manual_seed(seed + 2).get_state()
        self.seed = seed
        self._orders: dict[int, list[int]] = {}
        self.step = 0
        self.history: list[dict[str, float]] = []

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def train(self, until: int | None = None, callback: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Optimizer steps up to `until` (default: the end); returns their statistics (also in `history`)."""
        until = self.steps if until is None else min(until, self.steps)
        self.model.train()
        done = []
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.global_rng)
            self._steps(until, callback, done)
        self.model.eval()
        return done

    def _steps(self, until: int, callback, done: list[dict[str, float]]) -> None:
        """`train`'s loop, run with torch's global generator at `global_rng`, which it keeps up to date."""
        batch_size, center = self.training.batch_size, self.training.center_rewards_coef
        margins = torch.tensor(self.pairs.margins)
        has_margins = bool((margins != 0).any())
        while self.step < until:
            index = self.batch_indices()
            sequences = [self.pairs.chosen[i] for i in index] + [self.pairs.rejected[i] for i in index]
            rewards = self.model(**self.collate(sequences, self.generator)).logits[:, 0].float()
            r_chosen, r_rejected = rewards.chunk(2)
            difference = r_chosen - r_rejected - margins[index] if has_margins else r_chosen - r_rejected
            loss = -F.logsigmoid(difference).mean()
            if center:
                loss = loss + center * rewards.pow(2).mean()
            if not torch.isfinite(loss):
                raise TrainingError(f"step {self.step + 1}: non-finite loss {loss.item()}; no optimizer step was taken "
                                    "for it (the last checkpoint is intact): lower training.learning_rate")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.training.max_grad_norm or float("inf"))
            if not torch.isfinite(norm):
                raise TrainingError(f"step {self.step + 1}: non-finite gradient norm; no optimizer step was taken for it "
                                    "(the last checkpoint is intact): lower training.learning_rate")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.global_rng = torch.get_rng_state()
            stats = {"step": float(self.step), "pairs": float(self.step * batch_size), "train/loss": loss.item(),
                     "train/accuracy": (r_chosen > r_rejected).float().mean().item(),
                     "train/margin": (r_chosen - r_rejected).mean().item(), "train/grad_norm": norm.item(), "train/lr": lr}
            self.history.append(stats)
            done.append(stats)
            if callback is not None:
                callback(stats)

    def batch_indices(self) -> list[int]:
        """The pairs of the next step: the next of the epoch's order (crossing into the next epoch's), or random."""
        n, batch_size = len(self.pairs), self.training.batch_size
        if self.training.sampling == "with_replacement":
            return torch.randint(0, n, (batch_size,), generator=self.generator).tolist()
        first = self.step * batch_size
        return [self.order(k // n)[k % n] for k in range(first, first + batch_size)]

    def order(self, epoch: int) -> list[int]:
        """The pairs' order in `epoch`: a permutation drawn from the seed and the epoch alone, so a resumed run has it."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {e: order for e, order in self._orders.items() if e == epoch - 1}  # a batch may span two
            self._orders[epoch] = torch.randperm(len(self.pairs), generator=generator).tolist()
        return self._orders[epoch]

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path) -> Path:
        """The model's trainable weights, optimizer, schedule, generators and history, written atomically."""
        def write(tmp: Path) -> None:
            torch.save({"model": {k: v for k, v in self.model.state_dict().items()},
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "generator": self.generator.get_state(), "global_rng": self.global_rng, "step": self.step,
                        "steps": self.steps}, tmp / STATE_FILE)
            (tmp / "history.json").write_text(json.dumps(self.history))
        return write_atomically(directory, write, key="checkpoint.dir")

    def load_checkpoint(self, directory: str | Path) -> None:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=True)
        if state["steps"] != self.steps:
            raise TrainingError(f"the checkpoint in {directory} is of a {state['steps']}-step run, this one has "
                                f"{self.steps} steps: resume with the configuration it was started with")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if "global_rng" in state:  # a checkpoint written before it was kept: training with dropout off needs none
            self.global_rng = state["global_rng"]
        self.step = state["step"]
        self.history = json.loads((Path(directory) / "history.json").read_text())


@torch.inference_mode()
def score_pairs(model: torch.nn.Module, pairs: EncodedPairs, pad_id: int, batch_size: int = 64) -> tuple[list[float], list[float]]:
    """(scores of the chosen texts, scores of the rejected texts), right-padded as RewardScorer batches them."""
    model.eval()
    collate, generator = pad_right(pad_id), torch.Generator()
    scores = {}
    for name, texts in (("chosen", pairs.chosen), ("rejected", pairs.rejected)):
        scores[name] = []
        for start in range(0, len(texts), batch_size):
            scores[name] += model(**collate(texts[start : start + batch_size], generator)).logits[:, 0].float().tolist()
    return scores["chosen"], scores["rejected"]
