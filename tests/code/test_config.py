import warnings

import pytest

from components.config import RewardRunConfig, DEMO_CONFIG, RENAMED_KEYS, ConfigDeprecation, ConfigError, RunConfig, load_config
from components.config import given_keys, renamed


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_demo_config_is_valid_and_complete():
    config = load_config()
    assert config.policy.model == "artifacts/demo/instruct"
    assert {"data", "policy", "critic", "reward", "rl", "generation", "launch", "checkpoint", "gates", "tracking"} <= set(RunConfig.model_fields)
    assert load_config(DEMO_CONFIG) == config


def test_overrides_parse_yaml_values_and_nest():
    config = load_config(overrides=["rl.learning_rate=1e-5", "reward.label=nothate", "reward.label=1", "rl.adaptive_kl=true"])
    assert config.rl.learning_rate == 1e-5
    assert config.reward.label == 1
    assert config.rl.adaptive_kl is True


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"rl\.learnig_rate: unknown key"):
        load_config(write(tmp_path, "rl:\n  learnig_rate: 0.1\n"))


def test_unknown_section_in_override_is_named():
    with pytest.raises(ConfigError, match=r"optim: unknown key"):
        load_config(overrides=["optim.lr=1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"rl\.rollout_batch_size: .*integer.*got 'many'"):
        load_config(overrides=["rl.rollout_batch_size=many"])


def test_out_of_range_names_key_and_bound():
    with pytest.raises(ConfigError, match=r"rl\.clip_range: Input should be greater than 0"):
        load_config(overrides=["rl.clip_range=-0.1"])
    with pytest.raises(ConfigError, match=r"generation\.top_p: Input should be less than or equal to 1"):
        load_config(overrides=["generation.top_p=1.5"])


def test_choices_are_listed():
    with pytest.raises(ConfigError, match=r"reward\.score: Input should be 'logit' or 'probability'"):
        load_config(overrides=["reward.score=softmax"])


def test_batch_sizes_must_divide():
    with pytest.raises(ConfigError, match=r"\n  rl.rollout_batch_size x rl.samples_per_prompt \(60 x 1 episodes\) must be "
                                          r"a multiple of rl.mini_batch_size \(16\)"):
        load_config(overrides=["rl.rollout_batch_size=60"])
    # episodes count completions: 12 prompts x 4 samples fill three minibatches of 16
    assert load_config(overrides=["rl.rollout_batch_size=12", "rl.samples_per_prompt=4"]).rl.episodes_per_iteration == 48
    with pytest.raises(ConfigError, match=r"rl.gradient_accumulation_steps \(1\) must be a multiple of launch.num_processes \(2\)"):
        load_config(overrides=["launch.num_processes=2"])
    assert load_config(overrides=["launch.num_processes=2", "rl.gradient_accumulation_steps=4"]).launch.num_processes == 2


def test_model_uris():
    assert load_config(overrides=["policy.model=models:/alignflow-policy@champion"]).policy.model.endswith("@champion")
    assert load_config(overrides=["reward.model=models:/rm/3"]).reward.model == "models:/rm/3"
    assert load_config(overrides=["policy.model=gpt2"]).policy.model == "gpt2"
    with pytest.raises(ConfigError, match=r"policy\.model: 'models:/x@' is not a registry URI"):
        load_config(overrides=["policy.model=models:/x@"])
    with pytest.raises(ConfigError, match=r"reward\.model: must name a model"):
        load_config(overrides=["reward.model=''"])


def test_prompt_template_needs_placeholder():
    with pytest.raises(ConfigError, match=r"data\.prompt_template: must contain the placeholder \{prompt\}"):
        load_config(overrides=["data.prompt_template=Review this"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "rl: [unclosed\n"))
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["rl.learning_rate"])
    with pytest.raises(ConfigError, match="rl.learning_rate is not a section"):
        load_config(overrides=["rl.learning_rate.x=1"])


def test_flat_params_cover_every_setting():
    flat = load_config().flat()
    assert flat["rl.learning_rate"] == 1e-4
    assert flat["policy.lora.r"] == 8
    assert "tracking.registered_model" in flat


def test_multi_machine_settings_are_checked_and_named():
    multi = ["launch.num_processes=4", "rl.gradient_accumulation_steps=4", "launch.num_machines=2"]
    config = load_config(overrides=[*multi, "launch.node_deployment=alignflow-train-node/gpu", "launch.main_process_ip=10.0.0.1"])
    assert (config.launch.num_machines, config.launch.node_deployment, config.launch.main_process_port) == (2, "alignflow-train-node/gpu", None)
    with pytest.raises(ConfigError, match=r"launch\.num_processes \(4\) is the total over launch\.num_machines \(3\)"):
        load_config(overrides=[*multi, "launch.num_machines=3", "launch.node_deployment=a/b"])
    with pytest.raises(ConfigError, match=r"launch\.num_machines is 2: set launch\.node_deployment"):
        load_config(overrides=multi)
    with pytest.raises(ConfigError, match=r"launch\.node_deployment: must name a deployment as FLOW/DEPLOYMENT"):
        load_config(overrides=[*multi, "launch.node_deployment=gpu"])


def test_the_node_flows_old_name_is_refused_naming_the_new_one():
    with pytest.raises(ConfigError, match=r"\n  launch\.node_deployment: the node flow alignflow-ppo-node is now "
                                          r"alignflow-train-node: set alignflow-train-node/gpu and deploy it \(prefect deploy --all\)"):
        load_config(overrides=["launch.num_processes=4", "rl.gradient_accumulation_steps=4", "launch.num_machines=2",
                               "launch.node_deployment=alignflow-ppo-node/gpu"])
    with pytest.raises(ConfigError, match=r"launch\.main_process_port: .*less than or equal to 65535"):
        load_config(overrides=["launch.main_process_port=70000"])
    with pytest.raises(ConfigError, match=r"launch\.main_process_ip: must be a host name or IPv4 address"):
        load_config(overrides=["launch.main_process_ip=http://10.0.0.1"])


def test_a_config_written_for_the_last_release_keeps_its_meaning_with_a_warning_naming_each_new_key(tmp_path):
    old = write(tmp_path, """
policy: {model: artifacts/demo/instruct, value_head: separate}
ppo: {batch_size: 32, mini_batch_size: 8, ppo_epochs: 2, lam: 0.9, max_steps: 640, horizon: 500,
      iterations_per_epoch: 5, checkpoint_dir: ckpts, num_processes: 1}
gates: {beat_champion: false}
""")
    with pytest.warns(ConfigDeprecation) as warned:
        config = load_config(old)
    said = " ".join(str(w.message) for w in warned)
    for old_key, new_key in (("ppo.batch_size", "rl.rollout_batch_size"), ("ppo.max_steps", "rl.total_episodes"),
                             ("policy.value_head", "critic.type"), ("gates.beat_champion", "gates.beats_champion")):
        assert f"{old_key} is now {new_key}" in said
    assert (config.rl.rollout_batch_size, config.rl.update_epochs, config.rl.gae_lambda, config.rl.total_episodes) == (32, 2, 0.9, 640)
    assert (config.critic.type, config.rl.kl_horizon, config.checkpoint.every, config.checkpoint.dir) == ("separate", 500, 5, "ckpts")
    assert config.gates.beats_champion is False
    with pytest.warns(ConfigDeprecation, match=r"--set ppo.max_steps is now --set rl.total_episodes"):
        assert load_config(overrides=["ppo.max_steps=64"]).rl.total_episodes == 64  # an old override wins, as it did
    assert all(new.split(".")[0] in RunConfig.model_fields for new in RENAMED_KEYS.values())


def notices(load) -> tuple[object, list[str]]:
    """What `load()` returns, and the messages of the ConfigDeprecation warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    return result, [str(w.message) for w in caught if issubclass(w.category, ConfigDeprecation)]


@pytest.mark.parametrize("old, new, schema", [
    ("rl.target_reward", "rl.target_score", RunConfig),
    ("gates.min_reward_gain", "gates.min_score_gain", RunConfig),
    ("reward.batch_size", "reward.score_batch_size", RunConfig),
    ("judge.batch_size", "judge.score_batch_size", RunConfig),
    ("training.checkpoint_every", "checkpoint.every", RewardRunConfig),
    ("evaluation.batch_size", "evaluation.score_batch_size", RewardRunConfig),
])
def test_a_key_renamed_in_this_release_loads_from_a_file_or_set_with_one_notice_naming_its_new_name(tmp_path, old, new, schema):
    section, key = old.split(".")
    extra = "reward: {model: artifacts/demo/reward}\n" if section == "judge" else ""  # a judge needs its model
    path = write(tmp_path, f"{extra}{section}: {{{key}: 7}}\n")
    value = lambda config: config.flat()[new]  # noqa: E731
    config, said = notices(lambda: load_config(path, schema=schema))
    assert (value(config), said) == (7, [f"{path}: {old} is now {new} (the same setting); rename it"])
    overrides = [f"{old}=7"] + (["judge.model=artifacts/demo/reward"] if section == "judge" else [])
    config, said = notices(lambda: load_config(overrides=overrides, schema=schema))
    assert (value(config), said) == (7, [f"--set {old} is now --set {new} (the same setting)"])


@pytest.mark.parametrize("old, new", [("preference", "implicit"), ("messages", "conversational")])
def test_a_data_format_renamed_in_this_release_loads_with_one_notice_naming_its_new_name(tmp_path, old, new):
    path = write(tmp_path, f"data: {{format: {old}}}\n")
    config, said = notices(lambda: load_config(path))
    assert (config.data.format, said) == (new, [f"{path}: data.format: {old} is now data.format: {new} (the same "
                                                "setting); rename it"])
    config, said = notices(lambda: load_config(overrides=[f"data.format={old}"]))
    assert (config.data.format, said) == (new, [f"--set data.format={old} is now --set data.format={new} (the same setting)"])


def test_a_resume_reads_an_earlier_releases_keys_and_values_under_this_releases_names(tmp_path):
    recorded = RunConfig().model_dump(mode="json")
    recorded["rl"]["target_reward"] = recorded["rl"].pop("target_score")
    recorded["data"]["format"], recorded["reward"]["batch_size"] = "messages", recorded["reward"].pop("score_batch_size")
    config, said = notices(lambda: RunConfig.model_validate(renamed(recorded)))
    assert (config.data.format, config.reward.score_batch_size, said) == ("conversational", 64, [])
    # the reward stage recorded a checkpoint.every it never read beside the training.checkpoint_every it used
    recorded = RewardRunConfig().model_dump(mode="json")
    recorded["training"]["checkpoint_every"], recorded["checkpoint"]["every"] = 50, 10
    assert RewardRunConfig.model_validate(renamed(recorded)).checkpoint.every == 50
    path = write(tmp_path, "rl: {target_reward: 1.0}\ndata: {format: preference}\n")
    assert given_keys(path, ["gates.min_reward_gain=0.5"]) == {"rl.target_score", "data.format", "gates.min_score_gain"}


def test_a_key_set_under_both_names_or_retired_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.max_steps and rl.total_episodes are both set"):
        load_config(write(tmp_path, "ppo: {max_steps: 10}\nrl: {total_episodes: 20}\n"))
    with pytest.raises(ConfigError, match=r"training.checkpoint_every and checkpoint.every are both set"):
        load_config(write(tmp_path, "training: {checkpoint_every: 10}\ncheckpoint: {every: 20}\n"), schema=RewardRunConfig)
    with pytest.raises(ConfigError, match=r"policy.lora.dropout: no longer a setting: LoRA dropout would make"):
        load_config(overrides=["policy.lora.dropout=0.05"])
    with pytest.raises(ConfigError, match=r"data.dvc_file: no longer a setting"):
        load_config(overrides=["data.dvc_file=data.dvc"])


def test_every_setting_has_a_one_line_description():
    from pydantic import BaseModel

    def undescribed(model: type[BaseModel], prefix: str = "") -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                missing += undescribed(annotation, f"{prefix}{name}.")
            elif not field.description:
                missing.append(prefix + name)
        return missing

    assert undescribed(RunConfig) == []
    assert undescribed(RewardRunConfig) == []


def test_the_reward_stage_has_its_own_configuration_with_the_same_rules(tmp_path):
    config = load_config(schema=RewardRunConfig)  # configs/reward.yaml
    assert config.data.source == "data/demo/preferences.jsonl" and config.training.max_steps == 600
    assert config.flat()["tracking.registered_model"] == "alignflow-reward"
    with pytest.raises(ConfigError, match="data.format: Input should be 'auto', 'explicit', 'implicit' or 'conversational'"):
        load_config(overrides=["data.format=pairs"], schema=RewardRunConfig)
    with pytest.raises(ConfigError, match="training.batch_size: Input should be greater than 0"):
        load_config(overrides=["training.batch_size=0"], schema=RewardRunConfig)
    with pytest.raises(ConfigError, match="model.base: 'models:/x' is not a registry URI"):
        load_config(overrides=["model.base=models:/x"], schema=RewardRunConfig)
    with pytest.raises(ConfigError, match="rl: unknown key"):
        load_config(overrides=["rl.learning_rate=1"], schema=RewardRunConfig)
    judged = load_config(overrides=["judge.model=models:/judge@champion"])  # the policy's judge: a reward model's settings
    assert judged.judge.model == "models:/judge@champion" and load_config().judge is None
