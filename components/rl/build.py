"""A run built from its validated configuration, one way for the pipeline and for every launched training process:

    locate_models   every model reference as this machine loads it (registry URIs downloaded, hub ids checked) and
                    safe to load (components/models/safety.py: no pickle-only checkpoint, no model's own code)
    compute_device  where this process computes
    load_scorer     the reward model (or the judge) on that device, in memory.frozen_dtype
    load_policy     the starting policy and its tokenizer on that device, in the run's policy dtype
    build           the trainer around them (`build_trainer`, from the run's sections)
    build_run       all of it, in that order: what a launched process does (components/rl/launch.py)

The pipeline takes the same steps as Prefect tasks of their own (flows/tasks.py: the check of its inputs, the reward
model, the policy, the trainer), each retried and logged on its own. Nothing here knows of Prefect or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.config import PROJECT_ROOT, RewardConfig, RunConfig
from components.models.loading import load_policy as load_policy_model, load_tokenizer, resolved_models
from components.models.safety import check_run_models
from components.rl.reward import RewardScorer
from components.rl import distributed
from components.rl.trainer import Trainer, build_trainer


@dataclass
class Run:
    """What `build_run` gives: the configuration as this machine loads it, the trainer and what it was built from."""

    config: RunConfig  # its model references located (locate_models)
    trainer: Trainer
    tokenizer: PreTrainedTokenizerBase
    scorer: RewardScorer


def locate_models(config: RunConfig) -> RunConfig:
    """The configuration with every model reference as this machine loads it, each checked to load without running
    code of its own (each against its own allow_pickle); a reference that is nowhere or unsafe fails naming its key."""
    located = resolved_models(config)
    check_run_models(located, PROJECT_ROOT)
    return located


def compute_device(config: RunConfig) -> torch.device:
    """Where this process computes. A launched training process (one of a torch.distributed group): the device
    Accelerate gave it. The flow's own process: the first GPU when there is one and the run trains in this process;
    the CPU when it launches `launch.num_processes` processes, which take the GPUs (its copy then only evaluates and
    checkpoints)."""
    if distributed.world_size() > 1:
        from accelerate import PartialState  # the launched process joined its group with it (launch.py)

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() and config.launch.num_processes == 1 else "cpu")


def load_scorer(reward: RewardConfig, config: RunConfig, device: torch.device | str) -> RewardScorer:
    """The reward model of `reward` (the run's `reward` section, or its `judge`) in memory.frozen_dtype, on `device`."""
    scorer = RewardScorer.from_config(reward, dtype=config.memory.frozen_torch_dtype)
    scorer.model.to(device)
    return scorer


def load_policy(config: RunConfig, device: torch.device | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy (a causal LM or an encoder-decoder, as its config says) in the run's policy dtype, on
    `device`, and its tokenizer."""
    policy = load_policy_model(config.policy.model, config.policy.revision, allow_pickle=config.policy.allow_pickle,
                               dtype=config.policy_dtype)
    return policy.to(device), load_tokenizer(config.policy.model, config.policy.revision)


def build(config: RunConfig, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scorer) -> Trainer:
    """The trainer around the starting policy and the reward function, from the run's sections."""
    return build_trainer(policy, tokenizer, scorer, **config.trainer_sections())


def build_run(config: RunConfig) -> Run:
    """The run of `config` (validated): its models located and checked, the reward model and the policy loaded on
    this process's device, the trainer built."""
    located = locate_models(config)
    device = compute_device(located)
    scorer = load_scorer(located.reward, located, device)
    policy, tokenizer = load_policy(located, device)
    return Run(located, build(located, policy, tokenizer, scorer), tokenizer, scorer)
