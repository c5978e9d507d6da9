"""A configuration is parsed and validated once per command, then handed on as it is: to its flow (a parameter the
Prefect server records redacted) and to the launched processes (one JSON document, read back by the schema alone)."""

import json

import pytest
from prefect import flow

from components.config import ConfigError, RewardRunConfig, RunConfig, Validated, from_document, load_config, to_document
from components.config.document import from_document as read_document

TOKEN = "p4ss-in-the-url"


def test_the_document_reads_back_as_the_validated_configuration_without_its_secrets():
    config = load_config(overrides=["rl.advantage_estimator=grpo", "rl.samples_per_prompt=4", "rl.rollout_batch_size=16",
                                    "critic.type=none", f"data.source=https://user:{TOKEN}@host/p.jsonl"])
    document = to_document(config)
    assert TOKEN not in document and json.loads(document)["data"]["source"] == "https://***@host/p.jsonl"
    read = from_document(document)
    assert read.model_dump(exclude={"data"}) == config.model_dump(exclude={"data"})
    reward = load_config(schema=RewardRunConfig)
    assert read_document(to_document(reward), RewardRunConfig) == reward


def test_the_document_is_validated_by_the_schema_and_nothing_else():
    tree = json.loads(to_document(load_config()))
    tree["rl"]["rollout_batch_size"] = 60  # no longer a multiple of rl.mini_batch_size
    with pytest.raises(ConfigError, match=r"rl.rollout_batch_size x rl.samples_per_prompt \(60 x 1 episodes\)"):
        from_document(json.dumps(tree))
    tree = json.loads(to_document(load_config()))
    tree["ppo"] = {"batch_size": 8}  # a renamed key is load_config's business, not the document's
    with pytest.raises(ConfigError, match="ppo: unknown key"):
        from_document(json.dumps(tree))


def test_a_flow_gets_the_object_and_prefect_records_it_redacted():
    config = load_config(overrides=[f"data.source=https://user:{TOKEN}@host/p.jsonl"])

    @flow
    def takes(validated: Validated | None = None) -> RunConfig:
        return validated.config

    handed = Validated(config)
    assert takes.validate_parameters({"validated": handed})["validated"] is handed
    recorded = takes.serialize_parameters({"validated": handed})["validated"]
    assert recorded["data"]["source"] == "https://***@host/p.jsonl" and TOKEN not in json.dumps(recorded)
    assert recorded["rl"] == config.rl.model_dump(mode="json")
    assert TOKEN not in repr(handed)
