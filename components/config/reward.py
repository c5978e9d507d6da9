"""The reward-model stage's configuration (`alignflow reward run`): preference pairs, the model, its training,
evaluation and gates."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from components.config.common import (
    ALLOW_PICKLE,
    PROJECT_ROOT,
    TRUST_REMOTE_CODE,
    CheckpointConfig,
    DataSource,
    LoraConfig,
    Section,
    TrackingConfig,
    check_model_ref,
    flatten,
    refuse_remote_code,
)
from components.config.policy import EvaluationConfig

REWARD_CONFIG = PROJECT_ROOT / "configs" / "reward.yaml"


class PreferenceDataConfig(DataSource):
    """The human preference pairs a reward model learns from. Bad rows are reported by row number, never dropped
    silently; the held-out pairs are split off with the run's seed."""

    source: str = Field("data/demo/preferences.jsonl", description=DataSource.model_fields["source"].description)
    format: Literal["auto", "explicit", "implicit", "conversational"] = Field(
        "auto",
        description="explicit: prompt, chosen and rejected columns of text; implicit: chosen and rejected whole "
        "Human:/Assistant: transcripts whose shared part is the prompt (hh-rlhf); conversational: chosen and rejected "
        "message lists (and an optional prompt list); auto: told by the columns and the first row.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (explicit; optional in conversational).")
    margin_field: str | None = Field(None, description="Optional column of how much chosen is preferred (the loss's margin).")
    max_pairs: int | None = Field(None, gt=0, description="Use at most this many pairs (after the bad rows are left out).")
    num_shards: int = Field(1, gt=0, description="Split the rows into this many disjoint shards by row number (e.g. 2: a reward model and its judge).")
    shard: int = Field(0, ge=0, description="The shard this run reads: rows N with (N - 1) % num_shards == shard.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the pairs held out for evaluation and the gates.")

    @model_validator(mode="after")
    def _shard_in_range(self) -> "PreferenceDataConfig":
        if self.shard >= self.num_shards:
            raise ValueError(f"data.shard ({self.shard}) must be below data.num_shards ({self.num_shards})")
        return self


class RewardModelConfig(Section):
    """The model trained to score prompt + answer: any sequence-classification model with one output."""

    base: str = Field("artifacts/demo/instruct", description="Hub id, local path or models:/NAME@ALIAS of the model to start from.")
    revision: str | None = Field(None, description="The hub revision (branch, tag or commit) of a hub model.")
    max_length: int = Field(256, gt=0, description="Tokens of prompt + answer; longer pairs are reported and left out.")
    append_eos: bool = Field(
        True, description="Each answer is read with the tokenizer's EOS after it, as the policy pipeline's scorer reads "
        "a finished completion (reward.append_eos there: the same fact, in that stage's section for the reward model)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    allow_pickle: bool = Field(False, description=ALLOW_PICKLE)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE)

    @field_validator("base")
    @classmethod
    def _check_base(cls, value: str) -> str:
        return check_model_ref(value)

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        return refuse_remote_code(value)


class RewardTrainingConfig(Section):
    """The pairwise Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected - margin), with AdamW."""

    learning_rate: float = Field(1e-5, gt=0, lt=1, description="AdamW's peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's weight decay.")
    batch_size: int = Field(32, gt=0, description="Pairs per optimizer step (chosen and rejected go through one forward).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    sampling: Literal["epochs", "with_replacement"] = Field(
        "epochs", description="epochs: every pair once per epoch, in a new seeded order each epoch (as TRL); "
        "with_replacement: each batch drawn at random (the demo bootstrap's)."
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; set, it overrides epochs.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps the learning rate warms up over, linearly.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="The decay after warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Where cosine and linear decay end, as a share of the peak.")
    center_rewards_coef: float | None = Field(
        None, ge=0, description="Weight of mean(r^2) in the loss, keeping scores near 0 (Eisenstein et al. 2023; TRL's)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null: no clipping.")
    disable_dropout: bool = Field(
        True, description="Train with every dropout of the model at 0, as TRL's reward trainer does, so a "
        "score in training is the score evaluation gives; false: the base model's dropout, its masks drawn from the seed."
    )


class RewardEvaluationConfig(Section):
    """On the held-out pairs: accuracy (with a bootstrap CI), margins, score distributions, calibration, length bias."""

    seed: int = Field(1234, description="Seed of the bootstrap resamples.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples of the accuracy's bootstrap confidence interval.")
    length_buckets: int = Field(4, gt=0, description="Accuracy is reported per quantile bucket of the answers' length.")
    calibration_bins: int = Field(10, gt=1, description="Bins of P(chosen preferred) in the reliability plot.")
    score_batch_size: int = Field(64, gt=0, description="Texts scored per forward (not a training batch).")
    gold_scorer: str | None = Field(
        None, description="Optional ground-truth judge, `module:function` (text -> float): the share of held-out pairs "
        "the reward model orders as it does is reported (eval/.../gold_accuracy), e.g. the demo's gold_score."
    )

    @field_validator("gold_scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        return EvaluationConfig._module_function(value)


class RewardGatesConfig(Section):
    """Only a reward model that passes every gate is promoted."""

    min_accuracy: float = Field(0.6, ge=0, le=1, description="Held-out pairwise accuracy must be at least this.")
    significant: bool = Field(True, description="The accuracy's bootstrap 95% CI must lie above 0.5 (its lower bound > 0.5).")
    beats_champion: bool = Field(
        True, description="When a reward-model champion exists, held-out accuracy on the same pairs must be strictly "
        "above the champion's: a tie keeps the champion (as the policy stage's gates.beats_champion)."
    )


class RewardCheckpointConfig(CheckpointConfig):
    """What a reward-model run keeps on disk for `alignflow reward run --resume RUN_ID`; its cadence is in optimizer
    steps (the policy stage's, in iterations)."""

    every: int = Field(100, gt=0, description="Optimizer steps between checkpoints (each logged to MLflow).")


class RewardTrackingConfig(TrackingConfig):
    experiment: str = Field("alignflow-reward", description="The MLflow experiment reward-model runs are recorded in.")
    registered_model: str = Field("alignflow-reward", description="The registered model each reward model is a version of.")
    champion_alias: str = Field("champion", description="The alias of the reward model policies are trained against.")


class RewardRunConfig(Section):
    """One run of the reward-model stage: preference pairs in, a gated, registered reward model out."""

    name: str = Field("alignflow-reward", description="The MLflow run's name.")
    seed: int = Field(0, description="Seeds the held-out split, the model's new head, the order of pairs and dropout's masks.")
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    training: RewardTrainingConfig = Field(default_factory=RewardTrainingConfig)
    evaluation: RewardEvaluationConfig = Field(default_factory=RewardEvaluationConfig)
    gates: RewardGatesConfig = Field(default_factory=RewardGatesConfig)
    checkpoint: RewardCheckpointConfig = Field(default_factory=RewardCheckpointConfig)
    tracking: RewardTrackingConfig = Field(default_factory=RewardTrackingConfig)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for logging as MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
