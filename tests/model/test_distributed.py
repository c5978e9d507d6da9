"""Data-parallel training (gloo, CPU): N processes over a global batch take the same step as one process, replicated
(DistributedDataParallel) or sharded (FSDP2), for PPO and for the critic-free group estimators (whose groups of k
completions stay whole on one process)."""

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import torch.distributed as dist
import torch.multiprocessing as mp
from support import build_trainer_with, one_thread, word_share  # noqa: F401

from components.config import PROJECT_ROOT, GenerationConfig, MemoryConfig, RLConfig, RewardConfig, load_config, to_document
from components.models.loading import load_causal_lm, load_tokenizer, load_policy
from components.rl import Trainer, distributed
from components.rl.launcher import free_port
from components.rl.reward import RewardScorer

PROMPTS = ["the film was", "I loved the movie", "the plot is", "it was a", "the acting", "we hated it but", "the music", "this movie"]
TIMING = ("perf/tokens_per_second", "time/rollout", "time/scoring", "time/update")
# Shares of tokens past a clipping boundary: a token sitting on the boundary (ratio 1 on the first minibatch)
# can flip on float noise, as the ranks' forwards pad their prompts to other widths than one process does.
CLIP_SHARES = ("policy/clipfrac", "val/clipfrac")
# Global batch 8 in minibatches of 4, each of 2 micro-batches (one per rank under 2 processes); global score
# normalisation and the adaptive KL controller, so every global statistic is exercised.
RL = dict(learning_rate=1e-3, rollout_batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2, update_epochs=2,
           kl_coef=0.05, adaptive_kl=True, target_kl=0.5, total_episodes=10_000)
# The same 8 episodes per iteration as 2 prompts x 4 completions: one whole group on each of 2 processes.
GRPO = {**RL, "advantage_estimator": "grpo", "samples_per_prompt": 4, "rollout_batch_size": 2}
DR_GRPO = {**GRPO, "advantage_estimator": "dr_grpo", "clip_range_high": 0.28}
ALGORITHMS = pytest.mark.parametrize("rl", [RL, GRPO], ids=["ppo", "grpo"])


def make_trainer(lm_dir, seed=0, rl=RL, memory=None):
    return Trainer(
        load_causal_lm(lm_dir), load_tokenizer(lm_dir), word_share("good"), RLConfig(**rl),
        GenerationConfig(max_new_tokens=8, max_prompt_tokens=8), RewardConfig(normalize=True), seed=seed,
        memory=None if memory is None else MemoryConfig(**memory),
    )


def run_iterations(trainer, iterations):
    return [trainer.run_iteration(trainer.next_prompts(PROMPTS)) for _ in range(iterations)]


def parameters(trainer):
    value_head = trainer.value_head.named_parameters() if trainer.value_head is not None else []
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters()} | {
        f"value_head.{name}": p.detach().clone() for name, p in value_head
    }


def _worker(rank: int, world: int, port: int, lm_dir: str, out: str, rl: dict) -> None:
    """One process as `accelerate launch --cpu` starts it: its place in the environment, Accelerate's state."""
    from accelerate import PartialState

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    PartialState(cpu=True)  # the gloo process group
    try:
        trainer = make_trainer(lm_dir, rl=rl)
        history = run_iterations(trainer, 2)
        trainer.save_checkpoint(Path(out) / "checkpoint")
        if distributed.is_main_process():
            torch.save({"history": history, "parameters": parameters(trainer)}, Path(out) / "result.pt")
        trainer.accelerator.free_memory()  # the DDP reducer goes before its process group (as launch.py does)
        del trainer
        gc.collect()
    finally:
        dist.destroy_process_group()


# What `accelerate launch --config_file infra/accelerate/fsdp.yaml` sets for the processes it starts.
FSDP_ENV = dict(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                FSDP_RESHARD_AFTER_FORWARD="true")


def resume(lm_dir, checkpoint, rl=RL, memory=None):
    trainer = make_trainer(lm_dir, rl=rl, memory=memory)
    trainer.load_checkpoint(checkpoint)
    return trainer


