"""Model coverage: every policy family (causal and encoder-decoder, full and LoRA) and every reward-model
family goes through PPO; LoRA's reference is the base model; LoRA policies register and generate."""

import math

import mlflow
import pytest
import torch
from support import POLICY_FAMILIES, REWARD_FAMILIES, SEQ2SEQ_FAMILIES, save_tiny_policy, save_tiny_reward, build_trainer_with
from support import one_thread, word_share  # noqa: F401
from transformers import PreTrainedTokenizerFast

from components.models import uris

from components.tracking import registry, runs as tracking
from components.config import GenerationConfig, RunConfig, TrackingConfig
from components.models.loading import load_policy, load_tokenizer
from components.rl import PromptError
from components.models.loading import fuse_gelu
from components.rl.roles import AdapterDisabled
from components.rl.forward import response_logprobs
from components.rl.tokenization import tokenize_prompts
from components.rl.reward import RewardScorer

PROMPTS = ["the film was", "I loved the movie", "the plot is", "it was a", "the acting", "we hated it but", "the music", "this movie"]
LORA_TARGETS = {"gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "mistral": {"q_proj", "v_proj"},
                "opt": {"q_proj", "v_proj"}, "gpt_neox": {"query_key_value"}, "t5": {"q", "v"}, "bart": {"q_proj", "v_proj"}}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    return {family: save_tiny_policy(root / family, family) for family in POLICY_FAMILIES}


