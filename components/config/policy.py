"""The policy stage's configuration (`alignflow run`): data, policy, critic, reward model, judge, evaluation and
gates; its training sections (rl, generation, memory, launch) are in training.py."""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from components.config.common import (
    ALLOW_PICKLE,
    GOLD_SCORER_PACKAGES,
    PROJECT_ROOT,
    CheckpointConfig,
    DataSource,
    ModelSource,
    LoraConfig,
    Section,
    TrackingConfig,
    check_model_ref,
    flatten,
    gold_scorer_allowed,
)
from components.config.estimators import ESTIMATORS
from components.config.training import (
    GenerationConfig,
    LaunchConfig,
    MemoryConfig,
    RLConfig,
)

DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


class DataConfig(DataSource):
    """The prompts a run trains and evaluates on. Which rows are left out, and why, is reported by row number."""

    source: str = Field("data/demo/prompts.jsonl", description=DataSource.model_fields["source"].description)
    format: Literal["text", "conversational", "dialogue", "implicit"] = Field(
        "text",
        description="What a row holds: text (prompt_field is the prompt), conversational (prompt_field is a list of "
        "{role, content}), dialogue (prompt_field is a Human:/Assistant: transcript awaiting the assistant), or "
        "implicit (chosen_field and rejected_field are whole transcripts; the prompt is their shared part up to "
        "the last Assistant: turn, as in Anthropic's hh-rlhf). conversational and implicit are the reward stage's "
        "(and TRL's) names; messages and preference, their old names here, still load.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (formats text, conversational, dialogue).")
    prompt_template: str | None = Field(None, description="Optional template with a {prompt} placeholder (format text).")
    max_prompt_chars: int = Field(1000, gt=0, description="Prompts longer than this many characters are reported and left out.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts (after filtering).")
    eval_size: int = Field(64, gt=0, description="Held-out evaluation prompts, split off with `seed`.")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise ValueError("must contain the placeholder {prompt}")
        return value