def _fsdp_worker(rank: int, world: int, port: int, lm_dir: str, out: str, rl: dict, memory: dict | None = None,
                 env: dict | None = None) -> None:
    """One FSDP process: an iteration, its checkpoint resumed by a new sharded trainer, a second iteration."""
    from accelerate import PartialState

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **FSDP_ENV, **(env or {}))
    PartialState(cpu=True)
    try:
        first = make_trainer(lm_dir, rl=rl, memory=memory)
        weight = first.policy.get_input_embeddings().weight
        from torch.distributed.fsdp import CPUOffloadPolicy

        from components.rl.precision import checkpointed_layers

        sharding = {"sharded": distributed.is_sharded(first.learner.module), "shard_rows": weight.to_local().shape[0],
                    "rows": weight.shape[0],
                    "offloaded": isinstance(first.learner.module._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy),
                    "checkpointed": all(layer.gradient_checkpointing for layer in checkpointed_layers(first.policy))}
        history = run_iterations(first, 1)
        first.save_checkpoint(Path(out) / "first")
        second = resume(lm_dir, Path(out) / "first", rl, memory)
        history += run_iterations(second, 1)
        second.save_checkpoint(Path(out) / "second")
        if distributed.is_main_process():
            torch.save({"history": history, **sharding}, Path(out) / "result.pt")
        del first, second
        gc.collect()
    finally:
        dist.destroy_process_group()


def assert_same_stats(got, expected):
    for name, value in expected.items():
        if name not in TIMING:
            tolerance = 0.05 if name in CLIP_SHARES else 1e-5
            assert got[name] == pytest.approx(value, rel=1e-4, abs=tolerance, nan_ok=True), name


@ALGORITHMS
def test_two_processes_take_the_same_steps_as_one_and_their_checkpoint_resumes_in_one(tiny_lm_dir, tmp_path, rl):
    mp.start_processes(_worker, args=(2, free_port(), str(tiny_lm_dir), str(tmp_path), rl), nprocs=2,
                       start_method="spawn")
    two = torch.load(tmp_path / "result.pt", weights_only=False)

    single = make_trainer(tiny_lm_dir, rl=rl)
    history = run_iterations(single, 2)
    for got, expected in zip(two["history"], history):
        assert_same_stats(got, expected)
    assert two["history"][1]["episodes"] == 16
    assert two["history"][1]["kl_coef"] != RL["kl_coef"]  # the adaptive controller moved, on the global KL
    expected = parameters(single)
    print("largest parameter difference, 2 vs 1 process:", max((v - expected[n]).abs().max().item() for n, v in two["parameters"].items()))
    for name, value in two["parameters"].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    changed = max((expected[n] - p.detach()).abs().max().item() for n, p in make_trainer(tiny_lm_dir, rl=rl).policy.named_parameters())
    assert changed > 1e-4  # the steps did move the weights

    # The checkpoint written by 2 processes resumes in 1 exactly where a 1-process run stands.
    resumed = resume(tiny_lm_dir, tmp_path / "checkpoint", rl)
    assert (resumed.iteration, resumed.episodes) == (single.iteration, single.episodes)
    assert_same_stats(run_iterations(resumed, 1)[0], run_iterations(single, 1)[0])


# FSDP2 with its parameters, gradients and AdamW state offloaded to CPU memory (the Accelerate config's
# fsdp_offload_params), and activation checkpointing (memory.activation_checkpointing): the same steps.
OFFLOADED = ({"activation_checkpointing": True}, {"FSDP_OFFLOAD_PARAMS": "true"})


@pytest.mark.parametrize("rl, variant", [(RL, (None, None)), (DR_GRPO, (None, None)), (RL, OFFLOADED)],
                         ids=["ppo", "dr_grpo", "ppo-offload-checkpointed"])
