"""Measurement helpers shared by the harness and both workers. Only the standard library and torch:
the TRL worker imports this file from its own virtual environment, where alignflow is not installed.

- `matmul_flops_per_second`: the machine's fp32 matrix-multiply throughput (the MFU denominator).
- `PhaseClock`: wall time split into named phases (generation, reference, value, scoring, update, other).
- `Budgets`: saves the policy at budgets of episodes, with the training wall-clock seconds at each save.
- `FlopCounter`: model FLOPs of the passes a side actually runs, from forward hooks on the backbones
  and output heads, charged to the current phase of a `PhaseClock`.
- `reset_peak_rss` / `peak_rss` / `rss_mb`: resident memory of this process, its peak its own (below).

Model FLOPs (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022):
    forward pass       2 * N * tokens
    training pass      6 * N * tokens     (forward 2N + backward 4N)
with N the matmul parameters the pass uses: the backbone's non-embedding parameters for every token
it reads, plus the output head's (vocabulary x hidden for an LM head) for every position it is
applied to. Attention's score/value products (4 * layers * context * hidden per token, ~1% here)
and recomputation (gradient checkpointing) are left out, as MFU conventionally does.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable

import torch

PHASES = ("generation", "reference", "value", "scoring", "update", "other")


def matmul_flops_per_second(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` fp32 torch.matmul throughput (2 n^3 FLOPs per n x n product) for each size.
    Returns {"n=1024": flop/s, ..., "best": the highest}."""
    generator = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n, generator=generator)
        b = torch.randn(n, n, generator=generator)
        torch.matmul(a, b)  # warm-up: thread pool, page faults
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        out[f"n={n}"] = 2 * n**3 / best
    out["best"] = max(out.values())
    return out


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


# Peak memory of a worker is its own high-water mark, VmHWM in /proc/self/status. Not `ru_maxrss`: Linux carries
# the parent's resident size at fork into the child's ru_maxrss across exec (a child of an 800 MB harness reports
# 813 MB while its own VmHWM is 13.5 MB), which is why every alignflow demo row once read the harness's 487 MB.
# After exec VmHWM belongs to the new address space already; a worker also resets it at its start (writing "5" to
# /proc/self/clear_refs, Linux >= 4.0) so nothing before its own work can count, and says whether that worked.
VMHWM_RESET = "VmHWM from /proc/self/status, reset through /proc/self/clear_refs at the worker's start"
VMHWM = "VmHWM from /proc/self/status (high-water mark since exec; reset through clear_refs failed)"
RU_MAXRSS = "ru_maxrss (FALLBACK, no /proc: includes the parent's resident size at fork)"
_peak_method = VMHWM


