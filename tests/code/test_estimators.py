"""An algorithm is one entry of one registry (components/config/estimators.py): the configuration's choices and
checks, the engine's advantage and the README's algorithm table all read it."""

import re
import typing

import pytest
import torch

from components.config import ESTIMATORS, PROJECT_ROOT, ConfigError, RLConfig, RunConfig, load_config
from components.config.estimators import markdown_table
from components.rl.core import group_advantages


def test_the_readmes_algorithm_table_is_the_registrys():
    readme = (PROJECT_ROOT / "README.md").read_text()
    start = readme.index("| `rl.advantage_estimator` |")
    table = readme[start:readme.index("\n\n", start)]
    assert table == markdown_table(), "the README's algorithm table differs from components/config/estimators.py"
    names = re.findall(r"^\| `(\w+)`", table, re.M)
    assert names == list(ESTIMATORS)


def test_the_configuration_takes_its_choices_and_defaults_from_the_registry():
    assert typing.get_args(RLConfig.model_fields["advantage_estimator"].annotation) == tuple(ESTIMATORS)
    for name, estimator in ESTIMATORS.items():
        k = estimator.min_samples_per_prompt
        rl = RLConfig(advantage_estimator=name, samples_per_prompt=k, rollout_batch_size=16, mini_batch_size=16)
        assert (rl.kl_estimator, rl.kl_placement, rl.loss_aggregation) == (
            estimator.kl_estimator, estimator.kl_placement, estimator.loss_aggregation)
        assert rl.needs_critic == estimator.needs_critic and rl.algorithm == estimator.algorithm
        assert RunConfig(rl=rl).critic.type == ("shared" if estimator.needs_critic else "none")
        if k > 1:
            with pytest.raises(ValueError, match=rf"needs rl.samples_per_prompt >= {k} \(got {k - 1}\)"):
                RLConfig(advantage_estimator=name, samples_per_prompt=k - 1, rollout_batch_size=16, mini_batch_size=16)


def test_the_critic_rule_is_the_registrys_for_the_configuration_and_the_trainer():
    message = ESTIMATORS["grpo"].critic_problem("shared")
    assert message.startswith("rl.advantage_estimator=grpo uses no critic, but critic.type is shared")
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=["rl.advantage_estimator=grpo", "rl.samples_per_prompt=4", "rl.rollout_batch_size=16",
                               "critic.type=shared"])
    assert message in str(refused.value)
    assert ESTIMATORS["gae"].critic_problem("none").startswith("rl.advantage_estimator=gae needs a critic")
    assert all(e.critic_problem("none" if not e.needs_critic else "separate") is None for e in ESTIMATORS.values())


def test_each_group_estimator_is_its_baseline_and_gae_has_none():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    for name, estimator in ESTIMATORS.items():
        if estimator.baseline is None:
            assert estimator.needs_critic
            with pytest.raises(ValueError, match="not a critic-free advantage estimator"):
                group_advantages(scores, 2, name)
        else:
            torch.testing.assert_close(group_advantages(scores, 2, name), estimator.baseline(scores.view(-1, 2)).reshape(-1))
