"""The FLAN-T5 lab's shape through the whole pipeline: an encoder-decoder policy with a LoRA adapter,
a classifier reward model with its own tokenizer judging the summary by its `nothate` logit."""

import mlflow
import pytest
from support import save_tiny_policy, save_tiny_reward
from mlflow import MlflowClient

from flows.pipeline import pipeline


def test_flan_t5_shaped_lora_run_registers_an_adapter_that_generates(demo_data, small_run, tracking_uri, tmp_path):
    policy = save_tiny_policy(tmp_path / "flan-t5", "t5")
    reward = save_tiny_reward(tmp_path / "roberta-hate", "roberta", num_labels=2)
    result = pipeline(overrides=small_run(
        policy, reward,
        "critic.type=shared",  # the demo config's separate critic is for causal LMs (see the next test)
        "policy.lora.enabled=true", "policy.lora.r=4", "policy.lora.alpha=4",
        "policy.lora.target_modules=[q, v]", "policy.lora.save_mode=adapter",
        "reward.label=nothate", "reward.score=logit", "reward.text=completion",
        "data.prompt_template='Summarize the following conversation.\n\n{prompt}\n\nSummary: '",
        "rl.total_episodes=32", "gates.beats_champion=false",
    ))
    assert result.episodes == 32 and result.model_version == "1"
    assert result.candidate.kl is not None

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version("alignflow-policy", result.model_version)
    assert version.tags["alignflow.base_policy"] == str(policy)
    # an encoder-decoder's decoder positions are all response positions: nothing to pack
    assert client.get_run(result.run_id).data.tags["alignflow.packed_sequences"] == "none"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    generated = mlflow.pyfunc.load_model(f"models:/alignflow-policy/{result.model_version}").predict(["the film was"])
    assert len(generated) == 1 and isinstance(generated[0], str)


def test_an_encoder_decoder_policy_with_the_separate_critic_is_refused_naming_the_field(demo_data, small_run, tmp_path):
    policy = save_tiny_policy(tmp_path / "flan-t5", "t5")
    reward = save_tiny_reward(tmp_path / "roberta-hate", "roberta", num_labels=2)
    with pytest.raises(ValueError, match="critic.type=separate is for causal LMs"):
        pipeline(overrides=small_run(policy, reward, "critic.type=separate", "reward.label=nothate"))