def run_config(policy_dir, lora=False, **sections):
    tree = {
        "policy": {"model": str(policy_dir), "lora": {"enabled": lora, "r": 4, "alpha": 8}},
        "rl": {"rollout_batch_size": 8, "mini_batch_size": 8, "update_epochs": 1, "learning_rate": 1e-2},
        "generation": {"max_new_tokens": 6, "max_prompt_tokens": 8},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return RunConfig.model_validate(tree)


def tokenizer_of(model_dir):
    """The saved word-level tokenizer. AutoTokenizer maps model type qwen2 to Qwen2Tokenizer whatever was saved
    (right for real Qwen2 checkpoints, not for these tiny ones), so qwen2 folders are read as they were written."""
    if '"qwen2"' in (model_dir / "config.json").read_text():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return tokenizer
    return load_tokenizer(str(model_dir))


def trainer_for(policy_dir, lora=False, reward_fn=None, **sections):
    cfg = run_config(policy_dir, lora, **sections)
    return build_trainer_with(cfg, load_policy(str(policy_dir)), tokenizer_of(policy_dir), reward_fn or word_share("good"))


def finite(stats):
    return all(math.isfinite(v) for k, v in stats.items() if k != "val/explained_variance")


def reference_logprobs(trainer, model):
    """log-probs of fixed responses under `model`, on the trainer's own prompts."""
    generation = trainer.generation
    side = "right" if trainer.encoder_decoder else "left"
    queries, query_mask = tokenize_prompts(trainer.tokenizer, PROMPTS, generation, padding_side=side)
    responses = torch.tensor([[4 + (i + j) % 20 for j in range(5)] for i in range(len(PROMPTS))])
    mask = torch.ones_like(responses, dtype=torch.float32)
    with torch.inference_mode():
        return response_logprobs(model, queries, query_mask, responses, mask)


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_full_fine_tune_of_each_policy_family(policies, family):
    trainer = trainer_for(policies[family])
    assert trainer.encoder_decoder == (family in SEQ2SEQ_FAMILIES)
    first = trainer.run_iteration(PROMPTS)
    # one epoch, one minibatch: the update's forward reproduces the rollout's log-probs
    assert first["policy/approxkl"] < 1e-10 and first["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    second = trainer.run_iteration(PROMPTS)
    assert finite(first) and finite(second)
    assert second["objective/kl"] != 0.0 and trainer.iteration == 2


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_lora_on_each_policy_family_trains_the_adapter_against_the_base_model(policies, family, tmp_path):
    trainer = trainer_for(policies[family], lora=True)
    trainable = {name for name, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == LORA_TARGETS[family]
    assert isinstance(trainer.reference, AdapterDisabled)  # no second copy of the weights

    first = trainer.run_iteration(PROMPTS)
    assert first["policy/approxkl"] < 1e-10
    second = trainer.run_iteration(PROMPTS)
    assert finite(second) and second["objective/kl"] != 0.0  # the adapter moved the policy

    base = load_policy(str(policies[family]))
    fuse_gelu(base)  # as the trainer does to its policy (same function, other rounding)
    torch.testing.assert_close(reference_logprobs(trainer, trainer.reference), reference_logprobs(trainer, base), atol=1e-6, rtol=0)
    assert not torch.allclose(reference_logprobs(trainer, trainer.policy), reference_logprobs(trainer, base), atol=1e-4)
    assert all(p.requires_grad for name, p in trainer.policy.named_parameters() if name in trainable)  # re-enabled after the reference pass

    # the checkpoint holds the adapter (and the value head), and restores them
    trainer.save_checkpoint(tmp_path / "ckpt")
    restored = trainer_for(policies[family], lora=True)
    restored.load_checkpoint(tmp_path / "ckpt")
    for (name, a), b in zip(trainer.policy.named_parameters(), restored.policy.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(trainer.value_head.weight, restored.value_head.weight, atol=0, rtol=0)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ckpt" / "policy.safetensors")) == trainable
    assert restored.run_iteration(PROMPTS)["iteration"] == 3


def test_a_full_checkpoint_does_not_load_into_a_lora_trainer(policies, tmp_path):
    full = trainer_for(policies["gpt2"])
    full.save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="trainable weights"):
        trainer_for(policies["gpt2"], lora=True).load_checkpoint(tmp_path / "ckpt")


def test_the_kind_of_policy_comes_from_its_config_not_its_name(tmp_path):
    misleading = save_tiny_policy(tmp_path / "gpt2-small", "t5")
    model = load_policy(str(misleading))
    assert model.config.is_encoder_decoder and type(model).__name__ == "T5ForConditionalGeneration"


def test_seq2seq_completions_are_the_decoder_output_and_the_value_head_reads_the_decoder(policies):
    seen = []

    def record(prompts, completions):
        seen.extend(completions)
        return torch.zeros(len(completions))

    trainer = trainer_for(policies["t5"], reward_fn=record)
    exp, _ = trainer.experience_maker.make(PROMPTS, trainer.kl_ctl.kl_coef, 1, trainer.sample_generator)
    assert exp.queries.shape[0] == len(PROMPTS) and exp.query_mask[:, 0].all()  # right-padded for the encoder
    assert not any(completion.startswith(prompt) for prompt, completion in zip(PROMPTS, seen) if completion)
    assert exp.values.abs().sum() == 0  # zero-initialised value head on the decoder's hidden states
    with pytest.raises(ValueError, match="shared value head"):
        trainer_for(policies["t5"], critic={"type": "separate"})


def test_chat_template_renders_prompts_as_a_user_turn_and_its_absence_is_an_error(tmp_path, policies):
    chat_dir = save_tiny_policy(tmp_path / "chat", "llama", chat=True)
    tokenizer = tokenizer_of(chat_dir)
    queries, mask = tokenize_prompts(tokenizer, ["the film"], GenerationConfig(), use_chat_template=True)
    assert tokenizer.decode(queries[0][mask[0].bool()]) == "<bos> the film <eos> I"
    trainer = trainer_for(chat_dir, policy={"use_chat_template": True})
    assert finite(trainer.run_iteration(PROMPTS))
    with pytest.raises(PromptError, match="has no chat template"):
        trainer_for(policies["llama"], policy={"use_chat_template": True})


# --- reward models ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", REWARD_FAMILIES)
def test_each_reward_model_family_scores_in_batches_and_drives_ppo(policies, family, tmp_path):
    classifier = family not in ("llama", "qwen2")
    reward_dir = save_tiny_reward(tmp_path / family, family, num_labels=2 if classifier else 1)
    settings = {"model": str(reward_dir), "max_length": 12, "score_batch_size": 3}
    if classifier:
        settings.update(label="nothate", score="probability")
    cfg = run_config(policies["gpt2"], reward=settings)
    tokenizer = tokenizer_of(reward_dir) if family == "qwen2" else None  # else the scorer loads its own
    scorer = RewardScorer.from_config(cfg.reward, tokenizer=tokenizer)
    assert scorer.tokenizer.get_vocab() != load_tokenizer(str(policies["gpt2"])).get_vocab()

    long = " ".join(["the film was very good"] * 20)
    prompts, completions = PROMPTS[:7] + [long], [" good", " bad", "", " fine .", " boring", " great fun", " ,", " good"]
    scores = scorer(prompts, completions)
    assert scores.shape == (8,) and bool(scores.isfinite().all())
    if classifier:
        assert bool(((scores > 0) & (scores < 1)).all())
    one_batch = RewardScorer(scorer.model, scorer.tokenizer, scorer.index if classifier else None, scorer.score, 12, 64)
    torch.testing.assert_close(one_batch(prompts, completions), scores, atol=1e-5, rtol=0)

    trainer = build_trainer_with(cfg, load_policy(str(policies["gpt2"])), load_tokenizer(str(policies["gpt2"])), scorer)
    history = trainer.train(PROMPTS, iterations=2).history
    assert len(history) == 2 and all(finite(stats) for stats in history)


# --- registration -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    config = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="families")
    tracking.use_tracking(config)
    yield config
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


@pytest.mark.parametrize("family, save_mode", [("gpt2", "adapter"), ("t5", "merged")])
def test_a_lora_policy_registers_and_generates_through_pyfunc(policies, store, tmp_path, family, save_mode):
    trainer = trainer_for(policies[family], lora=True)
    trainer.run_iteration(PROMPTS)
    exported = trainer.export_policy(tmp_path / "policy", merge=save_mode == "merged")
    assert (exported / "adapter_config.json").exists() == (save_mode == "adapter")
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(store)) as run:
        uri = registry.log_policy(exported, model_config={"max_new_tokens": 4})
        version = registry.register(f"{family}-policy", run.info.run_id, uri, {"gates_passed": True})
    output = mlflow.pyfunc.load_model(f"models:/{family}-policy/{version.version}").predict(["the film was"])
    text = output[0] if isinstance(output[0], str) else output[0]["generated_text"]
    assert isinstance(text, str) and text.strip()

    # and it resolves to a folder the pipeline loads again (champion evaluation, or a new run's policy)
    path = uris.resolve_model_uri(f"models:/{family}-policy/{version.version}", cache_dir=tmp_path / "cache")
    reloaded = load_policy(path)
    expected = reference_logprobs(trainer, trainer.policy)
    # A merged adapter computes x(W + BA) where the trained policy computes xW + (xA)B: equal up to float32 rounding,
    # which over a few tokens' log-probabilities reaches about 1e-5 (1.3e-5 seen); the adapter itself reloads exactly.
    torch.testing.assert_close(reference_logprobs(trainer, reloaded), expected, atol=1e-4 if save_mode == "merged" else 1e-5, rtol=0)


def test_the_flan_t5_lab_config_validates():
    from components.config import PROJECT_ROOT, load_config

    cfg = load_config(PROJECT_ROOT / "configs" / "flan-t5-detox.yaml")
    assert cfg.policy.model == "google/flan-t5-base" and cfg.policy.lora.enabled
    assert (cfg.policy.lora.r, cfg.policy.lora.alpha, cfg.policy.lora.target_modules) == (32, 32, ["q", "v"])
    assert (cfg.reward.model, cfg.reward.label, cfg.reward.score) == ("facebook/roberta-hate-speech-dynabench-r4-target", "nothate", "logit")
    assert (cfg.data.source, cfg.data.prompt_field, cfg.data.check_dvc) == ("knkarthick/dialogsum", "dialogue", False)
    assert cfg.data.prompt_template == "Summarize the following conversation.\n\n{prompt}\n\nSummary: "
    assert (cfg.rl.learning_rate, cfg.rl.update_epochs, cfg.rl.mini_batch_size, cfg.rl.rollout_batch_size) == (1.41e-5, 1, 4, 16)
    assert cfg.generation.max_new_tokens == 100


def test_fused_gelu_is_the_same_function_in_one_kernel(tiny_lm_dir):
    model, fused = load_policy(str(tiny_lm_dir)), load_policy(str(tiny_lm_dir))
    assert fuse_gelu(fused) == model.config.n_layer and fuse_gelu(fused) == 0  # one per block, once
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert fused.config.activation_function == "gelu_new"  # what it saves is unchanged


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_the_static_kv_cache_samples_what_the_dynamic_one_samples(policies, family):
    """generation.kv_cache: transformers' StaticCache (allocated once) and a DynamicCache give each family the same
    tokens (greedy, top_k 1) and the same log-probabilities to float rounding; an encoder-decoder keeps its own cache."""
    from components.rl.sampler import kv_cache, sample
    from components.rl.tokenization import eos_token_ids, pad_id, prompt_padding_side

    policy, tokenizer = load_policy(str(policies[family])), tokenizer_of(policies[family])
    rollouts = []
    for kind in ("dynamic", "static"):
        generation = GenerationConfig(max_new_tokens=6, max_prompt_tokens=8, top_k=1, kv_cache=kind)
        queries, mask = tokenize_prompts(tokenizer, PROMPTS, generation, padding_side=prompt_padding_side(policy))
        rollouts.append(sample(policy, queries, mask, generation, eos_token_ids(tokenizer, policy), pad_id(tokenizer),
                               torch.Generator().manual_seed(0)))
    dynamic, static = rollouts
    assert torch.equal(dynamic.responses, static.responses)
    torch.testing.assert_close(dynamic.logprobs, static.logprobs, atol=1e-5, rtol=1e-5)
    if family not in SEQ2SEQ_FAMILIES:
        from transformers import DynamicCache, StaticCache

        assert isinstance(kv_cache(policy, "static", 16), StaticCache)  # every causal family here supports it
        assert isinstance(kv_cache(policy, "auto", 16), StaticCache if torch.cuda.is_available() else DynamicCache)
