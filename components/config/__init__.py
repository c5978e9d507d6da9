"""The run configuration: one typed, validated source of truth for a whole run.

    common.py    what both stages share: the base section, model URIs, the data source's keys, LoRA,
                 checkpoints, tracking, the gold scorer allow-list
    policy.py    the policy stage's configuration (RunConfig, `alignflow run`): data, models, evaluation, gates
    training.py  how the policy stage trains: generation, rl (the advantage estimators), memory, launch
    estimators.py the advantage estimators' registry: one entry per algorithm, read by the configuration, the
                 engine (components/rl/core.py) and the README's algorithm table
    reward.py    the reward-model stage's (RewardRunConfig, `alignflow reward run`)
    loading.py   YAML, `--set` overrides, renamed keys and values, retired keys (load_config)
    document.py  a configuration validated once, handed on as it is: to a flow (Validated), to launched processes
                 and other machines (to_document, from_document)

Load it from YAML with `load_config(path, overrides)`; overrides are `section.key=value` strings (values parsed as
YAML, so `1e-5`, `true`, `[a, b]` work). Every error names the key and what is allowed. Relative paths (data, models,
checkpoints) are relative to the project root, so a run means the same thing from any working directory or Prefect
worker. Callers import from `components.config`; the modules are how it reads.
"""

from components.config.common import (
    GOLD_SCORER_PACKAGES, PROJECT_ROOT, CheckpointConfig, ConfigError, DataSource, LoraConfig, Section, TrackingConfig,
    flatten, gold_scorer_allowed, parse_registry_uri,
)
from components.config.loading import (
    RENAMED_KEYS, RENAMED_VALUES, RETIRED_KEYS, ConfigDeprecation, apply_overrides, given_keys, load_config, renamed,
)
from components.config.policy import (
    DEMO_CONFIG, CriticConfig, DataConfig, EvaluationConfig, GatesConfig, PolicyConfig, RewardConfig, RunConfig,
)
from components.config.reward import (
    REWARD_CONFIG, PreferenceDataConfig, RewardCheckpointConfig, RewardEvaluationConfig, RewardGatesConfig,
    RewardModelConfig, RewardRunConfig, RewardTrackingConfig, RewardTrainingConfig,
)
from components.config.training import DTYPES, GenerationConfig, LaunchConfig, MemoryConfig, RLConfig
from components.config.estimators import ESTIMATORS, Estimator
from components.config.document import Validated, from_document, to_document

__all__ = [
    "DEMO_CONFIG", "DTYPES", "ESTIMATORS", "Estimator", "GOLD_SCORER_PACKAGES", "PROJECT_ROOT",
    "RENAMED_KEYS", "RENAMED_VALUES", "RETIRED_KEYS", "REWARD_CONFIG", "CheckpointConfig", "ConfigDeprecation",
    "ConfigError", "CriticConfig", "DataConfig", "DataSource", "EvaluationConfig", "GatesConfig", "GenerationConfig",
    "LaunchConfig", "LoraConfig", "MemoryConfig", "PolicyConfig", "PreferenceDataConfig", "RLConfig",
    "RewardCheckpointConfig", "RewardConfig", "RewardEvaluationConfig", "RewardGatesConfig", "RewardModelConfig", "RewardRunConfig", "RewardTrackingConfig", "RewardTrainingConfig", "RunConfig", "Section",
    "TrackingConfig", "Validated", "apply_overrides", "flatten", "from_document", "given_keys", "gold_scorer_allowed", "load_config",
    "parse_registry_uri", "renamed", "to_document",
]
