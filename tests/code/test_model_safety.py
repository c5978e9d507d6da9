"""Loading a model runs none of its code: safetensors only unless a key allows pickle, no trust_remote_code."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from components.config import ConfigError, load_config
from components.models.safety import UnsafeModelError
from components.models.loading import load_policy, load_reward_model
from components.rl.reward import RewardScorer
from support import save_tiny_lm, save_tiny_reward_model


def pickle_only(folder: Path, model_class=AutoModelForCausalLM) -> Path:
    """The saved model with its weights as a pickle checkpoint (pytorch_model.bin) and no safetensors, as
    `save_pretrained(..., safe_serialization=False)` wrote before transformers 5 dropped that option."""
    torch.save(model_class.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors")) == ["pytorch_model.bin"]
    return folder


@pytest.fixture(scope="module")
def pickled_lm(tmp_path_factory) -> Path:
    return pickle_only(save_tiny_lm(tmp_path_factory.mktemp("pickled-lm")))


def test_a_pickle_only_policy_is_refused_naming_the_key(pickled_lm):
    with pytest.raises(UnsafeModelError) as refused:
        load_policy(str(pickled_lm))
    message = str(refused.value)
    assert message.startswith("policy.model: ") and "pytorch_model.bin" in message and "policy.allow_pickle: true" in message


def test_the_key_allows_pickle_for_that_model(pickled_lm, tiny_lm_dir):
    loaded = load_policy(str(pickled_lm), allow_pickle=True)
    reference = load_policy(str(tiny_lm_dir))  # the same seed and config: the same weights, from safetensors
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_pickle_only_reward_model_is_refused_naming_reward_allow_pickle(tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = pickle_only(save_tiny_reward_model(tmp_path / "reward"), AutoModelForSequenceClassification)
    config = load_config(None, [f"reward.model={folder}"])
    with pytest.raises(UnsafeModelError, match=r"^reward\.model: .*reward\.allow_pickle: true"):
        RewardScorer.from_config(config.reward)
    allowed = load_config(None, [f"reward.model={folder}", "reward.allow_pickle=true"])
    assert RewardScorer.from_config(allowed.reward)(["the film was"], [" good ."]).shape == (1,)
    with pytest.raises(UnsafeModelError, match="reward.allow_pickle"):
        load_reward_model(str(folder))


def test_a_config_naming_pickle_weights_is_refused(tmp_path, tiny_lm_dir):
    """config.json's transformers_weights would make transformers load the file it names whatever use_safetensors says."""
    folder = save_tiny_lm(tmp_path / "lm")
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = "adapter_model.bin"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError, match=r"transformers_weights.*policy\.allow_pickle"):
        load_policy(str(folder))


def test_a_model_asking_for_its_own_code_is_refused_naming_the_key(tmp_path):
    folder = save_tiny_lm(tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-own-gpt", auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_mine.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UnsafeModelError, match=r"^policy\.model: .*auto_map.*trust_remote_code stays off"):
        load_policy(str(folder))


def test_auto_map_on_an_architecture_transformers_implements_loads_transformers_own_code(tmp_path):
    folder = save_tiny_lm(tmp_path / "known")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_mine.py").write_text("raise SystemExit('remote code ran')\n")
    assert type(load_policy(str(folder))).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize("section", ["policy", "reward"])
def test_trust_remote_code_is_refused_by_name(section):
    with pytest.raises(ConfigError, match=rf"{section}\.trust_remote_code: alignflow never runs code shipped with a model"):
        load_config(None, [f"{section}.trust_remote_code=true"])
    assert load_config(None, [f"{section}.trust_remote_code=false"])  # the default, said out loud


def test_a_run_is_refused_a_pickle_only_policy_by_its_one_check_before_anything_loads(pickled_lm):
    """The models of a run are located and checked in one place (components/rl/build.py: locate_models), which the
    pipeline's input check (flows/tasks.py resolve, in stage.check_inputs: before the data, the models and the MLflow
    run) and every launched process (build_run) call; `alignflow run` hands its configuration to the flow, whose
    error ends the command in one line (tests/flows/test_bad_input.py)."""
    from components.rl.build import build_run, locate_models
    from flows import tasks

    config = load_config(None, [f"policy.model={pickled_lm}"])
    for check in (locate_models, tasks.resolve, build_run):
        with pytest.raises(UnsafeModelError, match=r"policy\.model: .* holds only a pickle checkpoint .*policy\.allow_pickle"):
            check(config)
