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
from support import alignflow, save_tiny_lm, save_tiny_reward_model

from components.errors import UserError, retryable
from components.faults import CRASH_ENV
from components.models.loading import ModelLoadError
from components.checkpoint import StorageError
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
    from components.models.memory_plan import MemoryPlanError

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
    from components.evaluation.policy import compare, summarize
    from components.evaluation.gates import check_gates
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
    from components.data.prompts import DataError
    from components.rl import PromptError
    from components.models.uris import ModelURIError
    from components.tracking.registry import PromotionError
    from components.rl.reward import RewardLabelError
    from components.tracking.runs import RunNotFound

    for error in (ConfigError, DataError, PromptError, ModelURIError, PromotionError, RewardLabelError,
                  RunNotFound, ModelLoadError, StorageError):
        assert issubclass(error, UserError) and error.exit_code == 2, error


# --- issue 24: what the CLI says, in one line with exit code 2, where it said a traceback -------------------------

def one_line_error(done, *expected: str) -> None:
    """Exit code 2, and stderr an `error:` line holding each of `expected`, without a traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    for text in expected:
        assert text in line, (text, line)


def garbage_after_a_gzip_header(path: Path) -> Path:
    """A .gz whose header is valid and whose deflate stream is not (a corrupt, not a truncated, archive)."""
    import gzip

    path.write_bytes(gzip.compress(b'{"prompt": "the film was", "chosen": " good", "rejected": " bad"}\n' * 50)[:10]
                     + bytes(range(256)) * 4)
    return path


def not_gzip_at_all(path: Path) -> Path:
    path.write_bytes(b'{"prompt": "the film was"}\n' * 50)
    return path


@pytest.mark.parametrize("corrupt", [garbage_after_a_gzip_header, not_gzip_at_all])
def test_a_corrupt_gz_prompt_or_preference_file_is_refused_naming_the_file(tmp_path, corrupt):
    from components.config import DataConfig, PreferenceDataConfig
    from components.data.prompts import DataError, load_prompts
    from components.data.preferences import load_pairs

    path = corrupt(tmp_path / "rows.jsonl.gz")
    message = rf"{path}: cannot decompress as \.gz: the file is truncated, corrupt or not \.gz-compressed"
    with pytest.raises(DataError, match=message):
        load_prompts(DataConfig(source=str(path), check_dvc=False))
    with pytest.raises(DataError, match=message):
        load_pairs(PreferenceDataConfig(source=str(path), check_dvc=False))


def test_the_cli_names_a_corrupt_gz_dataset_in_one_line(tiny_lm_dir, tiny_reward_dir, tracking_uri, tmp_path):
    from prefect.settings import PREFECT_API_URL

    prompts = garbage_after_a_gzip_header(tmp_path / "prompts.jsonl.gz")
    env = {"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    data = ["--set", f"data.source={prompts}", "--set", "data.check_dvc=false"]
    models = ["--set", f"policy.model={tiny_lm_dir}", "--set", f"reward.model={tiny_reward_dir}"]
    expected = f"error: {prompts}: cannot decompress as .gz: the file is truncated, corrupt or not .gz-compressed (zlib.error"
    one_line_error(alignflow(["data", "check", *data, *models], env=env), expected)
    one_line_error(alignflow(["run", *data, *models, "--set", f"tracking.tracking_uri={tracking_uri}", "--set",
                              f"checkpoint.dir={tmp_path / 'checkpoints'}"], env=env), expected)
    pairs = garbage_after_a_gzip_header(tmp_path / "pairs.jsonl.gz")
    one_line_error(alignflow(["reward", "run", "--set", f"data.source={pairs}", "--set", "data.check_dvc=false", "--set",
                              f"model.base={tiny_lm_dir}", "--set", f"tracking.tracking_uri={tracking_uri}"], env=env),
                   f"error: {pairs}: cannot decompress as .gz")


def test_a_plan_with_sizes_no_run_can_have_is_one_line_naming_the_key(tiny_lm_dir, tiny_reward_dir, tmp_path):
    huge = tmp_path / "huge-model"
    huge.mkdir()
    for item in tiny_lm_dir.iterdir():
        (huge / item.name).write_bytes(item.read_bytes())
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "n_embd": 10**12}))
    models = ["--set", f"policy.model={tiny_lm_dir}", "--set", f"reward.model={tiny_reward_dir}"]
    env = {"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs")}
    one_line_error(alignflow(["plan", *models, "--set", "generation.max_new_tokens=1000000000000"], env=env),
                   "generation.max_new_tokens: 1000000000000 is beyond any run (at most 2147483648)")
    one_line_error(alignflow(["plan", *models, "--set", f"rl.rollout_batch_size={10**400}", "--set",
                              "rl.mini_batch_size=1"], env=env),
                   "rl.rollout_batch_size: about 10**400 is beyond any run")
    one_line_error(alignflow(["plan", *models, "--device-gb", "inf"], env=env), "--device-gb: inf GB is not a device's memory")
    one_line_error(alignflow(["plan", "--set", f"policy.model={huge}", "--set", f"reward.model={tiny_reward_dir}"], env=env),
                   f"policy.model: the config of {huge} gives sizes no model can have: n_embd=1000000000000")


def test_run_remote_with_a_misspelled_deployment_names_the_deployments_the_server_has(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    with get_client(sync_client=True) as client:
        client.create_deployment(client.create_flow_from_name("alignflow-pipeline"), name="nightly-bad-input")
    done = alignflow(["run", "--remote", "nightyl-bad-input"], env={"PREFECT_API_URL": url,
                                                                    "ALIGNFLOW_LOG_DIR": str(tmp_path / "logs")})
    one_line_error(done, "--remote nightyl-bad-input: no deployment alignflow-pipeline/nightyl-bad-input on the Prefect "
                         f"server at {url}; it has ", "alignflow-pipeline/nightly-bad-input")
    assert "ObjectNotFound" not in done.stderr
    from flows.cli import missing_deployment

    assert missing_deployment("alignflow-pipeline/nightly-bad-input", url) is None  # a deployment it has: not missing


@pytest.mark.parametrize("command", ["models", "runs"])
def test_models_and_runs_against_an_unreachable_tracking_server_fail_at_once_naming_it(tmp_path, command):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    done = alignflow([command, "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"],
                     env={"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs")}, timeout=120)
    one_line_error(done, f"tracking.tracking_uri: the MLflow tracking server at http://127.0.0.1:{port} cannot be reached")
    assert time.monotonic() - start < 30  # MLflow's own retries would take minutes


@pytest.fixture
def prefect_without_credentials(monkeypatch):
    """A loopback HTTP server standing in as a team's Prefect API that refuses a client without its credential: 401
    to everything but the health probes, as `server.api.auth_string` does. Yields its API URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def answer(self):
            healthy = self.path.split("?")[0].rstrip("/").endswith(("/health", "/ready"))
            body = b"true" if healthy else b'{"exception_message": "Unauthorized"}'
            self.send_response(200 if healthy else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()


def test_a_prefect_server_refusing_a_cli_without_its_credential_is_the_readme_line_for_every_command(
        prefect_without_credentials, tiny_lm_dir, tiny_reward_dir, tracking_uri, tmp_path):
    url = prefect_without_credentials
    env = {"PREFECT_API_URL": url, "ALIGNFLOW_LOG_DIR": str(tmp_path / "logs")}
    readme = f"error: the Prefect server at {url} requires credentials: set PREFECT_API_AUTH_STRING"
    server_registry = ["--set", f"tracking.tracking_uri={url.removesuffix('/api')}/mlflow"]  # the lock is Prefect's
    one_line_error(alignflow(["promote", "1", *server_registry], env=env), readme)
    one_line_error(alignflow(["rollback", *server_registry], env=env), readme)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the film {i} was"}) + "\n" for i in range(40)))
    one_line_error(alignflow(["run", "--set", f"data.source={prompts}", "--set", "data.check_dvc=false", "--set",
                              "data.eval_size=8", "--set", f"policy.model={tiny_lm_dir}", "--set",
                              f"reward.model={tiny_reward_dir}", "--set", f"tracking.tracking_uri={tracking_uri}",
                              "--set", f"checkpoint.dir={tmp_path / 'checkpoints'}"], env=env), readme)


def test_a_model_uri_to_a_file_says_it_is_a_file_not_a_model_folder(tiny_lm_dir, tmp_path):
    from components.models.loading import locate

    with pytest.raises(ModelLoadError, match=rf"policy.model: {tiny_lm_dir / 'config.json'} is a file, not a model "
                                             rf"folder: point policy.model at its folder, {tiny_lm_dir}$"):
        locate("policy.model", str(tiny_lm_dir / "config.json"))
    archive = tmp_path / "policy.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(ModelLoadError, match=rf"reward.model: {archive} is a file, not a model folder: point it at the "
                                             "folder save_pretrained wrote"):
        locate("reward.model", str(archive))


