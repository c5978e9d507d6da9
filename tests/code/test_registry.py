"""The registry: one version per run with all its tags, promotions that complete, and a rollback chain."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.models import uris

from components.tracking import registry, runs as tracking
from components.config import TrackingConfig
from components.tracking.registry import PromotionError

MODEL = "tiny-policy"


def register(tiny_lm_dir, gates_passed, **tags) -> str:
    """A run that logs the tiny policy and registers it, as the pipeline does; returns the version."""
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(TrackingConfig(experiment="tests"))) as run:
        uri = registry.log_policy(tiny_lm_dir, model_config={"max_new_tokens": 5})
        if gates_passed in (True, False):  # what the pipeline's gates task records on the run
            mlflow.log_metric(registry.GATES_METRIC, float(gates_passed))
        version = registry.register(MODEL, run.info.run_id, uri, {registry.GATES_TAG: gates_passed, **tags})
    return str(version.version)


def test_a_run_registers_one_version_whose_tags_come_with_it(config, tiny_lm_dir):
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(config.tracking)) as run:
        uri = registry.log_policy(tiny_lm_dir)
        assert registry.log_policy(tiny_lm_dir) == uri  # a resumed run reuses what it logged
        first = registry.register(MODEL, run.info.run_id, uri, {registry.GATES_TAG: True, "alignflow.data_md5": "abc"})
        again = registry.register(MODEL, run.info.run_id, uri, {registry.GATES_TAG: True, "alignflow.data_md5": "abc", "late": 1})
    assert str(first.version) == str(again.version) == "1"
    assert first.tags == {"alignflow.gates_passed": "true", "alignflow.data_md5": "abc"}
    assert again.tags["late"] == "1"
    assert [v.version for v in registry.list_versions(MODEL)] == [1]
    assert registry.version_of_run(MODEL, "no-such-run") is None


def test_registered_champion_generates_text(config, tiny_lm_dir):
    version = register(tiny_lm_dir, gates_passed=True)
    assert registry.get_champion(MODEL) is None
    assert registry.promote(MODEL, version, user="ci", reason="first model") == (True, "version 1 is now champion")
    promoted = registry.get_champion(MODEL)
    assert (promoted.tags["promoted_by"], promoted.tags["promotion_reason"], promoted.tags["forced"]) == ("ci", "first model", "false")
    assert "previous_champion" not in promoted.tags and registry.pending_move(MODEL) is None
    assert registry.promote(MODEL, version) == (False, "version 1 is already champion")

    output = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(["The film was"])
    assert isinstance(output[0], str) and output[0].startswith("The film was")


def test_a_version_whose_gates_failed_needs_force_and_a_reason(config, tiny_lm_dir):
    good = register(tiny_lm_dir, gates_passed=True)
    bad = register(tiny_lm_dir, gates_passed=False)
    unknown = register(tiny_lm_dir, gates_passed="unknown")
    registry.promote(MODEL, good)

    with pytest.raises(PromotionError, match="has no version 9: its versions are 1, 2, 3"):
        registry.promote(MODEL, 9)
    with pytest.raises(PromotionError, match=r"promotion gates failed. To promote it anyway, force it with a reason"):
        registry.promote(MODEL, bad)
    with pytest.raises(PromotionError, match="no gate result"):
        registry.promote(MODEL, unknown)
    with pytest.raises(PromotionError, match="needs a reason"):
        registry.promote(MODEL, bad, force=True)
    assert str(registry.get_champion(MODEL).version) == good

    registry.promote(MODEL, bad, force=True, reason="KL gate too strict for this data", user="alice")
    forced = registry.get_champion(MODEL)
    assert str(forced.version) == bad
    assert (forced.tags["forced"], forced.tags["promoted_by"]) == ("true", "alice")
    assert forced.tags["promotion_reason"] == "KL gate too strict for this data"
    assert forced.tags["previous_champion"] == good


def test_compare_and_set_keeps_a_better_champion_that_arrived_meanwhile(config, tiny_lm_dir):
    first = register(tiny_lm_dir, gates_passed=True, eval_mean_score=1.0)
    second = register(tiny_lm_dir, gates_passed=True, eval_mean_score=2.0)
    registry.promote(MODEL, second)  # arrived while `first` was being evaluated against no champion
    moved, why = registry.promote(MODEL, first, evaluated_against=None, score=1.0)
    assert not moved and "became champion meanwhile with score 2" in why
    assert str(registry.get_champion(MODEL).version) == second
    moved, _ = registry.promote(MODEL, first, evaluated_against=second, score=1.0)  # its gates saw `second`
    assert moved and registry.get_champion(MODEL).tags["previous_champion"] == second


def test_an_alias_move_cut_before_its_tags_is_completed_by_the_next_call(config, tiny_lm_dir):
    first, second = register(tiny_lm_dir, gates_passed=True), register(tiny_lm_dir, gates_passed=True)
    registry.promote(MODEL, first)
    client = MlflowClient()
    # the state a kill leaves between the alias move and its tags (tests/flows/test_registry_crash_points.py kills for real)
    move = {"number": 2, "action": "promote", "version": second, "from": first, "by": "pipeline", "at": "t",
            "reason": "all gates passed", "forced": False}
    client.set_registered_model_tag(MODEL, registry.pending_tag("champion"), json.dumps(move))
    client.set_registered_model_alias(MODEL, "champion", second)

    moved, why = registry.promote(MODEL, second, evaluated_against=first, score=1.0)
    assert moved and "interrupted promotion, promote 1 -> 2 by pipeline at t, completed" in why
    tags = registry.get_champion(MODEL).tags
    assert tags["previous_champion"] == first and tags["promoted_by"] == "pipeline" and registry.pending_move(MODEL) is None
    assert [(m["action"], m["from"], m["version"]) for m in registry.history(MODEL)] == [("promote", "", first),
                                                                                         ("promote", first, second)]


def test_rollback_walks_the_history_back_one_champion_at_a_time(config, tiny_lm_dir):
    versions = [register(tiny_lm_dir, gates_passed=True) for _ in range(3)]
    with pytest.raises(PromotionError, match="no champion to roll back"):
        registry.rollback(MODEL)
    for version in versions:
        registry.promote(MODEL, version)
    assert [(v.version, v.aliases) for v in registry.list_versions(MODEL)] == [(3, ["champion"]), (2, []), (1, [])]

    restored = registry.rollback(MODEL, user="bob", reason="regression in prod")
    assert str(restored.version) == "2" == str(registry.get_champion(MODEL).version)
    assert restored.tags["rolled_back_from"] == "3" and restored.tags["rolled_back_by"] == "bob"
    assert str(registry.rollback(MODEL).version) == "1"
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback(MODEL)
    assert registry.list_versions("no-such-model") == []


def test_rollback_never_loops_after_a_version_is_promoted_twice(config, tiny_lm_dir):
    """promote 1, 2, 3, 2; rollback x4 walks 3, 2, 1 and then refuses: the history is a stack of champions, not a
    pointer per version (which walked 3, 2, 3, 2 and lost version 1)."""
    v1, v2, v3 = (register(tiny_lm_dir, gates_passed=True) for _ in range(3))
    for version in (v1, v2, v3, v2):
        registry.promote(MODEL, version)
    walked = [str(registry.rollback(MODEL).version) for _ in range(3)]
    assert walked == [v3, v2, v1] and str(registry.get_champion(MODEL).version) == v1
    with pytest.raises(PromotionError, match="the first champion alignflow's history has: nothing to roll back to"):
        registry.rollback(MODEL)
    moves = [(m["number"], m["action"], m["from"], m["version"]) for m in registry.history(MODEL)]
    assert moves == [(1, "promote", "", v1), (2, "promote", v1, v2), (3, "promote", v2, v3), (4, "promote", v3, v2),
                     (5, "rollback", v2, v3), (6, "rollback", v3, v2), (7, "rollback", v2, v1)]


def test_a_pending_move_is_completed_by_any_registry_command_which_then_refuses_naming_it(config, tiny_lm_dir):
    v1, v2, v3 = (register(tiny_lm_dir, gates_passed=True) for _ in range(3))
    registry.promote(MODEL, v1)
    registry.promote(MODEL, v2)
    client = MlflowClient()
    # a promotion of v3 killed after its intent, before the alias moved
    move = {"number": 3, "action": "promote", "version": v3, "from": v2, "by": "carol", "at": "t", "reason": "r",
            "forced": False}
    client.set_registered_model_tag(MODEL, registry.pending_tag("champion"), json.dumps(move))
    with pytest.raises(PromotionError, match=r"pending \(promote 2 -> 3 by carol at t\): it is completed now, and "
                                             r"@champion is on version 3. Nothing was rolled back"):
        registry.rollback(MODEL)
    assert str(registry.get_champion(MODEL).version) == v3 and registry.pending_move(MODEL) is None
    assert registry.get_champion(MODEL).tags["promoted_by"] == "carol"
    # a rollback killed after the alias moved: running rollback again completes it and goes no further
    move = {"number": 4, "action": "rollback", "version": v2, "from": v3, "by": "dave", "at": "t2", "reason": "",
            "forced": False}
    client.set_registered_model_tag(MODEL, registry.pending_tag("champion"), json.dumps(move))
    client.set_registered_model_alias(MODEL, "champion", v2)
    assert str(registry.rollback(MODEL).version) == v2 == str(registry.get_champion(MODEL).version)
    assert client.get_model_version(MODEL, v3).tags["rolled_back_from_champion"] == "t2 by dave"
    assert [m["number"] for m in registry.history(MODEL)] == [1, 2, 3, 4]
    assert str(registry.rollback(MODEL).version) == v1  # the next rollback goes one further


def test_a_version_an_earlier_release_tagged_without_the_namespace_still_reads(config, tiny_lm_dir):
    """Versions registered before a run and its version shared one tag name (`gates_passed`, `data_md5`, ... on the
    version beside `alignflow.*` on the run) still list, give their lineage and promote."""
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(TrackingConfig(experiment="tests"))) as run:
        uri = registry.log_policy(tiny_lm_dir, model_config={"max_new_tokens": 5})
        mlflow.log_metric(registry.GATES_METRIC, 1.0)
        old = registry.register(MODEL, run.info.run_id, uri, {"gates_passed": True, "data_md5": "abc", "data_name": "reviews",
                                                              "mlflow_run_id": run.info.run_id, "algorithm": "rloo"})
    [listed] = registry.list_versions(MODEL)
    assert (listed.tags["alignflow.gates_passed"], listed.tags["alignflow.data_md5"], listed.tags["alignflow.algorithm"]) == (
        "true", "abc", "rloo")
    assert registry.lineage(f"models:/{MODEL}/{old.version}", "reward") == {
        "alignflow.reward_model_name": MODEL, "alignflow.reward_model_version": "1", "alignflow.reward_data_md5": "abc",
        "alignflow.reward_data_name": "reviews", "alignflow.reward_model_run_id": run.info.run_id}
    assert registry.promote(MODEL, old.version) == (True, "version 1 is now champion")


def test_a_gates_passed_tag_set_by_hand_does_not_promote(config, tiny_lm_dir):
    failed = register(tiny_lm_dir, gates_passed=False)
    MlflowClient().set_model_version_tag(MODEL, failed, registry.GATES_TAG, "true")  # a promoter forging the result
    with pytest.raises(PromotionError, match=r"its alignflow\.gates_passed tag says true but its run .* recorded gate/passed=0: "
                                             "the tag was changed after the pipeline wrote it"):
        registry.promote(MODEL, failed)
    unchecked = register(tiny_lm_dir, gates_passed="true")  # a version whose run recorded no gate result at all
    with pytest.raises(PromotionError, match="recorded no gate result"):
        registry.promote(MODEL, unchecked)
    assert registry.get_champion(MODEL) is None


def test_promoted_by_names_the_mlflow_account(config, tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "erin")
    registry.promote(MODEL, register(tiny_lm_dir, gates_passed=True))
    assert registry.get_champion(MODEL).tags["promoted_by"] == "erin"
    assert registry.history(MODEL)[0]["by"] == "erin"


def test_registry_reference_resolves_to_a_loadable_directory(config, tiny_lm_dir, tmp_path):
    registry.promote(MODEL, register(tiny_lm_dir, gates_passed=True))
    cache = tmp_path / "registry"

    path = uris.resolve_model_uri(f"models:/{MODEL}@champion", cache_dir=cache)
    assert Path(path).parent == cache and Path(path).name.startswith(f"{MODEL}-v1-")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("the film was good")["input_ids"] == AutoTokenizer.from_pretrained(tiny_lm_dir)("the film was good")["input_ids"]
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), original.state_dict().values()))

    assert uris.resolve_model_uri(f"models:/{MODEL}/1", cache_dir=cache) == path  # cached per version
    assert uris.resolve_model_uri("gpt2") == "gpt2"
    assert uris.pin_model_uri(f"models:/{MODEL}@champion") == f"models:/{MODEL}/1"
    with pytest.raises(uris.ModelURIError, match="cannot resolve"):
        uris.resolve_model_uri(f"models:/{MODEL}@staging", cache_dir=cache)


def test_same_version_number_in_another_registry_is_not_served_from_the_cache(config, tiny_lm_dir, tmp_path, empty_store):
    import shutil

    from support import save_tiny_lm

    cache = tmp_path / "registry"
    register(tiny_lm_dir, gates_passed=True)
    first = uris.resolve_model_uri(f"models:/{MODEL}/1", cache_dir=cache)

    other_model = save_tiny_lm(tmp_path / "other-lm", seed=7)
    other_store = tmp_path / "other"
    other_store.mkdir()
    shutil.copy(empty_store, other_store / "mlflow.db")
    tracking.use_tracking(TrackingConfig(tracking_uri=f"sqlite:///{other_store}/mlflow.db", experiment="tests"))
    register(other_model, gates_passed=True)
    second = uris.resolve_model_uri(f"models:/{MODEL}/1", cache_dir=cache)

    assert first != second
    loaded = AutoModelForCausalLM.from_pretrained(second).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(other_model).state_dict()
    assert all((loaded[k] == expected[k]).all() for k in expected)


def move(number, action, source, version):
    return {"number": number, "action": action, "from": source, "version": version}


def test_the_champion_stack_starts_where_a_move_started_when_that_was_not_the_top():
    assert registry.champion_stack([move(1, "promote", "", "1"), move(2, "promote", "1", "2"),
                                    move(3, "rollback", "2", "1")]) == ["1"]
    # a registry whose history began with a rollback (champions from before the history), then a promotion
    assert registry.champion_stack([move(1, "rollback", "3", "2"), move(2, "promote", "2", "5")]) == ["2", "5"]
    # the alias moved to 5 outside alignflow, then the pipeline promoted 6 from 5: a rollback returns to 5
    assert registry.champion_stack([move(1, "promote", "", "1"), move(2, "promote", "1", "2"),
                                    move(3, "promote", "5", "6")]) == ["1", "2", "5", "6"]


def test_a_rollback_below_the_history_follows_the_previous_champion_tag_of_before(config, tiny_lm_dir):
    v1, v2, v3 = (register(tiny_lm_dir, gates_passed=True) for _ in range(3))
    client = MlflowClient()
    # a registry from before the history: v2 champion, its previous_champion v1, set by the old code
    client.set_registered_model_alias(MODEL, "champion", v2)
    client.set_model_version_tag(MODEL, v2, "previous_champion", v1)
    registry.promote(MODEL, v3)
    assert [str(registry.rollback(MODEL).version) for _ in range(2)] == [v2, v1]
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback(MODEL)


def test_a_pipeline_resumed_after_its_version_was_rolled_back_does_not_promote_it_again(config, tiny_lm_dir):
    v1, v2 = (register(tiny_lm_dir, gates_passed=True) for _ in range(2))
    registry.promote(MODEL, v1)
    assert registry.promote(MODEL, v2, evaluated_against=v1, score=1.0)[0]  # the pipeline's promotion
    registry.rollback(MODEL, user="ops", reason="bad in production")
    moved, why = registry.promote(MODEL, v2, evaluated_against=v1, score=1.0)  # its resume, before it had settled
    assert not moved and f"version {v2} was rolled back" in why and str(registry.get_champion(MODEL).version) == v1
    assert registry.promote(MODEL, v2, user="ops")[0]  # a person may
