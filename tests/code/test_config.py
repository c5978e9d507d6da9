import pytest

from components.config import DEMO_CONFIG, ConfigError, RunConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_demo_config_is_valid_and_complete():
    config = load_config()
    assert config.policy.model == "artifacts/demo/instruct"
    assert {"data", "policy", "reward", "ppo", "generation", "gates", "tracking"} <= set(RunConfig.model_fields)
    assert load_config(DEMO_CONFIG) == config


def test_overrides_parse_yaml_values_and_nest():
    config = load_config(overrides=["ppo.learning_rate=1e-5", "reward.label=nothate", "reward.label=1", "ppo.adaptive_kl=true"])
    assert config.ppo.learning_rate == 1e-5
    assert config.reward.label == 1
    assert config.ppo.adaptive_kl is True


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo\.learnig_rate: unknown key"):
        load_config(write(tmp_path, "ppo:\n  learnig_rate: 0.1\n"))


def test_unknown_section_in_override_is_named():
    with pytest.raises(ConfigError, match=r"optim: unknown key"):
        load_config(overrides=["optim.lr=1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"ppo\.batch_size: .*integer.*got 'many'"):
        load_config(overrides=["ppo.batch_size=many"])


def test_out_of_range_names_key_and_bound():
    with pytest.raises(ConfigError, match=r"ppo\.clip_range: Input should be greater than 0"):
        load_config(overrides=["ppo.clip_range=-0.1"])
    with pytest.raises(ConfigError, match=r"generation\.top_p: Input should be less than or equal to 1"):
        load_config(overrides=["generation.top_p=1.5"])


def test_choices_are_listed():
    with pytest.raises(ConfigError, match=r"reward\.score: Input should be 'logit' or 'probability'"):
        load_config(overrides=["reward.score=softmax"])


def test_batch_sizes_must_divide():
    with pytest.raises(ConfigError, match=r"ppo.batch_size \(60\) must be a multiple of ppo.mini_batch_size \(16\)"):
        load_config(overrides=["ppo.batch_size=60"])
    with pytest.raises(ConfigError, match=r"ppo.gradient_accumulation_steps \(1\) must be a multiple of ppo.num_processes \(2\)"):
        load_config(overrides=["ppo.num_processes=2"])
    assert load_config(overrides=["ppo.num_processes=2", "ppo.gradient_accumulation_steps=4"]).ppo.num_processes == 2


def test_model_references():
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
        load_config(write(tmp_path, "ppo: [unclosed\n"))
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["ppo.learning_rate"])
    with pytest.raises(ConfigError, match="ppo.learning_rate is not a section"):
        load_config(overrides=["ppo.learning_rate.x=1"])


def test_flat_params_cover_every_setting():
    flat = load_config().flat()
    assert flat["ppo.learning_rate"] == 1e-4
    assert flat["policy.lora.r"] == 8
    assert "tracking.registered_model" in flat


def test_multi_machine_settings_are_checked_and_named():
    multi = ["ppo.num_processes=4", "ppo.gradient_accumulation_steps=4", "ppo.num_machines=2"]
    config = load_config(overrides=[*multi, "ppo.node_deployment=alignflow-ppo-node/gpu", "ppo.main_process_ip=10.0.0.1"])
    assert (config.ppo.num_machines, config.ppo.node_deployment, config.ppo.main_process_port) == (2, "alignflow-ppo-node/gpu", None)
    with pytest.raises(ConfigError, match=r"ppo\.num_processes \(4\) is the total over ppo\.num_machines \(3\)"):
        load_config(overrides=[*multi, "ppo.num_machines=3", "ppo.node_deployment=a/b"])
    with pytest.raises(ConfigError, match=r"ppo\.num_machines is 2: set ppo\.node_deployment"):
        load_config(overrides=multi)
    with pytest.raises(ConfigError, match=r"ppo\.node_deployment: must name a deployment as FLOW/DEPLOYMENT"):
        load_config(overrides=[*multi, "ppo.node_deployment=gpu"])
    with pytest.raises(ConfigError, match=r"ppo\.main_process_port: .*less than or equal to 65535"):
        load_config(overrides=["ppo.main_process_port=70000"])
    with pytest.raises(ConfigError, match=r"ppo\.main_process_ip: must be a host name or IPv4 address"):
        load_config(overrides=["ppo.main_process_ip=http://10.0.0.1"])
