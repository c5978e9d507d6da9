"""The run configuration: one typed, validated source of truth for a whole run.

    common.py    what both stages share: the base section, model references, the data source's keys, LoRA,
                 checkpoints, tracking, the gold scorer allow-list
    policy.py    the policy stage's configuration (RunConfig, `alignflow run`): data, models, evaluation, gates
    training.py  how the policy stage trains: generation, rl (the advantage estimators), memory, launch
    reward.py    the reward-model stage's (RewardRunConfig, `alignflow reward run`)
    loading.py   YAML, `--set` overrides, renamed and retired keys (load_config)

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
    RENAMED_KEYS, RETIRED_KEYS, ConfigDeprecation, apply_overrides, given_keys, load_config, renamed,
)
from components.config.policy import (
    DEMO_CONFIG, CriticConfig, DataConfig, EvaluationConfig, GatesConfig, PolicyConfig, RewardConfig, RunConfig,
)
from components.config.reward import (
    REWARD_CONFIG, PreferenceDataConfig, RewardEvaluationConfig, RewardGatesConfig, RewardModelConfig, RewardRunConfig,
    RewardTrackingConfig, RewardTrainingConfig,
)
from components.config.training import (
    ALGORITHM_OF_ESTIMATOR, DTYPES, ESTIMATORS, GenerationConfig, LaunchConfig, MemoryConfig, RLConfig,
)

__all__ = [
    "ALGORITHM_OF_ESTIMATOR", "DEMO_CONFIG", "DTYPES", "ESTIMATORS", "GOLD_SCORER_PACKAGES", "PROJECT_ROOT", "RENAMED_KEYS",
    "RETIRED_KEYS", "REWARD_CONFIG", "CheckpointConfig", "ConfigDeprecation", "ConfigError", "CriticConfig", "DataConfig",
    "DataSource", "EvaluationConfig", "GatesConfig", "GenerationConfig", "LaunchConfig", "LoraConfig", "MemoryConfig",
    "PolicyConfig", "PreferenceDataConfig", "RLConfig", "RewardConfig", "RewardEvaluationConfig", "RewardGatesConfig",
    "RewardModelConfig", "RewardRunConfig", "RewardTrackingConfig", "RewardTrainingConfig", "RunConfig", "Section",
    "TrackingConfig", "apply_overrides", "flatten", "given_keys", "gold_scorer_allowed", "load_config",
    "parse_registry_uri", "renamed",
]
