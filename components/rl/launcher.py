"""One machine's `accelerate launch` of `components.rl.launch`, the same command on every machine of a run.

A multi-machine run is Accelerate's (torchrun's static rendezvous): every machine runs the launcher with the
same total `--num_processes`, `--num_machines`, `--main_process_ip` and `--main_process_port`, and its own
`--machine_rank` (0 on the main machine, whose processes include global rank 0: it writes the checkpoint and
the statistics). This module builds that command from the run configuration and runs it; who starts the
other machines (a Prefect flow run per machine, flows/node.py) is the flow's business.

What the command says wins over an Accelerate config file (`launch.accelerate_config`): the launcher fills in
from the file only what the command leaves out. So that nobody is surprised by a value silently overridden,
the file's num_machines, main_process_ip and main_process_port must agree with `launch.*` where both are set.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from components.config import ConfigError, LaunchConfig
from components.checkpoint import resolve_checkpoint


@dataclass(frozen=True)
class Rendezvous:
    """Where the machines of one launch meet: the main machine's address and port (None: one machine)."""

    num_machines: int
    main_process_ip: str | None
    main_process_port: int


class LaunchFailed(RuntimeError):
    """`accelerate launch` exited non-zero, or was stopped because the run could not succeed any more."""


def accelerate_file_settings(launch: LaunchConfig, root: Path) -> dict:
    """The Accelerate config file's settings (empty without one); relative paths are relative to `root`."""
    if not launch.accelerate_config:
        return {}
    path = Path(launch.accelerate_config)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ConfigError(f"launch.accelerate_config: {path} is not a file on this machine ({socket.gethostname()})")
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"launch.accelerate_config: {path} is not a mapping of Accelerate settings")
    return settings


def host_address() -> str:
    """The address this machine's host name resolves to (a pod's IP on Kubernetes, a node's on a cluster)."""
    return socket.gethostbyname(socket.gethostname())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def rendezvous(launch: LaunchConfig, root: Path) -> Rendezvous:
    """Resolve the rendezvous on the main machine, before any machine launches.

    Precedence: `launch.main_process_ip/port`, then the Accelerate config's, then this host's address and a free
    port. The port is chosen here once and handed to every machine, so two runs on one machine never collide."""
    file = accelerate_file_settings(launch, root)
    source = launch.accelerate_config
    if "num_machines" in file and int(file["num_machines"]) != launch.num_machines:
        raise ConfigError(
            f"launch.accelerate_config ({source}) says num_machines: {file['num_machines']} but launch.num_machines is "
            f"{launch.num_machines}: set launch.num_machines (alignflow starts the other machines from it) and drop or "
            "match the file's num_machines"
        )
    for key in ("main_process_ip", "main_process_port"):
        mine, theirs = getattr(launch, key), file.get(key)
        if mine is not None and theirs is not None and str(mine) != str(theirs):
            raise ConfigError(f"launch.{key} is {mine} but launch.accelerate_config ({source}) says {key}: {theirs}: "
                              "keep one of them, or make them agree")
    port = launch.main_process_port or (int(file["main_process_port"]) if file.get("main_process_port") else None) or free_port()
    if launch.num_machines == 1:
        return Rendezvous(1, None, port)
    ip = launch.main_process_ip or file.get("main_process_ip")
    if ip is None:
        ip = host_address()
        if _is_loopback(ip):
            raise ConfigError(
                f"launch.main_process_ip is not set and this host's name ({socket.gethostname()}) resolves to {ip}, which "
                "the other machines cannot reach: set launch.main_process_ip to the main machine's address"
            )
    return Rendezvous(launch.num_machines, str(ip), port)


def accelerate_command(launch: LaunchConfig, meet: Rendezvous, machine_rank: int, *, config: Path, prompts: Path,
                       checkpoint: Path, iterations: int, stats: Path, mixed_precision: str = "no") -> list[str]:
    """`python -m accelerate.commands.launch ... -m components.rl.launch ...` for machine `machine_rank`. `config` is
    the run's validated configuration as the processes read it, one JSON document (components.config.to_document);
    `mixed_precision` (Accelerate's: no, bf16, fp16) follows memory.trained_precision (`accelerate_precision`)."""
    if not 0 <= machine_rank < meet.num_machines:
        raise ValueError(f"machine_rank {machine_rank} is not one of the {meet.num_machines} machines (0..{meet.num_machines - 1})")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    if launch.accelerate_config:
        command += ["--config_file", launch.accelerate_config]
    else:
        # torchrun under Accelerate; without CUDA the processes join a gloo group on the CPU (see launch.py).
        # (Accelerate's --cpu flag starts a single process whatever --num_processes says.)
        command += ["--multi_gpu", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    command += ["--num_machines", str(meet.num_machines), "--main_process_port", str(meet.main_process_port)]
    if meet.num_machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", meet.main_process_ip]
    return command + ["-m", "components.rl.launch", "--config", str(config), "--prompts", str(prompts),
                      "--checkpoint", str(checkpoint), "--iterations", str(iterations), "--stats", str(stats)]


def run(command: list[str], cwd: Path, should_stop: Callable[[], str | None] | None = None, poll_seconds: float = 2.0) -> None:
    """Run the launcher to its end; raise LaunchFailed with its last output if it fails.

    `should_stop` is asked every `poll_seconds`: a reason returned stops the launch (the other machines of the
    run failed, so this one would wait for them until the rendezvous times out). Whatever ends the wait early
    (that, an exception, a cancelled flow run's signal) terminates the launcher first, which stops its worker
    processes: no process outlives the call."""
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            while True:
                try:
                    process.wait(poll_seconds)
                    break
                except subprocess.TimeoutExpired:
                    pass
                reason = should_stop() if should_stop else None
                if reason:
                    _terminate(process)
                    raise LaunchFailed(f"stopped the launch on this machine: {reason}\n{_tail(output)}")
        except BaseException:
            _terminate(process)
            raise
        if process.returncode != 0:
            raise LaunchFailed(f"accelerate launch exited with {process.returncode}; its last output:\n{_tail(output)}")


def _tail(output, chars: int = 3000) -> str:
    output.seek(0)
    return output.read()[-chars:]


def _terminate(process: subprocess.Popen, grace_seconds: float = 20.0) -> None:
    """SIGTERM the launcher (torchrun's agent forwards it to its workers and waits for them), then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def check_shared_checkpoint(checkpoint: Path, iteration: int) -> None:
    """The main machine's checkpoint, seen from this machine: it must be there and at the main machine's
    iteration, else this machine is not on the storage the main one writes (`checkpoint.dir`)."""
    host = socket.gethostname()
    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint.dir: the main machine's checkpoint {checkpoint} is not visible on this machine ({host}); "
            "a multi-machine run needs it on storage every machine mounts at the same path"
        ) from None
    found = json.loads((path / "trainer_state.json").read_text())["iteration"]
    if found != iteration:
        raise ConfigError(
            f"checkpoint.dir: the checkpoint at {path} on this machine ({host}) is at iteration {found}, the main "
            f"machine's at {iteration}: this path is not the storage the main machine writes (mount the shared "
            "storage at the same path on every machine)"
        )
