import os
import sys
from pathlib import Path

# Offline and quiet, before any library reads its settings.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny import save_tiny_lm, save_tiny_reward_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a word-level tokenizer, saved with save_pretrained."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    """A GPT-2 sequence classifier with one output, sharing the tiny tokenizer."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("tiny-reward"))
