"""Keeping secrets out of what a run records: MLflow params and `config.yaml`, Prefect parameters, logs.

Two kinds of secret can reach a run configuration:

* credentials in a URL, `http://user:password@host:5000`. For `tracking.tracking_uri` they are moved, when the
  configuration is loaded, into MLflow's own variables `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` of
  this process, and the configuration keeps the URI without them; in any other value they are redacted from the
  records (`https://***@host/...`).
* a value whose key names a secret (`token`, `password`, `secret`, `api_key`, `credential`, as a word of the key's
  last part: `labelstudio.api_token`, not `generation.max_new_tokens`). It is read from the environment variable
  `ALIGNFLOW_<SECTION>_<KEY>` (`ALIGNFLOW_LABELSTUDIO_API_TOKEN`) when the configuration leaves it unset, and
  recorded as `***`.

A secret written in a configuration file or a `--set` warns (`PlaintextSecretWarning`) naming the variable to use
instead. `--set` overrides travel as Prefect flow-run parameters, which the Prefect server stores and shows:
`scrub_overrides` takes the secrets out of them (see `flows/cli.py` for what each command does with them).
Log records of this process pass through a filter that redacts URL credentials and every secret value seen here,
and so does every exception a Prefect task or flow of this process raises, in place, before Prefect turns it into a
state message, an event or a stored result (`install_prefect_redaction`).
Nothing in this module imports the rest of alignflow.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any, get_args
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml

REDACTED = "***"
TRACKING_URI_KEY = "tracking.tracking_uri"
MLFLOW_USERNAME_VAR = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"

_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials"}
# scheme://userinfo@ : the userinfo of any URL in a text. It ends at the last '@' before the host, as a URL parser
# reads it (`http://user:p@ss@host`: the password is `p@ss`), and holds no '/', '?', '#', whitespace or quotes.
# `scheme:/user:password@` too: a URL read as a path (`Path("https://u:p@h/x")` is `https:/u:p@h/x`); with one slash
# only when a ':' comes before the '@', so that `models:/name@alias` is left alone.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*:(?://|/(?=[^/?#\s'\"<>@]*:)))(?P<userinfo>[^/?#\s'\"<>]+)@")
_known_secrets: set[str] = set()


class PlaintextSecretWarning(UserWarning):
    """A configuration holds a secret in plain text; the message names the environment variable to use instead."""


class SecretInParameters(ValueError):
    """A `--set` override holds a secret that must not become a Prefect parameter; the message names the key."""


# --- what is a secret -------------------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    """Whether a config key (`section.key`) names a secret: a word of its last part is token, password, secret,
    api_key, apikey or credential(s)."""
    words = re.split(r"[_\-]+", key.rsplit(".", 1)[-1].lower())
    return bool(_SECRET_WORDS.intersection(words)) or any(a == "api" and b == "key" for a, b in zip(words, words[1:]))


def env_var_for(key: str) -> str:
    """The environment variable that holds the secret config value `key` (`labelstudio.api_token` ->
    `ALIGNFLOW_LABELSTUDIO_API_TOKEN`)."""
    return "ALIGNFLOW_" + re.sub(r"[^A-Za-z0-9]+", "_", key).upper()


def has_uri_credentials(value: Any) -> bool:
    return isinstance(value, str) and _URL_USERINFO.search(value) is not None


def split_uri_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without user and password, user, password); user and password are None when absent."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, unquote(parts.username) if parts.username else None, unquote(parts.password) if parts.password else None


def _passwords_of(text: str | None) -> tuple[str, ...]:
    """The password of the first URL in `text` with credentials, as written and percent-decoded (either may appear in
    a message); () when there is none."""
    match = _URL_USERINFO.search(text or "")
    userinfo = match["userinfo"] if match else ""
    if ":" not in userinfo:
        return ()
    written = userinfo.split(":", 1)[1]
    return (written, unquote(written))


# --- redaction ---------------------------------------------------------------------------------------


def remember(*values: str | None) -> None:
    """Secret values this process holds: redacted wherever they appear in a log record or `redact_text`."""
    for value in values:
        if value and len(value) >= 4:  # a shorter one would redact ordinary words
            _known_secrets.add(value)


def redact_uri(uri: str) -> str:
    """A URI (or any text) with the credentials of its URLs replaced, `scheme://***@host`, fit to print: the one way a
    tracking URI is shown. A password may hold '@' (`http://user:p@ss@host`): the userinfo ends at the last '@'."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", uri)


