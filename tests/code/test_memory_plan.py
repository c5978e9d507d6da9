"""The memory model (components/models/memory_plan.py, `alignflow plan`): shapes from config files only, the per-role
arithmetic by hand, the fit check before loading, and the command. How close it comes to real runs is measured by
benchmarks/memory_model.py (README, Memory)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from components.config import RunConfig, apply_overrides
from components.errors import UserError
from components.models.memory_plan import GIB, MemoryPlanError, Shape, check_fits, plan_for_shapes, plan_run, shape_of_config
from support import cli_in_child

LLAMA = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128)
GPT2 = GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=128)


@pytest.mark.parametrize("config, model_class", [(GPT2, GPT2LMHeadModel), (LLAMA, LlamaForCausalLM)])
def test_shapes_come_from_the_config_alone_and_count_every_parameter(config, model_class):
    shape = shape_of_config(config.__class__.from_dict(config.to_dict()))
    model = model_class(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.hidden, shape.vocab) == (3, 64, 300)
    assert shape.tied_embeddings == (config is GPT2)  # GPT-2 ties its LM head to the embedding; Llama does not
    assert shape.gated_mlp == (config is LLAMA)
    assert (shape.kv_heads, shape.head_dim) == ((2, 16) if config is LLAMA else (4, 16))


@pytest.mark.parametrize("config, model_class", [(GPT2, GPT2LMHeadModel), (LLAMA, LlamaForCausalLM)])
def test_lora_parameters_are_those_peft_injects(config, model_class):
    from components.config import LoraConfig
    from components.models.loading import with_lora

    lora = LoraConfig(enabled=True, r=8)
    shape = shape_of_config(config.__class__.from_dict(config.to_dict()), lora=lora)
    adapted = with_lora(model_class(config), lora)
    assert shape.lora_params == sum(p.numel() for p in adapted.parameters() if p.requires_grad)


SHAPE = Shape(params=1000, layers=2, hidden=8, intermediate=32, kv_heads=2, head_dim=4, vocab=50, gated_mlp=False)
REWARD = Shape(params=500, layers=1, hidden=8, intermediate=32, kv_heads=2, head_dim=4, vocab=50, gated_mlp=False)


def run_config(*overrides: str) -> RunConfig:
    base = RunConfig.model_validate({
        "critic": {"type": "shared"},
        "rl": {"rollout_batch_size": 4, "mini_batch_size": 4, "gradient_accumulation_steps": 2},
        "generation": {"max_prompt_tokens": 6, "max_new_tokens": 4},
    })
    return apply_overrides(base, list(overrides))


def lines(plan) -> dict[str, int]:
    return {line.role: line.bytes for line in plan.lines}


def test_each_role_by_hand():
    plan = lines(plan_for_shapes(run_config(), SHAPE, REWARD))
    assert plan["policy weights"] == 1000 * 4
    assert plan["AdamW state"] == 2 * 1000 * 4
    assert plan["reference"] == 1000 * 4
    assert plan["reward model"] == 500 * 4
    assert plan["critic weights + AdamW"] == 3 * (8 + 1) * 4  # the shared value head
    assert plan["gradients"] == (1000 + 9) * 4
    assert plan["KV cache"] == 2 * 2 * 2 * 4 * (6 + 4) * 4 * 4  # 2 (k, v) x layers x kv heads x head dim x tokens x rows x 4 B
    assert plan["activations"] == 2 * (6 * 8 + 3 * 32) * (6 + 4) * 2 * 4  # micro-batch 2 (4 / 2 accumulation steps)
    assert plan["update logits"] == 3.5 * 2 * 4 * 50 * 4  # 3.5 copies x micro-batch 2 x 4 response tokens x V x 4 B
    assert plan["rollout forward logits"] == 2 * 4 * 4 * 50 * 4  # the reference's forward over the 4 rows at once
    assert plan["accumulated gradients"] == plan["gradients"]  # micro-batch 2 of 2 backs up on the first one's


def test_precision_lora_checkpointing_and_generation_micro_batches_change_their_lines():
    base = lines(plan_for_shapes(run_config(), SHAPE, REWARD))
    bf16 = lines(plan_for_shapes(run_config("memory.frozen_dtype=bfloat16"), SHAPE, REWARD))
    assert (bf16["reference"], bf16["reward model"]) == (base["reference"] // 2, base["reward model"] // 2)
    mixed = lines(plan_for_shapes(run_config("memory.trained_precision=bf16_mixed"), SHAPE, REWARD))
    assert mixed["policy weights"] == base["policy weights"] and mixed["activations"] == base["activations"] * 3 // 4
    assert mixed["autocast weight copies"] == 1000 * 2 and "autocast weight copies" not in base
    pure = lines(plan_for_shapes(run_config("memory.trained_precision=bfloat16"), SHAPE, REWARD))
    assert pure["policy weights"] == base["policy weights"] // 2 and pure["AdamW state"] == base["AdamW state"] // 2
    assert pure["activations"] == base["activations"] // 2
    assert pure["reference"] == base["reference"] // 2  # a pure-bf16 policy's copy stays bf16 whatever frozen_dtype says
    checkpointed = lines(plan_for_shapes(run_config("memory.activation_checkpointing=true"), SHAPE, REWARD))
    assert checkpointed["activations"] == 2 * (6 + 4) * (2 * 8 + 6 * 8 + 3 * 32) * 4  # layer inputs + one layer
    lora = lines(plan_for_shapes(run_config("policy.lora.enabled=true", "memory.frozen_dtype=bfloat16"),
                                 Shape(**{**SHAPE.__dict__, "lora_params": 100}), REWARD))
    assert lora["reference"] == 0 and lora["AdamW state"] == 2 * 100 * 4
    assert lora["policy weights"] == 1000 * 2 + 100 * 4  # the frozen base in bf16, the adapters in float32
    micro = lines(plan_for_shapes(run_config("generation.generation_batch_size=1"), SHAPE, REWARD))
    assert micro["KV cache"] == base["KV cache"] // 4


def test_fsdp_shards_what_the_processes_train(tmp_path):
    accelerate = tmp_path / "fsdp.yaml"
    accelerate.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n")
    single = lines(plan_for_shapes(run_config(), SHAPE, REWARD))
    sharded = plan_for_shapes(run_config("launch.num_processes=2", f"launch.accelerate_config={accelerate}",
                                         "rl.gradient_accumulation_steps=2"), SHAPE, REWARD)
    assert sharded.sharded and lines(sharded)["policy weights"] == single["policy weights"] // 2
    assert lines(sharded)["AdamW state"] == single["AdamW state"] // 2
    assert lines(sharded)["reference"] == single["reference"]  # frozen models are whole on every process
    offload = tmp_path / "offload.yaml"
    offload.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: true\n")
    offloaded = plan_for_shapes(run_config("launch.num_processes=2", f"launch.accelerate_config={offload}"), SHAPE, REWARD)
    assert offloaded.offloaded and lines(offloaded)["AdamW state"] == lines(offloaded)["gradients"] == 0  # in CPU memory
    # on the device: two layers in use and the embeddings (2 x 50 x 8, untied), in float32
    assert lines(offloaded)["policy weights"] == (2 * (1000 - 800) // 2 + 800) * 4


def test_the_peak_is_what_stays_plus_the_larger_phase():
    plan = plan_for_shapes(run_config(), SHAPE, REWARD, device_bytes=10 * GIB)
    assert plan.peak_bytes == plan.total("resident") + max(plan.total(phase) for phase in ("rollout", "backward", "step"))
    assert plan.fits is True
    assert plan_for_shapes(run_config(), SHAPE, REWARD, device_bytes=1000).fits is False


def test_a_run_too_large_for_its_device_is_refused_before_loading_with_what_would_fit(tiny_lm_dir, tiny_reward_dir):
    config = run_config(f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}")
    peak = plan_run(config).peak_bytes
    tight = apply_overrides(config, [f"memory.device_memory_gb={(peak - 1000) / GIB}"])  # just too small
    with pytest.raises(MemoryPlanError) as refused:
        check_fits(tight)
    message = str(refused.value)
    assert isinstance(refused.value, UserError) and refused.value.exit_code == 2
    assert f"needs about {peak / GIB:.2f} GiB" in message and "memory.check_fit=false" in message
    assert "--set memory.frozen_dtype=bfloat16" in message  # the first remedy that fits
    assert check_fits(apply_overrides(tight, ["memory.check_fit=false"])).fits is False  # the override: tried anyway


def test_alignflow_plan_prints_each_role_and_says_whether_it_fits(tiny_lm_dir, tiny_reward_dir, capfd):
    models = ["--set", f"policy.model={tiny_lm_dir}", "--set", f"reward.model={tiny_reward_dir}"]
    assert cli_in_child(["plan", *models]) == 0
    out = capfd.readouterr().out
    for role in ("policy weights", "AdamW state", "reference", "reward model", "KV cache", "activations", "runtime"):
        assert role in out
    assert "fits" in out
    assert cli_in_child(["plan", *models, "--device-gb", "0.05"]) == 1
    out = capfd.readouterr().out
    assert "does not fit" in out and "nothing here fits" in out
    assert cli_in_child(["plan", "--set", "memory.frozen_dtype=float8"]) == 2
    assert "memory.frozen_dtype" in capfd.readouterr().err


def test_frozen_bf16_plan_matches_the_bytes_a_loaded_model_holds(tiny_reward_dir):
    from transformers import AutoConfig

    from components.models.loading import load_reward_model

    shape = shape_of_config(AutoConfig.from_pretrained(tiny_reward_dir), "classifier")
    model = load_reward_model(str(tiny_reward_dir), dtype=torch.bfloat16)
    plan = lines(plan_for_shapes(run_config("memory.frozen_dtype=bfloat16"), shape, shape))
    assert plan["reward model"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_the_gpu_check_skips_cleanly_saying_why_where_there_is_no_gpu():
    import json
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/gpu_check.sh runs for real there")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["skipped"] is True and line["reason"].startswith("no usable NVIDIA GPU: ")
