"""A configuration parsed and validated once per command, then handed on as it is, never parsed again.

    Validated       to a flow that runs in the command's own process: a flow-run parameter holding the object. The
                    Prefect server stores a flow run's parameters and shows them: this one is stored as the
                    configuration redacted (components/security/secrets.py), never with a secret.
    to_document     to the launched training processes and the other machines of a run: the validated configuration as
    from_document   one JSON document without its secrets, read back by the schema alone (none of load_config's YAML,
                    --set, renamed keys or secret variables). The processes need no secret: they load models already
                    located, and neither track nor read the data.

A deployment's flow run (prefect.yaml, `alignflow run --remote`, a schedule) gets a path and `--set` strings as its
parameters instead, and its flow parses them once, at its entry (load_config).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from pydantic import ValidationError

from components.config.common import ConfigError, Section
from components.config.loading import format_errors
from components.config.policy import RunConfig
from components.security import secrets


class Validated:
    """A configuration the command validated (load_config, and on --resume the run's recorded one), handed to its flow.
    As a parameter Prefect records (fastapi's jsonable_encoder reads it as `dict(value)`) it is the redacted tree."""

    __slots__ = ("config",)

    def __init__(self, config: Section):
        self.config = config

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(secrets.redact_tree(self.config.model_dump(mode="json")).items())

    def __repr__(self) -> str:
        return f"Validated({type(self.config).__name__})"


def to_document(config: Section) -> str:
    """The validated configuration as one JSON document, its secrets redacted: what the launched processes and the other
    machines of a run read (a file on disk, a Prefect parameter), without a secret in plain text."""
    return json.dumps(secrets.redact_tree(config.model_dump(mode="json")))


def from_document(text: str, schema: type = RunConfig):
    """The configuration `to_document` wrote, validated by `schema`. A document this version cannot validate (written
    by another version of alignflow, on another machine) is refused naming its keys."""
    try:
        config = schema.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, "the configuration document this process was handed; is every machine "
                                              "on the same version of alignflow?")) from None
    return secrets.externalize(config)  # log and Prefect redaction installed, as load_config does
