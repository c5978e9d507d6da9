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

from typing import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def shard(total: int) -> slice:
    """This rank's contiguous share of `total` rows (the first `total % world_size` ranks take one more)."""
    size, extra = divmod(total, world_size())
    r = rank()
    start = r * size + min(r, extra)
    return slice(start, start + size + (1 if r < extra else 0))


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


def data_parallel(module: torch.nn.Module, find_unused_parameters: bool = False):
    """`module` wrapped for data-parallel training by Accelerate (DistributedDataParallel under a multi-CPU or
    multi-GPU launch), and the Accelerator. Gradients of a backward through the wrapper are averaged over the
    ranks; `Accelerator.no_sync` defers that to the last micro-batch of a minibatch.

    The process group must be one Accelerate knows (`accelerate launch`, or the RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT environment). Sharded engines (FSDP, DeepSpeed) and mixed precision are refused:
    the rollout samples from the unwrapped policy and its log-probabilities must match the update's."""
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
    supported = {DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_XPU, DistributedType.MULTI_NPU}
    if accelerator.distributed_type not in supported:
        raise ValueError(
            f"Accelerate's distributed_type is {accelerator.distributed_type.value}; alignflow's PPO runs data-parallel "
            "(MULTI_CPU / MULTI_GPU): FSDP and DeepSpeed sharding are not supported yet"
        )
    if accelerator.mixed_precision != "no":
        raise ValueError(
            f"Accelerate's mixed_precision is {accelerator.mixed_precision!r}; use 'no' (rollout and update "
            "log-probabilities must come from the same precision)"
        )
    return accelerator.prepare_model(module), accelerator


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
