"""Bad input, as a hostile or unlucky user gives it: each is refused before anything is recorded, with a message that
names the key, file or row, and nothing is left behind that the user would have to clean up."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import task
from support import alignflow

from components.errors import UserError, retryable
from components.faults import CRASH_ENV
from components.models import ModelLoadError
from components.rl.checkpoint import StorageError
from flows.pipeline import pipeline


def nothing_recorded(tracking_uri: str, checkpoints: Path) -> None:
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name("alignflow-demo")
    assert experiment is None or not client.search_runs([experiment.experiment_id]), "a run was recorded"
    assert not client.search_registered_models(), "a model was registered"
    assert not checkpoints.exists() or not list(checkpoints.iterdir()), "a checkpoint was left"


def test_a_causal_lm_as_reward_model_is_refused_naming_the_key_and_the_head_it_lacks(demo_data, small_run, tiny_lm_dir,
                                                                                    tracking_uri, tmp_path):
    # With reward.label=0 the output count matched and the run trained against a randomly initialised head.
    with pytest.raises(ModelLoadError, match=r"reward.model: .* is not a reward model .*its weights lack score.weight"):
        pipeline(overrides=small_run(tiny_lm_dir, tiny_lm_dir, "reward.label=0"))
    nothing_recorded(tracking_uri, tmp_path / "checkpoints")


def test_a_critic_from_a_classifier_without_its_head_is_refused_naming_its_key(demo_data, small_run, tiny_lm_dir,
                                                                                tiny_reward_dir, tracking_uri, tmp_path):
    headless = tmp_path / "headless-classifier"
    headless.mkdir()
    for item in tiny_lm_dir.iterdir():
        (headless / item.name).write_bytes(item.read_bytes())
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2ForSequenceClassification"],
                                                      "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}))
    with pytest.raises(ModelLoadError, match=r"critic.model: .*its weights lack score.weight"):
        pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, "critic.type=separate",
                                     f"critic.model={headless}"))
    nothing_recorded(tracking_uri, tmp_path / "checkpoints")


@pytest.mark.parametrize("key, value, message", [
    ("policy.model", "/no/such/model", r"policy.model: '/no/such/model' is neither a local directory \(/no/such/model does not exist\) nor a hub id"),
    ("reward.model", "no-such-org/no-such-model",
     r"reward.model: 'no-such-org/no-such-model' is neither a local directory .* nor a hub id that can be reached: it is not in the local hub cache and HF_HUB_OFFLINE is set"),
    ("policy.model", "models:/no-such-model@champion", r"policy.model: cannot resolve models:/no-such-model@champion in the registry at sqlite"),
])
def test_a_model_that_is_nowhere_fails_at_once_naming_its_key(demo_data, small_run, tiny_lm_dir, tiny_reward_dir,
                                                              tracking_uri, tmp_path, key, value, message):
    settings = [o for o in small_run(tiny_lm_dir, tiny_reward_dir) if not o.startswith(f"{key}=")] + [f"{key}={value}"]
    with pytest.raises(ModelLoadError, match=message):
        pipeline(overrides=settings)
    nothing_recorded(tracking_uri, tmp_path / "checkpoints")


def test_a_read_only_or_full_checkpoint_disk_is_refused_before_training(demo_data, small_run, small_disk, tiny_lm_dir,
                                                                         tiny_reward_dir, tracking_uri):
    read_only = small_disk(1 << 20, read_only=True)
    with pytest.raises(StorageError, match=r"checkpoint.dir: cannot write .*: the file system is read-only \(EROFS\)"):
        pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, f"checkpoint.dir={read_only}"))
    full = small_disk(64 << 10)
    with pytest.raises(StorageError, match=r"checkpoint.dir: .* has 0 MB free, a checkpoint of this run needs about .*ENOSPC"):
        pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, f"checkpoint.dir={full}"))
    nothing_recorded(tracking_uri, full)


def test_a_run_too_large_for_its_device_stops_before_loading_naming_the_figures_and_what_would_fit(
        demo_data, small_run, tiny_lm_dir, tiny_reward_dir, tracking_uri, tmp_path):
    from components.memory_plan import MemoryPlanError

    with pytest.raises(MemoryPlanError, match=r"memory: this run needs about .* GiB per cpu device and 0.10 GiB are "
                                              r"available .* memory.check_fit=false tries anyway"):
        pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, "memory.device_memory_gb=0.1"))
    nothing_recorded(tracking_uri, tmp_path / "checkpoints")


def test_an_error_a_retry_cannot_fix_is_not_retried_and_an_outage_is():
    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retryable)
    def flaky(error: type[Exception]):
        calls.append(error)
        raise error("disk full")

    with pytest.raises(StorageError):
        flaky(StorageError)
    with pytest.raises(ConnectionError):
        flaky(ConnectionError)
    assert calls == [StorageError, ConnectionError, ConnectionError, ConnectionError]


def test_the_cli_ends_a_user_error_with_one_message_and_exit_code_2(demo_data, tracking_uri, tmp_path):
    from prefect.settings import PREFECT_API_URL

    store = ["--set", f"tracking.tracking_uri={tracking_uri}"]
    env = {"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    unknown = alignflow(["run", *store, "--resume", "0123456789abcdef"], env=env)
    assert unknown.returncode == 2
    assert "error: --resume 0123456789abcdef: the tracking store sqlite:///" in unknown.stderr
    assert "Traceback" not in unknown.stderr + unknown.stdout

    missing = alignflow(["run", *store, "--set", "policy.model=/no/such/model", "--set",
                         f"checkpoint.dir={tmp_path / 'checkpoints'}"], env=env)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "error: policy.model: '/no/such/model' is neither a local directory" in missing.stderr
    assert "Traceback" not in missing.stderr + missing.stdout and "Retry" not in missing.stderr
    [log] = [p for p in (tmp_path / "logs").iterdir() if "run" in p.name and "policy.model" in p.read_text()]
    assert "Traceback" in log.read_text()  # the details are kept
    debug = alignflow(["--debug", "promote", "999", *store], env=env)
    assert debug.returncode == 2 and "has no version 999" in debug.stderr and "Traceback" in debug.stderr
    assert "--force" not in debug.stderr


def test_a_killed_run_leaves_no_temporary_prefect_server_behind(demo_data, small_run, tiny_lm_dir, tiny_reward_dir, tmp_path):
    home = tmp_path / "prefect-home"  # marks the processes of this run
    env = {CRASH_ENV: "tracking.started", "PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    settings = sum((["--set", o] for o in small_run(tiny_lm_dir, tiny_reward_dir)), [])
    killed = alignflow(["run", *settings], env=env)
    assert killed.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while (left := servers_of(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"temporary Prefect server(s) {left} outlived the killed run"


def servers_of(home: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"uvicorn" in command and f"PREFECT_HOME={home}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def test_a_gate_outside_its_range_prints_the_range(capsys):
    from components.config import GatesConfig, load_config
    from components.evaluation import compare, summarize
    from components.gates import check_gates
    from flows.cli import show_result
    from flows.tasks import PipelineResult

    reference = summarize([0.0, 1.0], [4.0, 4.0], ["a b", "c d"], n_resamples=50)
    candidate = summarize([1.0, 2.0], [10.0, 11.2], ["e f", "g h"], kl=1.0, n_resamples=50)
    report = check_gates(compare(reference, candidate, n_resamples=50), GatesConfig(significant_gain=False))
    result = PipelineResult(run_id="r", stop_reason="total_episodes", episodes=64, reference=reference,
                            candidate=candidate, gates=report, model_version="3", promoted=False, champion_version=None)
    show_result(result, load_config())
    printed = capsys.readouterr().out
    assert "length_ratio 2.65 outside [min_length_ratio 0.5, max_length_ratio 2.0]" in printed
    assert "in [min_length_ratio 0.5, max_length_ratio 2.0]" in printed


def test_user_errors_are_user_errors():
    from components.config import ConfigError
    from components.data import DataError
    from components.rl import PromptError
    from components.references import ModelReferenceError
    from components.registry import PromotionError
    from components.reward import RewardLabelError
    from components.tracking import RunNotFound

    for error in (ConfigError, DataError, PromptError, ModelReferenceError, PromotionError, RewardLabelError,
                  RunNotFound, ModelLoadError, StorageError):
        assert issubclass(error, UserError) and error.exit_code == 2, error
