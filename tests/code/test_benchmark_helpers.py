"""The benchmark harness's measuring helpers (benchmarks/, run by `make bench`, not by the tests):
model-FLOP counting, the phase clock, the matmul probe and the per-run summary. No TRL needed."""

import json
import sys
from pathlib import Path

import pytest
import torch
from support import gpt2_config, word_tokenizer
from transformers import GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, for `benchmarks`

from benchmarks import alignflow_worker, ppo_vs_trl, trl_worker  # noqa: E402,F401  (the modules import cleanly)
from benchmarks.measure import (  # noqa: E402
    PHASES,
    FlopCounter,
    PhaseClock,
    matmul_flops_per_second,
    matmul_parameters,
    peak_rss_mb,
    rss_mb,
)
from benchmarks.workloads import Workload  # noqa: E402


def test_matmul_probe_reports_each_size_and_the_best():
    probe = matmul_flops_per_second(sizes=(32, 64), repeats=2)
    assert set(probe) == {"n=32", "n=64", "best"}
    assert probe["best"] == max(probe["n=32"], probe["n=64"]) > 0


def test_matmul_parameters_leave_out_embedding_tables():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    assert matmul_parameters(model) == 4 * 3 + 3


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(word_tokenizer())).eval()


def test_flops_are_2n_per_token_forward_and_6n_per_token_training_charged_to_the_phase():
    model = tiny_gpt2()
    clock = PhaseClock()
    counter = FlopCounter(clock)
    body = counter.watch_backbone("policy", model.transformer)
    head = counter.watch_head("policy_head", model.lm_head)
    # 2 layers of width 32: 12 d^2 + 13 d weights and biases each, plus the final layer norm (2 d).
    assert body == 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32
    assert head == model.config.vocab_size * 32
    input_ids = torch.randint(4, model.config.vocab_size, (2, 5))

    clock.switch("reference")
    with torch.no_grad():
        model(input_ids=input_ids)
    clock.switch("update")
    model(input_ids=input_ids).logits.sum().backward()
    flops = counter.lap()

    assert set(flops) == set(PHASES)
    assert flops["reference"] == 2 * (body + head) * 10
    assert flops["update"] == 6 * (body + head) * 10
    assert counter.tokens == {"policy/forward": 10, "policy_head/forward": 10, "policy/train": 10, "policy_head/train": 10}
    assert counter.lap()["update"] == 0  # a lap starts from zero
    counter.close()
    model(input_ids=input_ids)
    assert counter.lap()["update"] == 0  # closed: the hooks are gone


def test_phase_clock_charges_a_wrapped_call_to_its_phase_and_returns_to_the_caller_phase():
    clock = PhaseClock()
    seen = []
    scoring = clock.timed("scoring", lambda: seen.append(clock.current) or 7)
    chosen = clock.timed(lambda model: "value" if model == "critic" else "scoring", lambda model: seen.append(clock.current))
    clock.switch("update")
    assert scoring() == 7
    chosen("critic")
    assert seen == ["scoring", "value"] and clock.current == "update"
    lap = clock.lap()
    assert set(lap) == set(PHASES) and all(seconds >= 0 for seconds in lap.values())
    assert lap["scoring"] > 0 and lap["value"] > 0 and lap["update"] > 0