def redact_text(text: str) -> str:
    """`text` with URL credentials (`scheme://***@host`) and every remembered secret value replaced."""
    text = redact_uri(text)
    for secret in sorted(_known_secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _redacted_value(value: Any) -> Any:
    """A text (or a list or tuple holding texts) redacted; None when there is nothing to change."""
    if isinstance(value, str):
        redacted = redact_text(value)
        return redacted if redacted != value else None
    if type(value) in (list, tuple):
        redacted = [_redacted_value(item) for item in value]
        if any(item is not None for item in redacted):
            return type(value)(old if new is None else new for old, new in zip(value, redacted))
    return None


_EXCEPTION_TEXT_ATTRIBUTES = ("filename", "filename2", "strerror", "msg")  # OSError's and SyntaxError's, not in __dict__


def redact_exception(exc: BaseException | None) -> None:
    """Redact, in place, the text of `exc` and of the exceptions it was raised from or while handling: its args, its
    string attributes (OSError's filename, a subprocess error's cmd) and notes. The same object goes on being raised,
    so its type and whatever catches it stay as they were; only its words change."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        for name in ("args", *getattr(exc, "__dict__", {}), *_EXCEPTION_TEXT_ATTRIBUTES):
            try:
                redacted = _redacted_value(getattr(exc, name, None))
                if redacted is not None:
                    setattr(exc, name, redacted)
            except Exception:  # noqa: BLE001 - an attribute that cannot be read or set keeps its value
                pass
        pending += [exc.__cause__, exc.__context__]


def redact_tree(tree: Any, prefix: str = "") -> Any:
    """A copy of a configuration tree (nested dicts) fit for a record: secret keys' values as `***`, URL
    credentials and remembered secrets redacted in every string."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if not isinstance(value, dict) and is_secret_key(name) and value not in (None, ""):
                out[key] = REDACTED
            else:
                out[key] = redact_tree(value, name + ".")
        return out
    if isinstance(tree, list):
        return [redact_tree(item, prefix) for item in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def redacted_yaml(config) -> str:
    """A pydantic run configuration as YAML, redacted (what `config.yaml` and other records hold)."""
    return yaml.safe_dump(redact_tree(config.model_dump(mode="json")), sort_keys=False)


def redacted_params(flat: dict[str, Any]) -> dict[str, Any]:
    """`section.key -> value` params, redacted."""
    return {key: (REDACTED if is_secret_key(key) and value not in (None, "") else redact_tree(value, key))
            for key, value in flat.items()}


class RedactingFilter(logging.Filter):
    """Rewrites a log record's message (and its formatted traceback) through `redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left to its handler
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Put a `RedactingFilter` on every handler of the root logger and of the Prefect, MLflow and alignflow
    loggers that exist now (Prefect's API log handler among them); idempotent."""
    loggers = [logging.getLogger()] + [
        logger for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and name.split(".")[0] in ("prefect", "mlflow", "alignflow", "flows", "components")
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


# Prefect's run engines: each `handle_*` method that takes the exception a task or flow raised (handle_exception,
# handle_retry, handle_timeout, handle_crash, handle_cancellation) runs before anything is made of it: the state
# message (`DataError: ...`), the state-change events that repeat it, the "failed" log record, the result record that
# stores the exception.
_PREFECT_ENGINES = {"prefect.task_engine": ("SyncTaskRunEngine", "AsyncTaskRunEngine"),
                    "prefect.flow_engine": ("FlowRunEngine", "AsyncFlowRunEngine")}


def _redacting(method):
    def redact_arguments(args, kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, BaseException):
                redact_exception(value)

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            redact_arguments(args, kwargs)
            return await method(self, *args, **kwargs)
    else:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            redact_arguments(args, kwargs)
            return method(self, *args, **kwargs)
    wrapper.alignflow_redacts = True
    return wrapper


def install_prefect_redaction() -> list[str]:
    """Make Prefect's task and flow run engines redact (`redact_exception`) every exception a task or flow raises
    before they record it: nothing of a secret reaches the Prefect server's state messages and events, its logs (the
    log filter) or the stored result; the caller gets the same exception, redacted. Done in a process that uses
    Prefect (a flow's own `load_config` calls this through `externalize`, so a flow always has it; a process without
    Prefect is not made to import it); idempotent. Returns the methods wrapped (`Class.method`)."""
    if "prefect" not in sys.modules:
        return []
    wrapped = []
    for module_name, class_names in _PREFECT_ENGINES.items():
        module = importlib.import_module(module_name)  # the task engine is imported by a flow's first task: too late
        for class_name in class_names:
            engine = getattr(module, class_name, None)
            for name, method in list(vars(engine).items()) if engine is not None else ():
                if name.startswith("handle_") and name not in ("handle_success", "handle_rollback") and callable(method):
                    if not getattr(method, "alignflow_redacts", False):
                        setattr(engine, name, _redacting(method))
                    wrapped.append(f"{class_name}.{name}")
    return wrapped


# --- loading a configuration -------------------------------------------------------------------------


def _walk(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1], tree


def secret_fields(model: type, prefix: str = "") -> list[str]:
    """The `section.key` of every field of a pydantic model (recursively) whose name names a secret."""
    found = []
    for name, field in model.model_fields.items():
        nested = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and hasattr(t, "model_fields")]
        if nested:
            found += secret_fields(nested[0], f"{prefix}{name}.")
        elif is_secret_key(name):
            found.append(f"{prefix}{name}")
    return found


def prepare_tree(tree: dict[str, Any], model: type) -> None:
    """Before validation: warn about secrets written in the configuration (naming the variable to use instead), and
    fill unset secret fields of `model` from their `ALIGNFLOW_*` environment variables."""
    for key, value in _walk(tree):
        if is_secret_key(key) and isinstance(value, str):
            remember(value)
        elif has_uri_credentials(value):
            remember(*_passwords_of(value))
        if key == TRACKING_URI_KEY and has_uri_credentials(value):
            warnings.warn(
                f"{key} holds credentials in plain text; they are kept out of the run's records and used from "
                f"{MLFLOW_USERNAME_VAR} / {MLFLOW_PASSWORD_VAR}: set those in the environment instead and give the URI "
                "without them", PlaintextSecretWarning, stacklevel=3)
        elif is_secret_key(key) and value not in (None, "", REDACTED):
            warnings.warn(f"{key} holds a secret in plain text; it is recorded as {REDACTED}: set {env_var_for(key)} "
                          "in the environment instead", PlaintextSecretWarning, stacklevel=3)
        elif has_uri_credentials(value):
            warnings.warn(f"{key} holds credentials in a URL; they are redacted from the run's records: give them to "
                          "the tool that reads the URL through its environment instead", PlaintextSecretWarning, stacklevel=3)
    for key in secret_fields(model):
        value = os.environ.get(env_var_for(key))
        if not value:
            continue
        *sections, name = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(name) in (None, ""):
            node[name] = value


def externalize(config):
    """After validation: move `tracking.tracking_uri`'s credentials into `MLFLOW_TRACKING_USERNAME` /
    `MLFLOW_TRACKING_PASSWORD` of this process (MLflow reads them there) and return the configuration with the
    URI without them; remember every secret value (the password of `$MLFLOW_TRACKING_URI` too) for redaction, and
    install it: on log records, and on the exceptions Prefect's engines record."""
    tracking = getattr(config, "tracking", None)
    uri = getattr(tracking, "tracking_uri", None)
    if uri and has_uri_credentials(uri):
        clean, user, password = split_uri_credentials(uri)
        if user is not None:
            os.environ[MLFLOW_USERNAME_VAR] = user
        if password is not None:
            os.environ[MLFLOW_PASSWORD_VAR] = password
        remember(password)
        config = config.model_copy(update={"tracking": tracking.model_copy(update={"tracking_uri": clean})})
    for key, value in _walk(config.model_dump(mode="json")):
        if is_secret_key(key) and isinstance(value, str):
            remember(value)
        elif has_uri_credentials(value):
            remember(*_passwords_of(value))
    remember(os.environ.get(MLFLOW_PASSWORD_VAR), *_passwords_of(os.environ.get("MLFLOW_TRACKING_URI")))
    install_log_redaction()
    install_prefect_redaction()
    return config


# --- --set overrides that become Prefect parameters --------------------------------------------------


def scrub_overrides(overrides: Iterable[str], refuse: bool = False) -> tuple[list[str], dict[str, str]]:
    """`--set key=value` overrides without their secrets, and the environment variables that carry them instead.

    `tracking.tracking_uri` with credentials stays, without them, and its user and password go to
    `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`; a secret key's override goes to `ALIGNFLOW_<KEY>`.
    Credentials in any other URL raise `SecretInParameters` (nothing here could carry them), and so does any secret
    with `refuse` (the flow runs elsewhere, on a worker, whose environment this process cannot set)."""
    clean: list[str] = []
    moved: dict[str, str] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if sep and raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if refuse and (is_secret_key(key) and value not in (None, "") or key == TRACKING_URI_KEY and has_uri_credentials(value)):
            names = (f"{MLFLOW_USERNAME_VAR} and {MLFLOW_PASSWORD_VAR}" if key == TRACKING_URI_KEY else env_var_for(key))
            what = "holds credentials" if key == TRACKING_URI_KEY else "is a secret"
            raise SecretInParameters(
                f"--set {key} {what}, which would be stored with the run's parameters on the Prefect server and shown in "
                f"its UI; the worker that runs the flow reads {names} from its own environment (infra/local-stack, "
                f"infra/docker-compose.yml): set them there" + (" and give the URI without credentials" if key == TRACKING_URI_KEY else ""))
        if key == TRACKING_URI_KEY and has_uri_credentials(value):
            uri, user, password = split_uri_credentials(str(value))
            moved.update({k: v for k, v in ((MLFLOW_USERNAME_VAR, user), (MLFLOW_PASSWORD_VAR, password)) if v is not None})
            clean.append(f"{key}={uri}")
        elif is_secret_key(key) and value not in (None, ""):
            moved[env_var_for(key)] = str(value)
        elif has_uri_credentials(raw):
            raise SecretInParameters(
                f"--set {key}: the URL holds credentials, which would be stored with the run's parameters on the "
                "Prefect server; give them to the tool that reads the URL through its environment instead")
        else:
            clean.append(override)
    return clean, moved


def describe_moved(moved: dict[str, str]) -> str:
    """The variables of `scrub_overrides`' second result, named for a message (never their values)."""
    return ", ".join(sorted(moved))
