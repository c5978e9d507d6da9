"""The team topology against real servers: infra/local-stack starts MLflow (PostgreSQL backend, basic
auth) and Prefect (PostgreSQL) on loopback, and a worker on a process work pool (the `stack` and `as_client`
fixtures of tests/infra/conftest.py)."""

import contextvars
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from support import build_trainer_with
from components.tracking import runs as tracking
from components.config import PROJECT_ROOT, TrackingConfig
from components.rl import Trainer

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "alignflow-policy"


def small_overrides(demo_kit, tmp_path: Path, experiment: str) -> list[str]:
    return [
        f"policy.model={demo_kit.instruct}", f"reward.model={demo_kit.reward}",
        f"tracking.experiment={experiment}", f"checkpoint.dir={tmp_path / 'checkpoints'}",
        "rl.rollout_batch_size=32", "rl.mini_batch_size=16", "rl.total_episodes=320", "checkpoint.every=5",
        "rl.learning_rate=2e-4", "data.eval_size=64", "evaluation.bootstrap_samples=200",
        "critic.type=shared",  # these tests are about the servers: the cheaper critic
    ]


def tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path: Path, experiment: str) -> list[str]:
    """A pipeline run of seconds on the tiny models, with a registered model of its own (not the champion's)."""
    return [
        f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", f"tracking.experiment={experiment}",
        f"tracking.registered_model={experiment}-policy", f"checkpoint.dir={tmp_path / 'checkpoints'}",
        "rl.rollout_batch_size=16", "rl.mini_batch_size=8", "rl.update_epochs=2", "rl.total_episodes=160", "checkpoint.every=5",
        "data.eval_size=32", "generation.max_new_tokens=12", "evaluation.bootstrap_samples=200",
    ]


def test_mlflow_rejects_requests_without_credentials(stack, as_client):
    url = f"{as_client['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    assert httpx.get(url, params={"max_results": 1}, timeout=60).status_code == 401
    wrong = httpx.get(url, params={"max_results": 1}, auth=("admin", "not-the-password"), timeout=60)
    assert wrong.status_code == 401
    right = httpx.get(url, params={"max_results": 1},
                      auth=(as_client["MLFLOW_TRACKING_USERNAME"], as_client["MLFLOW_TRACKING_PASSWORD"]), timeout=60)
    assert right.status_code == 200
    # The server remembers a good credential for a minute (auth_cache_ttl_seconds), never a wrong one.
    assert httpx.get(url, params={"max_results": 1}, auth=("admin", "not-the-password"), timeout=60).status_code == 401