class PolicyConfig(ModelSource):
    """The policy: the instruct LM that RL trains, and the reference it is held near (its starting point)."""

    model: str = Field("artifacts/demo/instruct", description=ModelSource.model_fields["model"].description)
    use_chat_template: bool = Field(
        False,
        description="Render prompts with the policy tokenizer's chat template: a conversation (data.format conversational, "
        "dialogue or implicit) with its turns and roles, a text prompt as one user turn. false: a conversation is "
        "written as a Human:/Assistant: transcript ending with Assistant:.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)


class CriticConfig(Section):
    """The critic V(s_t) that GAE needs: a value head on the policy, a model of its own, or none."""

    type: Literal["shared", "separate", "none"] = Field(
        "shared",
        description="shared: a value head on the policy's last hidden state (one forward for both); separate: a model "
        "of its own (causal LMs); none: no critic (only for an advantage estimator that needs none).",
    )
    model: str | None = Field(
        None,
        description="A separate critic's initial model. None: the reward model when it shares the policy's vocabulary "
        "(its scoring head starts the value head, as TRL and OpenRLHF do), else a copy of the policy's backbone.",
    )
    allow_pickle: bool = Field(False, description=ALLOW_PICKLE)

    @field_validator("model")
    @classmethod
    def _check_critic(cls, value: str | None) -> str | None:
        return None if value is None else check_model_ref(value)


class RewardConfig(ModelSource):
    model: str = Field("artifacts/demo/reward", description=ModelSource.model_fields["model"].description)
    label: str | int | None = Field(None, description="Label name (as in id2label) or index; None for a single output.")
    score: Literal["logit", "probability"] = Field("logit", description="The chosen output's logit, or its probability.")
    text: Literal["prompt_and_completion", "completion"] = Field(
        "prompt_and_completion", description="What the reward model reads: prompt + completion, or the completion alone (a summary)."
    )
    append_eos: bool = Field(
        True,
        description="The reward model reads its tokenizer's EOS after a completion the policy ended with EOS, so it "
        "sees the text is finished (as TRL's and OpenRLHF's PPO do); not added where the tokenizer already ends every "
        "text with it (T5, BERT). The same fact as the reward stage's model.append_eos, in this stage's section for the "
        "reward model.",
    )
    max_length: int = Field(256, gt=0, description="Reward-model inputs are truncated to this many tokens.")
    conversation_format: Literal["auto", "chat_template", "transcript"] = Field(
        "auto",
        description="How the reward model reads a conversation prompt and its completion: with its own tokenizer's "
        "chat template (as TRL does), or as a Human:/Assistant: transcript; auto: the chat template if its tokenizer "
        "has one.",
    )
    score_batch_size: int = Field(64, gt=0, description="Texts the reward model scores per forward (not a training batch).")
    normalize: bool = Field(False, description="Normalise scores with a running mean/std.")
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip].")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of completions without EOS.")

    @field_validator("label")
    @classmethod
    def _label_index_non_negative(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("a label index must be >= 0")
        return value


class EvaluationConfig(Section):
    """Evaluation runs on the held-out prompts (`data.eval_size`), the same ones for every policy."""

    seed: int = Field(1234, description="Sampling seed of every evaluation: the reference, the candidate and the champion alike.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples of the bootstrap confidence intervals.")
    num_samples_logged: int = Field(16, ge=0, description="Held-out prompts whose completions are logged (eval_samples.json).")
    gold_scorer: str | None = Field(
        None, description="Optional ground-truth judge, `module:function` (text -> bool/float), e.g. the demo's "
        "components.demo.gold:is_gold_positive. Only a public function of this project's own packages ("
        + ", ".join(GOLD_SCORER_PACKAGES) + ") can be named: the setting travels as a flow parameter, and importing "
        "any module:function (os:system) would run whatever a configuration names."
    )

    @field_validator("gold_scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError("must look like package.module:function")
        module, function = value.split(":")
        if not gold_scorer_allowed(module, function):
            raise ValueError(f"not a gold scorer alignflow may import: name a public function of this project's own "
                             f"packages ({', '.join(p + '.' for p in GOLD_SCORER_PACKAGES)}), e.g. "
                             "components.demo.gold:is_gold_positive")
        return value


class GatesConfig(Section):
    min_score_gain: float = Field(0.0, description="The candidate's mean score gain over the reference must be at least this.")
    significant_gain: bool = Field(True, description="The gain's bootstrap 95% CI must lie above zero (its lower bound > 0).")
    min_win_rate: float = Field(0.5, ge=0, le=1, description="Share of held-out prompts the candidate must win (ties count half).")
    max_kl: float = Field(10.0, ge=0, description="Largest KL (nats per completion) of the candidate from the reference.")
    min_length_ratio: float = Field(0.5, ge=0, description="Candidate mean completion length over the reference's: at least this.")
    max_length_ratio: float = Field(2.0, gt=0, description="Candidate mean completion length over the reference's: at most this.")
    min_distinct2: float = Field(0.2, ge=0, le=1, description="Distinct bigrams over all bigrams of the candidate's completions.")
    beats_champion: bool = Field(True, description="When a champion exists, the candidate's mean score must be higher than its.")
    judge_gain: bool = Field(
        True, description="With a judge (a second, held-out reward model), its score gain's bootstrap 95% CI must lie "
        "above zero too: a gain only the trained-against reward model sees is reward hacking."
    )

    @model_validator(mode="after")
    def _ratio_bounds(self) -> "GatesConfig":
        if self.min_length_ratio > self.max_length_ratio:
            raise ValueError("gates.min_length_ratio must be <= gates.max_length_ratio")
        return self


class RunConfig(Section):
    name: str = Field("alignflow", description="The MLflow run's name.")
    seed: int = Field(0, description="Seeds the prompt split, sampling, minibatch order and prompt order.")
    data: DataConfig = Field(default_factory=DataConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    judge: RewardConfig | None = Field(
        None, description="Optional held-out reward model (e.g. trained by the reward stage on a disjoint split) that "
        "scores the evaluation's completions beside the reward model, never the training's; see gates.judge_gain."
    )
    rl: RLConfig = Field(default_factory=RLConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> "RunConfig":
        if self.rl.gradient_accumulation_steps % self.launch.num_processes:
            raise ValueError(
                f"rl.gradient_accumulation_steps ({self.rl.gradient_accumulation_steps}) must be a multiple of "
                f"launch.num_processes ({self.launch.num_processes}): each process takes the same number of micro-batches"
            )
        problem = self.rl.estimator.critic_problem(self.critic.type)
        if problem:
            raise ValueError(problem)
        if self.generation.generation_batch_size is not None and self.launch.num_processes > 1:
            raise ValueError(f"generation.generation_batch_size is for one process; with launch.num_processes="
                             f"{self.launch.num_processes} each process samples its own share of the batch: leave it unset")
        return self

    @model_validator(mode="before")
    @classmethod
    def _critic_follows_the_estimator(cls, data: Any) -> Any:
        """A critic-free estimator builds no critic: critic.type defaults to none for it (a critic asked for explicitly
        is refused by `_across_sections`, naming both keys)."""
        if not isinstance(data, dict):
            return data
        rl, critic = data.get("rl"), data.get("critic")
        estimator = rl.get("advantage_estimator", "gae") if isinstance(rl, dict) else getattr(rl, "advantage_estimator", "gae")
        if estimator not in ESTIMATORS or ESTIMATORS[estimator].needs_critic:
            return data
        if isinstance(critic, CriticConfig):
            asked = critic.type if "type" in critic.model_fields_set else None
            critic = critic.model_dump(exclude_unset=True)
        else:
            critic = dict(critic or {})
            asked = critic.get("type")
        return data if asked is not None else {**data, "critic": {**critic, "type": "none"}}

    def trainer_sections(self) -> dict[str, Any]:
        """The sections the engine takes (components.rl.build_trainer's keyword arguments), not the whole run."""
        return {"rl": self.rl, "generation": self.generation, "reward": self.reward, "critic": self.critic,
                "lora": self.policy.lora, "seed": self.seed, "use_chat_template": self.policy.use_chat_template,
                "memory": self.memory}

    @property
    def policy_dtype(self):
        """The dtype the policy loads in: a LoRA policy's base is frozen (memory.frozen_dtype); a fully trained
        policy is held in memory.trained_precision's weight dtype."""
        return self.memory.frozen_torch_dtype if self.policy.lora.enabled else self.memory.trained_dtype

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for logging as MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