def _status_kb(field: str) -> int | None:
    """A `field:   N kB` line of /proc/self/status, in KiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> str:
    """Reset this process's high-water mark to its current resident size; returns the method `peak_rss` will use.
    Checked, not assumed: the reset counts only if VmHWM then reads at most the current VmRSS (plus slack for pages
    touched in between)."""
    global _peak_method
    if _status_kb("VmHWM") is None:
        _peak_method = RU_MAXRSS
        return _peak_method
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
        _peak_method = VMHWM_RESET if hwm is not None and rss is not None and hwm <= rss + 1024 else VMHWM
    except OSError:
        _peak_method = VMHWM
    return _peak_method


def peak_rss() -> dict:
    """{"peak_rss_mb": this process's own peak resident size, "peak_rss_method": how it was measured}."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return {"peak_rss_mb": hwm / 2**10, "peak_rss_method": _peak_method}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_mb": peak / 2**20 if sys.platform == "darwin" else peak / 2**10, "peak_rss_method": RU_MAXRSS}


def peak_rss_mb() -> float:
    """This process's own peak resident set size in MB (see `peak_rss` for how it is measured)."""
    return peak_rss()["peak_rss_mb"]


class PhaseClock:
    """Charges wall time to the current phase. `switch(name)` closes the running phase; `lap()` returns
    the seconds per phase since the previous lap (the running phase included) and starts a new lap."""

    def __init__(self) -> None:
        self.current = "other"
        self._since = time.perf_counter()
        self._lap: dict[str, float] = {}

    def switch(self, name: str) -> str:
        now = time.perf_counter()
        self._lap[self.current] = self._lap.get(self.current, 0.0) + now - self._since
        previous, self.current, self._since = self.current, name, now
        return previous

    def lap(self) -> dict[str, float]:
        self.switch(self.current)
        lap, self._lap = self._lap, {}
        return {name: lap.get(name, 0.0) for name in PHASES}

    def timed(self, name: str | Callable[..., str], fn: Callable) -> Callable:
        """`fn` wrapped so its calls are charged to `name` (or to `name(*args, **kwargs)`)."""

        def wrapper(*args, **kwargs):
            previous = self.switch(name(*args, **kwargs) if callable(name) else name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch(previous)

        wrapper.__wrapped__ = fn
        return wrapper


def matmul_parameters(module: torch.nn.Module) -> int:
    """Parameters of `module` outside its embedding tables (token and position lookups cost no FLOPs)."""
    embedding = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in embedding)


def head_parameters(head: torch.nn.Module) -> int:
    """in_features x out_features of an output head (nn.Linear, or anything with a 2-D weight)."""
    return int(head.weight.numel())


def _tokens_from_inputs(args: tuple, kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return int(value.shape[0] * value.shape[1])
    if args and torch.is_tensor(args[0]):
        return int(args[0].shape[0] * args[0].shape[1])
    return 0


class FlopCounter:
    """Counts model FLOPs (see the module docstring) of the modules it watches, per phase.

    `watch_backbone(module)` counts 2N (6N under autograd with trainable parameters) per input token;
    `watch_head(module)` the same for every row the head is applied to (N = in x out)."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock
        self.flops: dict[str, float] = {}
        self.tokens: dict[str, int] = {}  # per module and pass kind, cumulative
        self.calls: dict[str, int] = {}  # per "module@phase", since the last lap (decode steps = policy@generation)
        self._handles: list = []

    def _charge(self, name: str, parameters: int, tokens: int, trainable: bool) -> None:
        training = trainable and torch.is_grad_enabled()
        phase = self.clock.current
        self.flops[phase] = self.flops.get(phase, 0.0) + (6 if training else 2) * parameters * tokens
        key = f"{name}/{'train' if training else 'forward'}"
        self.tokens[key] = self.tokens.get(key, 0) + tokens
        self.calls[f"{name}@{phase}"] = self.calls.get(f"{name}@{phase}", 0) + 1

    def watch_backbone(self, name: str, module: torch.nn.Module) -> int:
        parameters = matmul_parameters(module)
        trainable = any(p.requires_grad for p in module.parameters())

        def hook(_module, args, kwargs):
            self._charge(name, parameters, _tokens_from_inputs(args, kwargs), trainable)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return parameters

    def watch_head(self, name: str, module: torch.nn.Module) -> int:
        parameters = head_parameters(module)
        trainable = any(p.requires_grad for p in module.parameters())

        def hook(_module, args):
            hidden = args[0]
            self._charge(name, parameters, hidden.numel() // hidden.shape[-1], trainable)

        self._handles.append(module.register_forward_pre_hook(hook))
        return parameters

    def lap(self) -> dict[str, float]:
        flops, self.flops, self.calls = self.flops, {}, {}
        return {name: flops.get(name, 0.0) for name in PHASES}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Budgets:
    """Saves the policy once the episodes trained reach each budget (one save covers every budget passed in the
    same iteration) and records the training wall-clock seconds at that point. The clock starts at construction
    (or `start()`, at the first step) and excludes the time spent saving, in this save and every earlier one."""

    def __init__(self, budgets: list[int], directory: str | None, save: Callable[[str], object]) -> None:
        if budgets and not directory:
            raise ValueError("save budgets need a save_dir")
        self.pending = sorted(budgets)
        self.directory, self.save = directory, save
        self.saved: list[dict] = []
        self.start()

    def start(self) -> None:
        self._start, self._excluded = time.perf_counter(), 0.0

    def train_seconds(self, now: float | None = None) -> float:
        return (time.perf_counter() if now is None else now) - self._start - self._excluded

    def reached(self, episodes: int) -> None:
        now = time.perf_counter()
        passed = [budget for budget in self.pending if episodes >= budget]
        if not passed:
            return
        self.pending = self.pending[len(passed):]
        path = os.path.join(self.directory, f"episodes-{episodes:07d}")
        self.save(path)
        self.saved.append({"episodes": episodes, "budgets": passed, "train_seconds": self.train_seconds(now), "path": path})
        self._excluded += time.perf_counter() - now


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