def test_scheduled_deployment_runs_on_the_worker_and_registers_a_champion(stack, as_client, demo_kit, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    experiment = "team-scheduled"
    args = ["deploy", "--name", "every-10s", "--interval", "10", "--pool", "alignflow-test-pool", "--concurrency-limit", "1"]
    for override in small_overrides(demo_kit, tmp_path, experiment):
        args += ["--set", override]
    env = {**os.environ, **as_client}
    done = subprocess.run([shutil.which("alignflow") or str(Path(os.sys.executable).parent / "alignflow"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    deployment_id = done.stdout.split("(")[1].split(")")[0]

    from prefect.states import Cancelled, Cancelling

    deadline = time.monotonic() + 600
    paused = False
    with get_client(sync_client=True) as prefect:
        while True:  # nobody triggers it: the schedule does, and the worker runs it
            runs = prefect.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            if not paused and any(r.state and not r.state.is_scheduled() for r in runs):
                prefect.pause_deployment(deployment_id)  # one run is enough; pausing deletes the scheduled ones
                paused = True
            finished = [r for r in runs if r.state and r.state.is_final()]
            if finished:
                break
            assert time.monotonic() < deadline, (f"no scheduled run finished; runs: {[(r.name, r.state_name) for r in runs]}\n"
                                                 f"{(stack.state / 'logs' / 'worker.log').read_text()[-3000:]}")
            time.sleep(3)
        flow_run = finished[0]
        deployment = prefect.read_deployment(deployment_id)
        # A second run that was due while the first ran waits for the concurrency slot; pausing does not delete it.
        # Stop it before deleting the deployment (which holds the slot it would release): one still waiting is
        # cancelled, one the worker already started is cancelled by the worker, which stops its process.
        others = lambda: [r for r in prefect.read_flow_runs(  # noqa: E731
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            if r.id != flow_run.id and not (r.state and r.state.is_final())]
        for other in others():
            prefect.set_flow_run_state(other.id, Cancelled() if other.state is None or other.state.is_scheduled() else Cancelling(), force=True)
        stop_by = time.monotonic() + 120
        while others() and time.monotonic() < stop_by:
            time.sleep(2)
        prefect.delete_deployment(deployment_id)  # no more runs every 10 s for the rest of the tests
        assert flow_run.state.is_completed(), f"{flow_run.name}: {flow_run.state}\n{(stack.state / 'logs' / 'worker.log').read_text()[-3000:]}"
        assert flow_run.auto_scheduled
        assert deployment.schedules and deployment.schedules[0].schedule.interval.total_seconds() == 10
        assert deployment.work_pool_name == "alignflow-test-pool"

    client = MlflowClient(as_client["MLFLOW_TRACKING_URI"], registry_uri=as_client["MLFLOW_TRACKING_URI"])  # a separate client, as a teammate would use
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               filter_string=f"tags.`alignflow.prefect_flow_run_id` = '{flow_run.id}'")
    assert run.info.status == "FINISHED"
    version = run.data.tags["alignflow.model_version"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == version and champion.tags["alignflow.gates_passed"] == "true"
    assert "objective/scores" in run.data.metrics


def test_a_manual_remote_run_is_executed_by_the_worker_and_waited_for(stack, as_client, demo_kit, tiny_lm_dir, tiny_reward_dir, tmp_path):
    """`alignflow run --remote NAME --wait`: the flow runs on the worker, not here, and the command reports its end."""
    alignflow = shutil.which("alignflow") or str(Path(os.sys.executable).parent / "alignflow")
    env = {**os.environ, **as_client}
    sets = [arg for override in tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path, "team-manual") for arg in ("--set", override)]
    deployed = subprocess.run([alignflow, "deploy", "--name", "manual", "--pool", "alignflow-test-pool", *sets],
                              env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0 and "no schedule" in deployed.stdout, deployed.stdout + deployed.stderr
    done = subprocess.run([alignflow, "run", "--remote", "manual", "--wait", *sets], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + (stack.state / "logs" / "worker.log").read_text()[-3000:]
    assert "of alignflow-pipeline/manual: Completed" in done.stdout, done.stdout
    flow_run_id = done.stdout.split("(")[1].split(")")[0]

    client = MlflowClient(as_client["MLFLOW_TRACKING_URI"], registry_uri=as_client["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("team-manual").experiment_id],
                               filter_string=f"tags.`alignflow.prefect_flow_run_id` = '{flow_run_id}'")
    assert run.info.status == "FINISHED" and run.data.tags["alignflow.model_version"]
    assert run.data.params["rl.total_episodes"] == "160"  # the overrides travelled as the flow run's parameters


def test_concurrent_promotions_leave_exactly_one_champion_the_better_one(stack, as_client, tiny_lm_dir):
    from prefect.client.orchestration import get_client

    from components.tracking import registry
    from components.config import RunConfig
    from flows import promotion

    name = "race-policy"
    store = TrackingConfig(tracking_uri=as_client["MLFLOW_TRACKING_URI"], experiment="race", registered_model=name)
    tracking.use_tracking(store)
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(store)) as run:  # two candidates of one logged model
        uri = registry.log_policy(tiny_lm_dir)
        mlflow.log_metric(registry.GATES_METRIC, 1.0)  # the pipeline's gate result, which promotion checks the tag against
        first = registry.register(name, run.info.run_id, uri, {"gates_passed": True, registry.SCORE_TAG: 1.0})
    second = mlflow.register_model(uri, name, tags={"gates_passed": "true", registry.SCORE_TAG: "2.0"})
    versions = {1.0: str(first.version), 2.0: str(second.version)}
    with get_client(sync_client=True) as client:
        # A fresh limit: a run cancelled earlier in this module may still hold a slot until its lease expires.
        try:
            client.delete_global_concurrency_limit_by_name(promotion.PROMOTION_LOCK)
        except Exception:
            pass
        client.upsert_global_concurrency_limit_by_name(promotion.PROMOTION_LOCK, 1)

    config = RunConfig(tracking=store)
    for order in ((1.0, 2.0), (2.0, 1.0)):
        MlflowClient().delete_registered_model_alias(name, "champion") if registry.get_champion(name) else None
        barrier = threading.Barrier(2)
        outcomes, errors = {}, {}

        def promote(score):
            barrier.wait()  # both saw no champion when their gates ran; they finish together
            try:  # the pipeline's promotion: the Prefect lock (a tracking server), compare-and-set, the tags
                outcomes[score] = promotion.promote(config, versions[score], evaluated_against=None, score=score)
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                errors[score] = repr(error)

        # Each thread carries this context (Prefect's settings live in context variables).
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(promote, score)) for score in order]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert set(outcomes) == {1.0, 2.0}, errors
        champion = registry.get_champion(name)
        assert str(champion.version) == versions[2.0], (order, outcomes)
        aliases = MlflowClient().get_registered_model(name).aliases
        assert list(aliases) == ["champion"]


HOLD_THE_LOCK = """
import sys, time
from flows import promotion
with promotion.promotion_lock(sys.argv[1], action="test promotion"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_promotion_killed_holding_the_lock_blocks_the_next_for_the_stated_time_only(stack, as_client, capfd):
    """A process SIGKILLed inside the promotion lock (Prefect's slot, leased): the next promotion says once on stderr
    what it waits for and who holds it, and moves the champion within the stated FREED_WITHIN_SECONDS (not after
    Prefect's default lease of 300 s)."""
    from prefect.client.orchestration import get_client

    from components.tracking import registry
    from flows import promotion

    uri = as_client["MLFLOW_TRACKING_URI"]
    with get_client(sync_client=True) as client:  # a fresh limit, as in the race above
        try:
            client.delete_global_concurrency_limit_by_name(promotion.PROMOTION_LOCK)
        except Exception:
            pass
        client.upsert_global_concurrency_limit_by_name(promotion.PROMOTION_LOCK, 1)
    name = f"lease-{os.getpid()}-{int(time.time())}"
    client = MlflowClient(uri, uri)
    run = client.create_run(client.create_experiment(name))
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.log_metric(run.info.run_id, registry.GATES_METRIC, 1.0)  # the pipeline's gate result, checked by promotion
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                          tags={"gates_passed": "true"}).version

    holder = subprocess.Popen([os.sys.executable, "-c", HOLD_THE_LOCK, uri], env={**os.environ, **as_client},
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()  # SIGKILL: no release, no cleanup
        holder.wait()
    killed = time.monotonic()
    capfd.readouterr()
    with promotion.promotion_lock(uri, timeout_seconds=promotion.FREED_WITHIN_SECONDS + 30, action="the next promotion"):
        waited = time.monotonic() - killed
        moved, _ = registry.promote(name, version, user="lease-test")
    assert moved and str(registry.get_champion(name).version) == str(version)
    assert waited <= promotion.FREED_WITHIN_SECONDS + 10, f"the dead holder's slot was freed after {waited:.0f} s"
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("waiting for the registry's promotion lock")]
    assert len(said) == 1, said  # one line, not one per retry
    assert "held by alignflow-pipeline's test promotion (pid " in said[0], said[0]
    assert f"up to {promotion.FREED_WITHIN_SECONDS + 30} s" in said[0]
    assert f"a holder that died frees it within {promotion.FREED_WITHIN_SECONDS} s" in said[0]


# Tiny models rarely pass the demo's gates: both candidates must, so that both race for the alias.
GATES_THAT_PASS = ["gates.min_score_gain=-1000", "gates.significant_gain=false", "gates.min_win_rate=0", "gates.max_kl=1000000",
                   "gates.min_length_ratio=0", "gates.max_length_ratio=1000", "gates.min_distinct2=0", "gates.beats_champion=false"]


def test_two_runs_at_once_on_the_team_stack_keep_separate_runs_checkpoints_and_versions(stack, as_client, demo_data_dir,
                                                                                         tiny_lm_dir, tiny_reward_dir, tmp_path):
    """Two `alignflow run` at once against the stack's MLflow (PostgreSQL) and Prefect, as the service account:
    both finish, each with its own run, checkpoint and version, and exactly one of them holds the champion alias."""
    alignflow = shutil.which("alignflow") or str(Path(os.sys.executable).parent / "alignflow")
    env = {**os.environ, **as_client}
    sets = [arg for override in [*tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path, "team-two-runs"),
                                 "checkpoint.keep=true", *GATES_THAT_PASS] for arg in ("--set", override)]
    runs = [subprocess.Popen([alignflow, "run", *sets], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(output[-3000:] for output in outputs)

    client = MlflowClient(as_client["MLFLOW_TRACKING_URI"], registry_uri=as_client["MLFLOW_TRACKING_URI"])
    found = client.search_runs([client.get_experiment_by_name("team-two-runs").experiment_id])
    assert len(found) == 2 and {r.info.status for r in found} == {"FINISHED"}
    versions = client.search_model_versions("name='team-two-runs-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and {v.run_id for v in versions} == {r.info.run_id for r in found}
    aliases = client.get_registered_model("team-two-runs-policy").aliases
    assert list(aliases) == ["champion"] and str(aliases["champion"]) in {"1", "2"}  # one champion, one of the two
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == sorted(r.info.run_id for r in found)


def test_mlflow_down_mid_run_fails_clearly_and_a_rerun_resumes(stack, as_client, demo_kit, tiny_lm_dir, tiny_reward_dir, tmp_path, monkeypatch):
    from flows import tasks
    from flows.pipeline import pipeline
    from flows.stage import ServerUnreachable

    overrides = tiny_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path, "team-outage")
    real_iteration = Trainer.run_iteration

    def iteration_then_outage(self, prompts):
        if self.iteration == 6 and not outage:
            outage.append(stack("stop", "mlflow"))
        return real_iteration(self, prompts)

    outage: list[str] = []
    monkeypatch.setattr(Trainer, "run_iteration", iteration_then_outage)
    # The training task's retries as in production (2), without their 2 s and 10 s waits.
    monkeypatch.setattr(tasks, "train", tasks.train.with_options(retry_delay_seconds=0))
    with pytest.raises(ServerUnreachable) as failure:
        pipeline(overrides=overrides)
    message = str(failure.value)
    assert as_client["MLFLOW_TRACKING_URI"] in message and "alignflow run --resume" in message
    run_id = message.split("--resume ")[1].split()[0]
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert (tmp_path / "checkpoints" / run_id).is_dir(), checkpoints

    stack("up")  # brings MLflow back
    client = MlflowClient(as_client["MLFLOW_TRACKING_URI"], registry_uri=as_client["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).data.tags.get("alignflow.model_version") is None  # nothing registered
    result = pipeline(overrides=overrides, resume_run_id=run_id)
    assert result.run_id == run_id and result.episodes == 160
    steps = [m.step for m in client.get_metric_history(run_id, "objective/scores")]
    assert steps == list(range(16, 161, 16))  # every step once: none lost in the outage, none twice
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["alignflow.model_version"] == result.model_version


def test_compose_file_is_valid_and_demands_its_secrets():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose (Debian's package) is needed to validate infra/docker-compose.yml; `make test` installs it")
    file = str(PROJECT_ROOT / "infra" / "docker-compose.yml")
    secrets = {"POSTGRES_PASSWORD": "x", "MLFLOW_ADMIN_USER": "a", "MLFLOW_ADMIN_PASSWORD": "b", "MLFLOW_FLASK_SERVER_SECRET_KEY": "c",
               "ALIGNFLOW_PIPELINE_PASSWORD": "d", "PREFECT_AUTH_STRING": "e:f"}
    env = {k: v for k, v in os.environ.items() if k not in secrets}
    valid = subprocess.run([compose, "-f", file, "config", "--services"], env={**env, **secrets}, capture_output=True, text=True)
    assert valid.returncode == 0, valid.stderr
    assert set(valid.stdout.split()) == {"postgres", "mlflow", "mlflow-roles", "prefect", "worker"}
    for secret in secrets:  # each one is demanded, none has a default
        missing = subprocess.run([compose, "-f", file, "config", "-q"], env={**env, **{k: v for k, v in secrets.items() if k != secret}},
                                 capture_output=True, text=True)
        assert missing.returncode != 0 and secret in missing.stderr, (secret, missing.stderr)


def test_prefect_yaml_deploys_the_nightly_and_weekly_schedules(stack, as_client):
    from prefect.client.orchestration import get_client

    env = {**os.environ, **as_client, "ALIGNFLOW_HOME": str(PROJECT_ROOT)}
    prefect = str(Path(os.sys.executable).parent / "prefect")
    for pool in ("alignflow-pool", "alignflow-gpu"):  # a process pool stands in for the GPU pool (infra/k8s/)
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, capture_output=True, timeout=120)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("alignflow-pipeline/nightly")
        node = client.read_deployment_by_name("alignflow-train-node/gpu")
        reward = client.read_deployment_by_name("alignflow-reward/weekly")
    assert reward.entrypoint == "flows/reward_pipeline.py:reward_pipeline" and reward.work_pool_name == "alignflow-pool"
    assert reward.schedules[0].schedule.cron == "0 1 * * 1" and reward.parameters["config_path"] == "configs/reward.yaml"
    assert deployment.work_pool_name == "alignflow-pool"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters["config_path"] == "configs/demo.yaml"
    assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(PROJECT_ROOT)
    assert node.work_pool_name == "alignflow-gpu" and node.entrypoint == "flows/node.py:train_node"


def node_deployment(name: str, **job_variables) -> str:
    """flows/node.py deployed on the stack's process pool (standing in for the GPU pool), as prefect.yaml deploys it."""
    from flows.node import NODE_FLOW, train_node

    train_node.from_source(source=str(PROJECT_ROOT), entrypoint="flows/node.py:train_node").deploy(
        name=name, work_pool_name="alignflow-test-pool", job_variables=job_variables, build=False, push=False,
        print_next_steps=False)
    return f"{NODE_FLOW}/{name}"


TWO_MACHINE_PROMPTS = [f"{words} {i}" for i in range(2) for words in
                       ("the film was", "I loved the movie", "the plot is", "it was a", "the acting", "we hated it but")]


def two_machine_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path: Path, node: str, experiment: str) -> list[str]:
    return [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", f"tracking.experiment={experiment}",
            f"checkpoint.dir={tmp_path / 'checkpoints'}", "rl.rollout_batch_size=8", "rl.mini_batch_size=4",
            "rl.gradient_accumulation_steps=2", "rl.update_epochs=1", "rl.total_episodes=16", "checkpoint.every=2",
            "generation.max_new_tokens=6", "launch.num_processes=2", "launch.num_machines=2", "launch.main_process_ip=127.0.0.1",
            f"launch.node_deployment={node}"]


def test_a_two_machine_training_segment_runs_machine_1_on_the_worker_and_logs_once(stack, as_client, tiny_lm_dir, tiny_reward_dir, tmp_path):
    """launch.num_machines=2 on loopback: the pipeline's training task runs machine 0 (1 process) and submits machine 1
    (1 process) as a run of the node deployment, which the stack's worker executes; one 2-process run, logged once.
    (The pipeline's segments without its evaluation and registry, which have their own tests: this one stays short.)"""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from components.config import load_config
    from flows import stage, tasks

    node = node_deployment("loopback")
    config = load_config(None, two_machine_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path, node, "team-two-machines"))

    @flow
    def train_segments() -> tuple[str, int]:  # the pipeline's training steps, as flows/pipeline.py calls them
        scorer = tasks.load_reward_model(config)
        policy, tokenizer = tasks.load_policy(config)
        trainer = tasks.build(config, policy, tokenizer, scorer)
        run_id = stage.start_tracking(config, None, "policy", tasks.provenance(config, {}))
        while trainer.stop_reason is None:
            tasks.train(trainer, trainer.iteration, TWO_MACHINE_PROMPTS, config, run_id)
        stage.end_tracking(run_id, failed=False)
        return run_id, trainer.episodes

    run_id, episodes = train_segments()
    assert episodes == 16
    client = MlflowClient(as_client["MLFLOW_TRACKING_URI"], registry_uri=as_client["MLFLOW_TRACKING_URI"])
    for key in ("objective/scores", "loss/policy", "episodes"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [8, 16], key
    assert client.get_run(run_id).data.params["launch.num_machines"] == "2"

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["alignflow-train-node"])))
    mine = [r for r in runs if r.parameters.get("checkpoint", "").startswith(str(tmp_path))]
    assert len(mine) == 1, [(r.name, r.state_name) for r in runs]
    [machine_1] = mine
    assert machine_1.state.is_completed(), f"{machine_1.name}: {machine_1.state}\n{(stack.state / 'logs' / 'worker.log').read_text()[-3000:]}"
    assert machine_1.parameters["machine_rank"] == 1 and machine_1.parameters["main_process_ip"] == "127.0.0.1"
    assert machine_1.work_pool_name == "alignflow-test-pool" and machine_1.infrastructure_pid  # run by the worker's process
    leftovers = subprocess.run(["pgrep", "-f", f"checkpoint {tmp_path}"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"launch processes still alive: {leftovers}"


def test_a_machine_that_cannot_start_stops_the_segment_naming_it(stack, as_client, tiny_lm_dir, tiny_reward_dir, tmp_path):
    """Machine 1's flow run crashes (its working directory does not exist on that machine): machine 0 stops waiting
    at the rendezvous, and the segment fails naming machine 1 and its flow run."""
    from components.config import load_config
    from components.models.loading import load_policy, load_tokenizer
    from components.rl.reward import RewardScorer
    from flows.multinode import launch_iterations
    from prefect import flow

    node = node_deployment("broken", working_dir=str(tmp_path / "not-mounted-here"))
    config = load_config(None, two_machine_overrides(tiny_lm_dir, tiny_reward_dir, tmp_path, node, "unused"))

    @flow
    def one_launch() -> None:
        trainer = build_trainer_with(config, load_policy(str(tiny_lm_dir)), load_tokenizer(str(tiny_lm_dir)),
                                         RewardScorer.from_config(config.reward))
        launch_iterations(trainer, ["the film was", "the plot is"] * 4, config, tmp_path / "checkpoint", 1)

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"stopped the launch on this machine: machine 1 \(flow run .*\) ended (Crashed|Failed)"):
        one_launch()
    assert time.monotonic() - start < 120  # not the rendezvous' 600 s timeout
    leftovers = subprocess.run(["pgrep", "-f", f"checkpoint {tmp_path}"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"launch processes still alive: {leftovers}"