def test_a_gold_scorer_outside_the_project_is_refused_exit_2_by_set_config_file_and_remote(tmp_path):
    env = {"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs")}
    expected = ("evaluation.gold_scorer: not a gold scorer alignflow may import: name a public function of this project's "
                "own packages (components., benchmarks.)")
    for done in (alignflow(["config", "show", "--set", "evaluation.gold_scorer=os:system"], env=env),
                 alignflow(["run", "--remote", "nightly", "--set", "evaluation.gold_scorer=os:system"], env=env),
                 alignflow(["reward", "run", "--set", "evaluation.gold_scorer=os:system"], env=env)):
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    config = tmp_path / "judge.yaml"
    config.write_text("evaluation:\n  gold_scorer: os:system\n")
    done = alignflow(["config", "show", "--config", str(config)], env=env)
    assert done.returncode == 2 and f"invalid configuration ({config})" in done.stderr and expected in done.stderr


# --- lengths beyond a model's positions (issue 26): refused by each stage's input check, before anything is recorded -

HH_PAIRS = ["--set", "data.source=tests/fixtures/hh-rlhf", "--set", "data.data_dir=harmless-base", "--set",
            "data.split=test", "--set", "data.format=implicit", "--set", "data.check_dvc=false"]
HH_EXAMPLE = ["--config", "configs/examples/hh-rlhf-preference.yaml"]  # 96 prompt + 24 new tokens, reward.max_length 128