def test_summary_takes_the_median_after_warm_up_and_divides_flops_by_time_and_peak():
    def iteration(seconds, update_seconds, flops, update_flops):
        phases = dict.fromkeys(PHASES, 0.0) | {"update": update_seconds, "other": seconds - update_seconds}
        return {"seconds": seconds, "phases": phases, "flops": dict.fromkeys(PHASES, 0.0) | {"generation": flops - update_flops, "update": update_flops}, "score": 0.0, "generation_steps": 24}

    result = {
        "iterations": [iteration(10.0, 5.0, 1e9, 5e8), iteration(2.0, 1.0, 4e9, 2e9), iteration(4.0, 3.0, 4e9, 2e9), iteration(3.0, 2.0, 6e9, 3e9)],
        "peak_rss_mb": 100.0, "rss_before_train_mb": 50.0, "parameters": {}, "threads": 1, "setup_seconds": 1.0,
    }
    workload = Workload("w", "p", "r", batch_size=64, mini_batch_size=16, ppo_epochs=4, learning_rate=1e-4,
                        kl_coef=0.2, max_new_tokens=24, max_prompt_tokens=16, iterations=4, warmup=1)
    summary = ppo_vs_trl.summarize([result], workload, peak_flops=1e9)
    assert summary["episodes_per_second"] == 64 / 3.0
    assert summary["mfu"] == pytest.approx(2.0)  # median of 4e9/2, 4e9/4, 6e9/3 FLOP/s over 1e9
    assert summary["update_mfu"] == pytest.approx((2e9 + 2e9 + 3e9) / (1.0 + 3.0 + 2.0) / 1e9)
    assert summary["phase_share"]["update"] == pytest.approx(6.0 / 9.0)
    assert summary["gflop_per_iteration"] == pytest.approx(14 / 3)


def test_resident_memory_is_reported_in_megabytes():
    # /proc's current RSS and getrusage's peak are sampled differently; they agree to within a little.
    current, peak = rss_mb(), peak_rss_mb()
    assert 1 < current < 1e6 and peak > 0.9 * current


def test_speedup_ceiling_is_trls_time_over_alignflows_flops_at_the_matmul_peak():
    row = {"trl": {"iteration_seconds_median": 20.0}, "alignflow": {"gflop_per_iteration": 2000.0}}
    # 2000 GFLOP at 200 GFLOP/s take 10 s at best: at most 2x TRL's 20 s
    assert ppo_vs_trl.speedup_ceiling(row, peak_flops=200e9) == pytest.approx(2.0)


def test_render_rebuilds_the_tables_and_snippet_of_a_results_file(tmp_path):
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ppo_vs_trl.json"
    copy = tmp_path / "ppo_vs_trl.json"
    copy.write_text(results.read_text())
    assert ppo_vs_trl.main(["--render", str(copy)]) == 0
    snippet = (tmp_path / "README-snippet.md").read_text()
    report = json.loads(copy.read_text())
    larger = report["throughput"][-1]
    expected = ppo_vs_trl.speedup_ceiling(larger, report["matmul"]["peak_flops"])
    assert larger["speedup_ceiling"] == pytest.approx(expected)
    assert f"(ceiling {expected:.2f}x)" in snippet and "| ceiling |" in snippet
    assert snippet.startswith("## Performance") and report["command"] in snippet


def test_the_critic_studys_frozen_critic_trains_its_head_and_leaves_the_backbone(tiny_lm_dir, tiny_reward_dir):
    from support import word_share
    from transformers import AutoModelForSequenceClassification

    from benchmarks.critic_study import ResidualMLPHead, frozen_critic
    from components.config import GenerationConfig, RLConfig
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.rl import Trainer

    critic = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir, num_labels=1)
    trainer = Trainer(
        load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"),
        RLConfig(learning_rate=1e-3, rollout_batch_size=8, mini_batch_size=4, update_epochs=1), GenerationConfig(max_new_tokens=4),
        critic=critic, critic_type="separate",
    )
    frozen_critic(trainer, depth=1)
    assert isinstance(trainer.critic.value_head, ResidualMLPHead)
    backbone = {k: v.clone() for k, v in trainer.critic.backbone.state_dict().items()}
    head = [p.detach().clone() for p in trainer.critic.value_head.mlp.parameters()]
    trainer.run_iteration(["the film was", "it was a"] * 4)
    assert all(torch.equal(backbone[k], v) for k, v in trainer.critic.backbone.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(head, trainer.critic.value_head.mlp.parameters()))
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-3, 1e-2]
