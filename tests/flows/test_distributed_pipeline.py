"""The flow launches its training segments in 2 data-parallel processes (accelerate launch, gloo on CPU)."""

from mlflow import MlflowClient

from flows.pipeline import pipeline


def test_two_process_ppo_epochs_log_each_step_once_from_the_flow(demo_data, small_run, tiny_lm_dir, tiny_reward_dir, tracking_uri):
    result = pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, "launch.num_processes=2", "rl.gradient_accumulation_steps=2"))
    assert result.episodes == 64 and result.stop_reason == "total_episodes"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for key in ("objective/scores", "objective/kl", "loss/policy", "episodes", "time/update"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [16, 32, 48, 64], key
    assert [m.value for m in client.get_metric_history(result.run_id, "iteration")] == [1.0, 2.0, 3.0, 4.0]
    assert client.get_run(result.run_id).data.params["launch.num_processes"] == "2"