def no_run_left(tracking_uri: str, checkpoints: Path) -> None:
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    assert not experiments or not client.search_runs(experiments), "a run was recorded"
    assert not checkpoints.exists() or not list(checkpoints.iterdir()), "a checkpoint was left"


def cli_env(tmp_path: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs"), "PREFECT_API_URL": PREFECT_API_URL.value()}


def test_a_reward_stage_max_length_beyond_the_base_models_positions_is_refused_before_a_run_is_recorded(
        tracking_uri, tmp_path):
    # The run: --set model.max_length=512 on a 128-position model crashed 35 s in with a raw IndexError and left
    # a FAILED run behind.
    base = save_tiny_lm(tmp_path / "base-32-positions", n_positions=32)
    store = ["--set", f"tracking.tracking_uri={tracking_uri}", "--set", f"checkpoint.dir={tmp_path / 'checkpoints'}"]
    done = alignflow(["reward", "run", *HH_PAIRS, *store, "--set", f"model.base={base}", "--set", "model.max_length=512"],
                     env=cli_env(tmp_path))
    one_line_error(done, f"error: model.max_length=512: more tokens than the 32 positions of the base model "
                         f"(model.base: {base})")
    no_run_left(tracking_uri, tmp_path / "checkpoints")


@pytest.mark.parametrize("short, expected", [
    ("policy", "error: generation.max_prompt_tokens + generation.max_new_tokens = 96 + 24 = 120: more tokens than the "
               "64 positions of the policy (policy.model: {model})"),
    ("reward", "error: reward.max_length=128: more tokens than the 64 positions of the reward model "
               "(reward.model: {model})"),
])
def test_a_policy_run_feeding_a_model_beyond_its_positions_is_refused_naming_the_key_and_the_limit(
        tiny_lm_dir, tiny_reward_dir, tracking_uri, tmp_path, short, expected):
    model = (save_tiny_lm if short == "policy" else save_tiny_reward_model)(tmp_path / f"{short}-64", n_positions=64)
    models = {"policy": tiny_lm_dir, "reward": tiny_reward_dir, short: model}
    done = alignflow(["run", *HH_EXAMPLE, "--set", f"policy.model={models['policy']}", "--set",
                      f"reward.model={models['reward']}", "--set", f"tracking.tracking_uri={tracking_uri}", "--set",
                      f"checkpoint.dir={tmp_path / 'checkpoints'}"], env=cli_env(tmp_path))
    one_line_error(done, expected.format(model=model))
    no_run_left(tracking_uri, tmp_path / "checkpoints")


def test_a_hub_policy_is_held_to_its_positions_from_its_config_alone(tiny_reward_dir, tmp_path):
    # Only config.json is in the hub cache: no weights, no tokenizer; `alignflow plan` refuses what `run` would.
    snapshot = tmp_path / "hub" / "models--alignflow-tests--gpt2-32-positions" / "snapshots" / ("0" * 40)
    save_tiny_lm(tmp_path / "saved", n_positions=32)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    done = alignflow(["plan", "--set", "policy.model=alignflow-tests/gpt2-32-positions", "--set",
                      f"reward.model={tiny_reward_dir}", "--set", "critic.type=shared"],
                     env={"ALIGNFLOW_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_CACHE": str(tmp_path / "hub")})
    one_line_error(done, "error: generation.max_prompt_tokens + generation.max_new_tokens = 16 + 24 = 40: more tokens "
                         "than the 32 positions of the policy (policy.model: alignflow-tests/gpt2-32-positions)")