def test_fsdp_processes_take_the_same_steps_as_one_and_their_checkpoints_resume_sharded_and_in_one(tiny_lm_dir, tmp_path, rl,
                                                                                                  variant):
    memory, env = variant
    mp.start_processes(_fsdp_worker, args=(2, free_port(), str(tiny_lm_dir), str(tmp_path), rl, memory, env), nprocs=2,
                       start_method="spawn")
    two = torch.load(tmp_path / "result.pt", weights_only=False)
    assert two["sharded"] and two["shard_rows"] == two["rows"] // 2  # each rank held half of the embedding
    assert two["offloaded"] == two["checkpointed"] == (memory is not None)

    single = make_trainer(tiny_lm_dir, rl=rl)
    history = run_iterations(single, 2)
    for got, expected in zip(two["history"], history, strict=True):  # the second from the resumed sharded trainer
        assert_same_stats(got, expected)
    # The checkpoint holds full weights and optimizer state, as one process writes them.
    weights = load_file(tmp_path / "second" / "policy.safetensors")
    if single.value_head is not None:
        weights |= {f"value_head.{name}": value for name, value in load_file(tmp_path / "second" / "value.safetensors").items()}
    else:  # a critic-free run keeps no value weights
        assert not (tmp_path / "second" / "value.safetensors").exists()
    expected = parameters(single)
    assert set(weights) == set(expected)
    print("largest parameter difference, 2 FSDP vs 1 process:", max((v - expected[n]).abs().max().item() for n, v in weights.items()))
    for name, value in weights.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    optimizer = torch.load(tmp_path / "second" / "trainer_state.pt", weights_only=True)["optimizer"]
    reference = single.optimizer.state_dict()
    assert [{**group, "betas": tuple(group["betas"])} for group in optimizer["param_groups"]] == reference["param_groups"]
    assert optimizer["state"].keys() == reference["state"].keys()
    for index, state in reference["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(optimizer["state"][index][key], value, rtol=1e-4, atol=1e-6, msg=f"{index} {key}")

    resumed = resume(tiny_lm_dir, tmp_path / "second", rl)
    assert (resumed.iteration, resumed.episodes) == (single.iteration, single.episodes)
    assert_same_stats(run_iterations(resumed, 1)[0], run_iterations(single, 1)[0])


@pytest.mark.parametrize("accelerate_config", [None, "infra/accelerate/fsdp.yaml"], ids=["ddp", "fsdp-config"])
def test_the_accelerate_launcher_runs_a_segment_whose_checkpoint_resumes_in_one_process(tiny_lm_dir, tiny_reward_dir, tmp_path, accelerate_config):
    config = load_config(None, [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", "rl.rollout_batch_size=8",
                                "rl.mini_batch_size=4", "rl.gradient_accumulation_steps=2", "rl.update_epochs=1",
                                "generation.max_new_tokens=6", "launch.num_processes=2"])
    (tmp_path / "run.json").write_text(to_document(config))  # the validated document the launcher hands on
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    checkpoint = tmp_path / "checkpoint"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", str(free_port())]
    if accelerate_config:  # the example config itself, as ppo.accelerate_config passes it (a multi-GPU file: gloo on this CPU)
        command += ["--config_file", str(PROJECT_ROOT / accelerate_config)]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "components.rl.launch", "--config", str(tmp_path / "run.json"), "--prompts", str(tmp_path / "prompts.json"),
                "--checkpoint", str(checkpoint), "--iterations", "1", "--stats", str(tmp_path / "stats.json")]
    subprocess.run(command, check=True, cwd=PROJECT_ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["stop_reason"] == "iterations" and [s["episodes"] for s in stats["history"]] == [8.0]
    assert stats["num_processes"] == 2
    assert stats["sharded"] == (accelerate_config is not None)

    def trainer():
        path = str(tiny_lm_dir)
        return build_trainer_with(config, load_policy(path), load_tokenizer(path), RewardScorer.from_config(config.reward))

    single = trainer()
    assert single.critic is not None  # the demo config's critic from the reward model: DDP / FSDP over two models
    assert_same_stats(single.train(PROMPTS, iterations=1).last, stats["history"][0])
    resumed = trainer()
    resumed.load_checkpoint(checkpoint)
    assert (resumed.iteration, resumed.episodes) == (1, 8)
    assert_same_stats(resumed.train(PROMPTS, iterations=1).last, single.train(PROMPTS, iterations=1).last)


def test_a_launch_in_mixed_precision_runs_as_memory_trained_precision_says_and_only_so(tiny_lm_dir, tiny_reward_dir, tmp_path):
    """`--mixed_precision bf16` is what memory.trained_precision: bf16_mixed launches with (the launcher passes it); a
    launch whose precision disagrees with the configuration is refused, naming the key."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))

    def launch(name, *overrides):
        config = load_config(None, [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", "rl.rollout_batch_size=8",
                                    "rl.mini_batch_size=4", "rl.gradient_accumulation_steps=2", "rl.update_epochs=1",
                                    "generation.max_new_tokens=6", "launch.num_processes=2", *overrides])
        (tmp_path / f"{name}-run.json").write_text(to_document(config))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "components.rl.launch",
                   "--config", str(tmp_path / f"{name}-run.json"), "--prompts", str(prompts), "--checkpoint", str(tmp_path / name),
                   "--iterations", "1", "--stats", str(tmp_path / f"{name}.json")]
        return subprocess.run(command, cwd=PROJECT_ROOT, timeout=300, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    refused = launch("float32")
    assert refused.returncode != 0
    assert "mixed_precision is 'bf16' but memory.trained_precision is float32" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "float32").exists() and not (tmp_path / "float32.json").exists()

    done = launch("bf16", "memory.trained_precision=bf16_mixed", "memory.frozen_dtype=bfloat16")
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "bf16.json").read_text())
    assert stats["num_processes"] == 2 and stats["history"][0]["episodes"] == 8.0
    assert all(math.isfinite(stats["history"][0][name]) for name in ("loss/policy", "loss/value", "objective/kl"))


def test_two_machines_on_loopback_form_one_run_whose_step_equals_one_process(tiny_lm_dir, tiny_reward_dir, tmp_path):
    """Machine 0 and machine 1 (each 1 process, `--num_machines 2`, the commands the flow and flows/node.py run)
    meet at 127.0.0.1 and take one 2-process step; the main process (on machine 0) writes checkpoint and stats."""
    from components.rl import launcher

    config = load_config(None, [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", "rl.rollout_batch_size=8",
                                "rl.mini_batch_size=4", "rl.gradient_accumulation_steps=2", "rl.update_epochs=1",
                                "generation.max_new_tokens=6", "launch.num_processes=2", "launch.num_machines=2",
                                "launch.main_process_ip=127.0.0.1", "launch.node_deployment=alignflow-train-node/test"])
    meet = launcher.rendezvous(config.launch, PROJECT_ROOT)
    assert meet.main_process_ip == "127.0.0.1" and meet.num_machines == 2
    checkpoint = tmp_path / "checkpoint"
    machines = []
    for rank in (1, 0):  # the other machine first, as the flow submits it before launching its own
        work = tmp_path / f"machine-{rank}"
        work.mkdir()
        (work / "run.json").write_text(to_document(config))
        (work / "prompts.json").write_text(json.dumps(PROMPTS))
        command = launcher.accelerate_command(config.launch, meet, rank, config=work / "run.json", prompts=work / "prompts.json",
                                              checkpoint=checkpoint, iterations=1, stats=work / "stats.json")
        with open(work / "output.txt", "w") as output:
            machines.append(subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                             stdout=output, stderr=subprocess.STDOUT))
    try:
        codes = [machine.wait(timeout=300) for machine in machines]
    finally:
        for machine in machines:
            machine.kill() if machine.poll() is None else None
    outputs = [(tmp_path / f"machine-{rank}" / "output.txt").read_text()[-2000:] for rank in (1, 0)]
    assert codes == [0, 0], "\n".join(outputs)
    assert not (tmp_path / "machine-1" / "stats.json").exists()  # machine 1 holds no main process
    stats = json.loads((tmp_path / "machine-0" / "stats.json").read_text())
    assert stats["num_processes"] == 2 and [s["episodes"] for s in stats["history"]] == [8.0]

    def trainer():
        path = str(tiny_lm_dir)
        return build_trainer_with(config, load_policy(path), load_tokenizer(path), RewardScorer.from_config(config.reward))

    single = trainer()
    assert_same_stats(single.train(PROMPTS, iterations=1).last, stats["history"][0])
    resumed = trainer()
    resumed.load_checkpoint(checkpoint)
    assert (resumed.iteration, resumed.episodes) == (1, 8)
    assert_same_stats(resumed.train(PROMPTS, iterations=1).last, single.train(PROMPTS, iterations=1).last)
