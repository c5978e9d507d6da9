"""The `accelerate launch` command of each machine, and where the machines meet (no processes started here)."""

from pathlib import Path

import pytest

from components.config import ConfigError, PROJECT_ROOT, load_config
from components.rl import launcher

MULTI = ["launch.num_processes=4", "rl.gradient_accumulation_steps=4", "launch.num_machines=2", "launch.node_deployment=alignflow-train-node/gpu"]
FILES = dict(config=Path("run.json"), prompts=Path("prompts.json"), checkpoint=Path("/shared/ckpt"), iterations=3, stats=Path("s.json"))


def option(command, name):
    return command[command.index(name) + 1] if name in command else None


def test_every_machine_runs_the_same_launch_but_its_rank():
    launch = load_config(overrides=[*MULTI, "launch.main_process_ip=10.0.0.1", "launch.main_process_port=29555"]).launch
    meet = launcher.rendezvous(launch, PROJECT_ROOT)
    assert meet == launcher.Rendezvous(2, "10.0.0.1", 29555)
    main, other = (launcher.accelerate_command(launch, meet, rank, **FILES) for rank in (0, 1))
    assert [option(main, "--machine_rank"), option(other, "--machine_rank")] == ["0", "1"]
    for command in (main, other):
        assert option(command, "--num_processes") == "4" and option(command, "--num_machines") == "2"  # the total
        assert option(command, "--main_process_ip") == "10.0.0.1" and option(command, "--main_process_port") == "29555"
        assert command[command.index("-m", 2) + 1] == "components.rl.launch" and option(command, "--checkpoint") == "/shared/ckpt"
    assert [a for a in main if a != "0"] == [a for a in other if a != "1"]
    with pytest.raises(ValueError, match="machine_rank 2 is not one of the 2 machines"):
        launcher.accelerate_command(launch, meet, 2, **FILES)


def test_one_machine_gets_a_free_port_and_no_address():
    launch = load_config(overrides=["launch.num_processes=2", "rl.gradient_accumulation_steps=2"]).launch
    meet = launcher.rendezvous(launch, PROJECT_ROOT)
    assert meet.num_machines == 1 and meet.main_process_ip is None and meet.main_process_port > 0
    command = launcher.accelerate_command(launch, meet, 0, **FILES)
    assert option(command, "--num_machines") == "1" and "--main_process_ip" not in command and "--machine_rank" not in command
    assert option(command, "--mixed_precision") == "no"
    from components.rl.distributed import accelerate_precision

    mixed = launcher.accelerate_command(launch, meet, 0, **FILES, mixed_precision=accelerate_precision("bf16_mixed"))
    assert option(mixed, "--mixed_precision") == "bf16"


def test_the_accelerate_config_fills_in_the_address_and_contradictions_are_refused(tmp_path):
    file = tmp_path / "multi-node.yaml"
    file.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 0\nmain_process_ip: 10.1.2.3\nmain_process_port: 29600\n")
    launch = load_config(overrides=[*MULTI, f"launch.accelerate_config={file}"]).launch
    assert launcher.rendezvous(launch, PROJECT_ROOT) == launcher.Rendezvous(2, "10.1.2.3", 29600)
    assert option(launcher.accelerate_command(launch, launcher.rendezvous(launch, PROJECT_ROOT), 1, **FILES), "--config_file") == str(file)

    one = load_config(overrides=["launch.num_processes=2", "rl.gradient_accumulation_steps=2", f"launch.accelerate_config={file}"]).launch
    with pytest.raises(ConfigError, match=r"says num_machines: 2 but launch\.num_machines is 1"):
        launcher.rendezvous(one, PROJECT_ROOT)
    other_ip = load_config(overrides=[*MULTI, f"launch.accelerate_config={file}", "launch.main_process_ip=10.9.9.9"]).launch
    with pytest.raises(ConfigError, match=r"launch\.main_process_ip is 10\.9\.9\.9 but launch\.accelerate_config .* says main_process_ip: 10\.1\.2\.3"):
        launcher.rendezvous(other_ip, PROJECT_ROOT)
    missing = load_config(overrides=[*MULTI, f"launch.accelerate_config={tmp_path / 'nope.yaml'}"]).launch
    with pytest.raises(ConfigError, match=r"launch\.accelerate_config: .*nope\.yaml is not a file on this machine"):
        launcher.rendezvous(missing, PROJECT_ROOT)


def test_a_loopback_host_address_is_refused_for_other_machines(monkeypatch):
    monkeypatch.setattr(launcher, "host_address", lambda: "127.0.1.1")  # a Debian host's own name
    with pytest.raises(ConfigError, match=r"launch\.main_process_ip is not set and this host's name .* resolves to 127\.0\.1\.1"):
        launcher.rendezvous(load_config(overrides=MULTI).launch, PROJECT_ROOT)
    monkeypatch.setattr(launcher, "host_address", lambda: "10.4.0.7")
    assert launcher.rendezvous(load_config(overrides=MULTI).launch, PROJECT_ROOT).main_process_ip == "10.4.0.7"


def test_a_checkpoint_not_on_shared_storage_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint\.dir: the main machine's checkpoint .* is not visible on this machine"):
        launcher.check_shared_checkpoint(tmp_path / "run-id", 0)
    (tmp_path / "run-id").mkdir()
    (tmp_path / "run-id" / "trainer_state.json").write_text('{"iteration": 3}')
    launcher.check_shared_checkpoint(tmp_path / "run-id", 3)
    with pytest.raises(ConfigError, match=r"is at iteration 3, the main machine's at 5"):
        launcher.check_shared_checkpoint(tmp_path / "run-id", 5)


def test_a_launch_stopped_for_another_machine_ends_its_process(tmp_path):
    import sys
    import time

    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]
    asked = []

    def stop():
        asked.append(time.monotonic())
        return "machine 1 (flow run x) ended Failed" if pid_file.exists() else None

    start = time.monotonic()
    with pytest.raises(launcher.LaunchFailed, match=r"stopped the launch on this machine: machine 1 \(flow run x\) ended Failed"):
        launcher.run(sleeper, tmp_path, should_stop=stop, poll_seconds=0.2)
    assert time.monotonic() - start < 20
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
    with pytest.raises(launcher.LaunchFailed, match=r"exited with 3; its last output:\nboom"):
        launcher.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path)


@pytest.mark.parametrize("name", ["multi-gpu.yaml", "fsdp.yaml", "multi-node.yaml"])
def test_the_example_accelerate_configs_launch_as_their_comments_say(name):
    machines = 2 if name == "multi-node.yaml" else 1
    launch = load_config(overrides=[f"launch.accelerate_config=infra/accelerate/{name}", "launch.num_processes=16",
                                 "rl.gradient_accumulation_steps=16", f"launch.num_machines={machines}",
                                 "launch.node_deployment=alignflow-train-node/gpu"]).launch
    meet = launcher.rendezvous(launch, PROJECT_ROOT)
    assert meet.num_machines == machines
    if name == "multi-node.yaml":  # the file's address and port, as launch.* leaves them unset
        assert (meet.main_process_ip, meet.main_process_port) == ("10.0.0.1", 29500)
