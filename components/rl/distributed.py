"""Data parallelism over torch.distributed (the process group Accelerate's launcher sets up).

Every helper is a no-op in one process, so the single-process engine is the N-process engine with N = 1.
The scheme keeps an N-process iteration equal to a 1-process one over the same global batch:
  - each rank rolls out (samples, reference forward, scores) a contiguous slice of the global prompt batch,
    drawing its slice of the global sampling noise, and stops decoding when every rank's rows have ended;
  - the rollouts are gathered, so rewards, GAE, advantage whitening, the score moments and the KL controller
    see the global batch, identically on every rank;
  - the micro-batches of each global minibatch are dealt out among the ranks, and their (already weighted)
    gradients summed by DistributedDataParallel through Accelerate (`data_parallel`), so every rank takes
    the same optimizer step.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.distributed as dist
from components.config import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def shard(total: int, group: int = 1) -> slice:
    """This rank's contiguous share of `total` rows in whole groups of `group` consecutive rows (the first
    `(total / group) % world_size` ranks take one group more)."""
    size, extra = divmod(total // group, world_size())
    r = rank()
    start = r * size + min(r, extra)
    return slice(start * group, (start + size + (1 if r < extra else 0)) * group)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    if world_size() == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0])
    return all_sum(value).item() == 0


def mean_over_ranks(value: float) -> float:
    return all_sum(torch.tensor([value], dtype=torch.float64)).item() / world_size()


def gather_rows(tensors: Sequence[torch.Tensor], pad_values: Sequence[float], left_padded: Sequence[bool]) -> list[torch.Tensor]:
    """Concatenate each rank's rows in rank order; 2-D tensors are padded to the widest rank's width
    (`pad_values`, on the left where `left_padded`), as one process would have padded the whole batch."""
    if world_size() == 1:
        return list(tensors)
    parts: list[list[torch.Tensor] | None] = [None] * world_size()
    dist.all_gather_object(parts, [t.detach().cpu() for t in tensors])
    device = tensors[0].device
    gathered = []
    for i, (pad, left) in enumerate(zip(pad_values, left_padded)):
        pieces = [p[i] for p in parts]
        if pieces[0].dim() == 2:
            width = max(p.shape[1] for p in pieces)
            pieces = [
                torch.nn.functional.pad(p, (width - p.shape[1], 0) if left else (0, width - p.shape[1]), value=pad)
                for p in pieces
            ]
        gathered.append(torch.cat(pieces).to(device))
    return gathered


def accelerate_precision(trained_precision: str) -> str:
    """Accelerate's `mixed_precision` for memory.trained_precision: bf16 / fp16 for the autocast precisions, else no
    (a pure-bf16 model needs no autocast)."""
    return {"bf16_mixed": "bf16", "fp16_mixed": "fp16"}.get(trained_precision, "no")


def data_parallel(module: torch.nn.Module, find_unused_parameters: bool = False, trained_precision: str = "float32"):
    """`module` prepared for data-parallel training, and the Accelerator. The module is wrapped by Accelerate
    (DistributedDataParallel under a multi-CPU or multi-GPU launch: gradients of a backward through the wrapper
    are averaged over the ranks), or, when the launch's Accelerate config asks for FSDP, sharded in place by
    FSDP2 (`fully_sharded`). Either way `no_sync` defers the gradient reduction to a minibatch's last micro-batch.

    The process group must be one Accelerate knows (`accelerate launch`, or the RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT environment). DeepSpeed is refused; Accelerate's mixed_precision must be the one
    memory.trained_precision implies (the engine runs its own autocast around the rollout and the update alike, so
    that their log-probabilities agree; `accelerate launch --mixed_precision` only says the same)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    device = next(module.parameters()).device
    accelerator = Accelerator(
        cpu=device.type == "cpu", device_placement=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    if accelerator.num_processes != world_size():
        raise RuntimeError(
            f"Accelerate sees {accelerator.num_processes} process(es) but the process group has {world_size()}: "
            "start the processes with `accelerate launch` (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
        )
    expected = accelerate_precision(trained_precision)
    if accelerator.mixed_precision != expected:
        raise ConfigError(
            f"Accelerate's mixed_precision is {accelerator.mixed_precision!r} but memory.trained_precision is "
            f"{trained_precision}, which launches with {expected!r}: set memory.trained_precision (bf16_mixed for bf16, "
            "fp16_mixed for fp16) and let alignflow pass it to the launch, so that rollout and update share one precision"
        )
    plugin = fsdp_plugin(accelerator)
    if plugin is not None:
        return fully_sharded(module, plugin), accelerator
    supported = {DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_XPU, DistributedType.MULTI_NPU}
    if accelerator.distributed_type not in supported:
        raise ValueError(
            f"Accelerate's distributed_type is {accelerator.distributed_type.value}; alignflow's training runs data-parallel "
            "(MULTI_CPU / MULTI_GPU) or sharded with FSDP (distributed_type: FSDP, fsdp_version: 2): DeepSpeed is not supported"
        )
    return accelerator.prepare_model(module), accelerator


def fsdp_plugin(accelerator):
    """Accelerate's FSDP settings when the launch asks for FSDP (an Accelerate config with `distributed_type: FSDP`
    makes `accelerate launch` set ACCELERATE_USE_FSDP and the FSDP_* variables), else None.

    Accelerate 1.15 turns its state to FSDP only on GPUs and other accelerators: a CPU launch stays MULTI_CPU and
    drops the plugin, so there the plugin is read again from the same environment."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.environment import parse_flag_from_env

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif parse_flag_from_env("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ValueError("the Accelerate config's fsdp_config.fsdp_version must be 2: alignflow shards with FSDP2 "
                         "(see infra/accelerate/fsdp.yaml)")
    if plugin.activation_checkpointing:
        raise ValueError("the Accelerate config's fsdp_config.fsdp_activation_checkpointing wraps layers alignflow "
                         "already checkpoints its own way: remove it and set memory.activation_checkpointing: true")
    return plugin


def fully_sharded(module: torch.nn.Module, plugin) -> torch.nn.Module:
    """`module` sharded in place by FSDP2 (torch's `fully_shard`) as Accelerate's config says: each layer its
    auto-wrap policy picks (`fsdp_transformer_layer_cls_to_wrap`, by default the models' `_no_split_modules`, or
    size-based) is a unit, gathered for its forward and backward and freed after (`fsdp_reshard_after_forward`);
    the rest (embeddings, final norm, LM head, value head) is the root unit. Every parameter becomes a DTensor
    holding this rank's shard, so build the optimizer afterwards.

    The rollout calls the policy's parts directly, not `module`: its `rollout` method is registered as an FSDP
    forward method, so the root unit is gathered around the whole rollout and the layers' own hooks gather them
    step by step (the same number of forwards on every rank: decoding stops on every rank together)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard, register_fsdp_forward_method

    plugin.set_auto_wrap_policy(module)
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, module)
    # fsdp_offload_params: each unit's parameters, gradients and AdamW state stay in CPU memory between uses
    # (pinned host memory where there is an accelerator to copy to; on a CPU-only group there is none to pin for)
    offloading = isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    offload = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if offloading else {}
    if wrap is not None:
        for child in get_module_children_bottom_up(module)[:-1]:  # inner units first; the last one is `module`
            if wrap(child) and not isinstance(child, FSDPModule):
                fully_shard(child, reshard_after_forward=plugin.reshard_after_forward, **offload)
    fully_shard(module, **offload)  # the root: kept gathered between its forward and backward
    register_fsdp_forward_method(module, "rollout")
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered parameters of a sharded module's root unit (which FSDP keeps after a forward, for the
    backward that usually follows; none follows the rollout), so that the module's parameters are again this
    rank's shards, the tensors the optimizer holds."""
    if is_sharded(module):
        module.reshard()


@contextlib.contextmanager
def no_sync(module: torch.nn.Module, accelerator):
    """Backwards in the block keep their gradients on this rank (summed over micro-batches); the next backward
    outside it reduces the sum over the ranks. FSDP2: `set_requires_gradient_sync`; DDP: Accelerate's no_sync."""
    if not is_sharded(module):
        with accelerator.no_sync(module):
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _parameter_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(module state, optimizer state) of a sharded module as one process would hold them: full tensors on
    the CPU on the main process, empty dicts on the others. The optimizer state is numbered as
    `optimizer.state_dict()` numbers it, so a checkpoint does not depend on the process count or on sharding.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options)
    if not is_main_process():
        return {}, {}
    index = {name: i for i, name in enumerate(_parameter_names(module, optimizer))}
    return model_state, {
        "state": {index[name]: value for name, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in optimizer_state["param_groups"]],
    }


def load_full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full (one-process) states into a sharded module and its optimizer, every rank keeping its shards.
    `model_state` may leave out what is not trained (the frozen base of a LoRA policy). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, model_state, options=options)
    names = _parameter_names(module, optimizer)
    set_optimizer_state_dict(module, optimizer, {
        "state": {names[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]],
    }, options=options)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
