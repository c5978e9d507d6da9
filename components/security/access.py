"""Who may do what on a team's MLflow server: the accounts and roles the stack creates, who owns the names the
stages write to, and MLflow's refusals in plain words.

The team stack runs MLflow's basic-auth app with workspaces on (`--enable-workspaces`) and `default_permission =
NO_PERMISSIONS`: an account sees and changes only what a role (or its own creation) grants it, and only an account
with a workspace-wide USE grant may create experiments and registered models (MLflow gives the creator MANAGE on what
it creates; with workspaces off every account may create, and would own, any name not taken yet). The roles, in
MLflow's default workspace:

    alignflow-pipeline  the service account of the pipeline and its workers: USE on the workspace (it alone creates
                        experiments and registered models), EDIT on every experiment and registered model (log runs,
                        register versions, move aliases), MANAGE (owner) on the names the stages write to
    alignflow-reader    READ on every experiment and registered model: runs, metrics, artifacts, models
    alignflow-promoter  READ on everything, EDIT on the registered models it may promote (ALIGNFLOW_REGISTERED_MODELS,
                        default alignflow-policy; `*` for every model): `alignflow promote` / `rollback`

`bootstrap` (run by `infra/local-stack up` and by the compose stack's `mlflow-roles` service) creates the roles, the
service account, and the names the stages write to (STAGE_MODELS, STAGE_EXPERIMENTS, plus ALIGNFLOW_REGISTERED_MODELS /
ALIGNFLOW_EXPERIMENTS), owned by the service account; a name that exists already is given to it only when no other
account could write it (else bootstrap names who could, and leaves it to an admin: `owners`, `adopt`). It is
idempotent. `add-user NAME ROLE` gives a person an account (a random password, printed once, unless
`--password-stdin`) and exactly that alignflow role.

    MLFLOW_TRACKING_URI=... MLFLOW_TRACKING_USERNAME=<admin> MLFLOW_TRACKING_PASSWORD=... \\
        python -m components.security.access bootstrap | add-user NAME reader|promoter|pipeline [--password-stdin]
                                    | owners experiment|registered_model NAME | adopt experiment|registered_model NAME

A stage refuses, before anything is trained or recorded, an experiment or registered model it writes to or reads a
model from that its own account does not own (`check_owned`): another owner could have registered a model trained on
anything and moved its `@champion`. The registry functions of `components.tracking` turn MLflow's 403 into
`RegistryPermissionError`, naming the user and the permission the action needs (`explains_denial`).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import secrets as random_secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException

from components.errors import UserError

WORKSPACE = "default"  # MLflow's workspace when workspaces are off (the stack's setting)
ROLE_PREFIX = "alignflow-"
SERVICE_USER_VAR, SERVICE_PASSWORD_VAR = "ALIGNFLOW_PIPELINE_USER", "ALIGNFLOW_PIPELINE_PASSWORD"
DEFAULT_SERVICE_USER = "alignflow-pipeline"
DEFAULT_MODELS, DEFAULT_EXPERIMENTS = "alignflow-policy", "alignflow-demo"
# The names the stages write to unless configured otherwise: the policy pipeline's (configs/demo.yaml, and the
# library's defaults in components/config/), the reward stage's (configs/reward.yaml: RewardTrackingConfig), and the
# judge's (the reward stage with `tracking.registered_model=judge`, README). The stack creates them all up front.
STAGE_MODELS = ("alignflow-policy", "alignflow-reward", "judge")
STAGE_EXPERIMENTS = ("alignflow", "alignflow-demo", "alignflow-reward")


class RegistryPermissionError(UserError, PermissionError):
    """MLflow refused a registry change (HTTP 403): the message names the user and the permission needed."""


class AccessSetupError(RuntimeError):
    """The roles or accounts could not be set up; the message says what is missing."""


class NotOwnedError(UserError, PermissionError):
    """A stage would write to, or read a model from, an experiment or registered model its account does not own."""


# --- the roles ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    resource_type: str
    pattern: str
    permission: str


def role_grants(models: list[str]) -> dict[str, list[Grant]]:
    """What each alignflow role may do; `models` are the registered models a promoter may promote."""
    read_all = [Grant("experiment", "*", "READ"), Grant("registered_model", "*", "READ")]
    return {
        "pipeline": [Grant("workspace", "*", "USE"), Grant("experiment", "*", "EDIT"), Grant("registered_model", "*", "EDIT")],
        "reader": read_all,
        "promoter": read_all + [Grant("registered_model", m, "EDIT") for m in models if m != "*"]
        + ([Grant("registered_model", "*", "EDIT")] if "*" in models else []),
    }


def _names(variable: str, default: str) -> list[str]:
    return [name.strip() for name in os.environ.get(variable, default).split(",") if name.strip()]


def _client(tracking_uri: str):
    import warnings

    with warnings.catch_warnings():  # importing MLflow's server app warns about Starlette's deprecations
        warnings.simplefilter("ignore")
        from mlflow.server import get_app_client

        return get_app_client("basic-auth", tracking_uri=tracking_uri)


def _is(exc: MlflowException, *codes: str) -> bool:
    return exc.error_code in codes


def ensure_role(client, role: str, grants: list[Grant]):
    """The role `alignflow-<role>` with exactly `grants` (created, or its grants brought in line)."""
    name = ROLE_PREFIX + role
    found = next((r for r in client.list_roles(WORKSPACE) if r.name == name), None)
    if found is None:
        found = client.create_role(WORKSPACE, name, description=f"alignflow {role} (components/security/access.py)")
    present = {(p.resource_type, p.resource_pattern): p for p in client.list_role_permissions(found.id)}
    wanted = {(g.resource_type, g.pattern): g.permission for g in grants}
    for key, permission in wanted.items():
        if key not in present:
            client.add_role_permission(found.id, key[0], key[1], permission)
        elif present[key].permission != permission:
            client.update_role_permission(present[key].id, permission)
    for key, grant in present.items():
        if key not in wanted:
            client.remove_role_permission(grant.id)
    return found


def ensure_user(client, username: str, password: str | None) -> bool:
    """Create `username` (with `password`); an existing one gets `password` if given. True if it was created."""
    try:
        client.get_user(username)
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
        if not password:
            raise AccessSetupError(f"no password for the new MLflow user {username}") from None
        client.create_user(username, password)
        return True
    if password:
        client.update_user_password(username, password)
    return False


def set_role(client, username: str, role: str, models: list[str]) -> None:
    """`username` holds exactly one alignflow role, `role` (other alignflow roles are taken away)."""
    grants = role_grants(models)
    if role not in grants:
        raise AccessSetupError(f"unknown role {role!r}; the roles are {', '.join(grants)}")
    wanted = ensure_role(client, role, grants[role])
    held = client.list_user_roles(username)
    for other in held:
        if other.name.startswith(ROLE_PREFIX) and other.id != wanted.id:
            client.unassign_role(username, other.id)
    if not any(r.id == wanted.id for r in held):
        client.assign_role(username, wanted.id)


def bootstrap(tracking_uri: str) -> str:
    """Roles, the pipeline's service account, and the experiments and registered models the stages write to, owned by
    the service account; run with admin credentials. Returns a summary: one line, and one more for each name that
    another account could write (not given to the service account; see `adopt`)."""
    from mlflow import MlflowClient

    client = _client(tracking_uri)
    models = _names("ALIGNFLOW_REGISTERED_MODELS", DEFAULT_MODELS)
    for role, grants in role_grants(models).items():
        ensure_role(client, role, grants)
    user = os.environ.get(SERVICE_USER_VAR) or DEFAULT_SERVICE_USER
    password = os.environ.get(SERVICE_PASSWORD_VAR)
    if not password:
        raise AccessSetupError(f"set {SERVICE_PASSWORD_VAR}: the password of the pipeline's service account {user}")
    ensure_user(client, user, password)
    set_role(client, user, "pipeline", models)
    registry = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # never a registry MLFLOW_REGISTRY_URI names
    owned_models = list(dict.fromkeys([*STAGE_MODELS, *(m for m in models if m != "*")]))
    owned_experiments = list(dict.fromkeys([*STAGE_EXPERIMENTS, *_names("ALIGNFLOW_EXPERIMENTS", DEFAULT_EXPERIMENTS)]))
    refused = []
    for name in owned_models:
        try:
            registry.create_registered_model(name, description="alignflow; created with the team stack's roles, owned "
                                             "by the pipeline's service account (components/security/access.py)")
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
        refused += _give(client, user, REGISTERED_MODEL, name, name)
    for name in owned_experiments:
        experiment = registry.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else registry.create_experiment(name)
        refused += _give(client, user, EXPERIMENT, experiment_id, name)
    summary = (f"MLflow roles {', '.join(ROLE_PREFIX + r for r in role_grants(models))}; service account {user}, owner "
               f"of the registered models {', '.join(owned_models)} and the experiments {', '.join(owned_experiments)}")
    return "\n".join([summary + (" (but the ones below)" if refused else ""), *refused])


# --- who owns the names the stages write to ------------------------------------------------------------

EXPERIMENT, REGISTERED_MODEL = "experiment", "registered_model"
WRITES = ("EDIT", "MANAGE")


def other_writers(client, resource_type: str, resource_id: str, service_user: str) -> dict[str, str]:
    """Accounts other than `service_user` and the admins that can write the resource through a grant that is not one
    of alignflow's roles (MLflow's grant to whoever created it, or one an owner or admin gave), or through a
    workspace-admin grant: {user: permission}. Needs the admin's view of the users."""
    from mlflow.server.auth.routes import LIST_USERS

    found: dict[str, str] = {}
    for account in client._request(LIST_USERS, "GET")["users"]:
        if account["is_admin"] or account["username"] == service_user:
            continue
        for role in account.get("roles", []):
            if role["name"].startswith(ROLE_PREFIX):
                continue
            for grant in role.get("permissions", []):
                workspace_admin = grant["resource_type"] == "workspace" and grant["permission"] == "MANAGE"
                if workspace_admin or (grant["resource_type"] == resource_type and grant["permission"] in WRITES
                                       and grant["resource_pattern"] in (resource_id, "*")):
                    permission = "MANAGE (workspace admin)" if workspace_admin else grant["permission"]
                    if found.get(account["username"], "").startswith("MANAGE"):
                        continue
                    found[account["username"]] = permission
    return found


def _give(client, user: str, resource_type: str, resource_id: str, name: str) -> list[str]:
    """MANAGE on the resource for the service account, unless another account could write it: then a line saying who."""
    others = other_writers(client, resource_type, resource_id, user)
    if others:
        return [f"not given to {user}: {_label(resource_type, name)} can be written by "
                f"{', '.join(f'{u} ({p})' for u, p in sorted(others.items()))}; the stages refuse it until an admin "
                f"deletes it or runs: python -m components.security.access adopt {resource_type} {name}"]
    _grant_manage(client, user, resource_type, resource_id)
    return []


def _grant_manage(client, user: str, resource_type: str, resource_id: str) -> None:
    """`user`'s own grant on the resource is MANAGE (replacing a lesser one; nothing to do when it is)."""
    try:
        client.grant_user_permission(user, resource_type, resource_id, "MANAGE")
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
            raise
        if client.get_user_permission(user, resource_type, resource_id).permission != "MANAGE":
            client.revoke_user_permission(user, resource_type, resource_id)
            client.grant_user_permission(user, resource_type, resource_id, "MANAGE")


def _label(resource_type: str, name: str) -> str:
    return f"{'registered model' if resource_type == REGISTERED_MODEL else 'experiment'} {name!r}"


def _resource_id(tracking_uri: str, resource_type: str, name: str) -> str:
    """The id MLflow's permissions use: an experiment's id, a registered model's name."""
    if resource_type == REGISTERED_MODEL:
        return name
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
    if experiment is None:
        raise AccessSetupError(f"no experiment {name!r} at {tracking_uri}")
    return experiment.experiment_id


def owners(tracking_uri: str, resource_type: str, name: str) -> str:
    """Who besides the service account can write the experiment or registered model (admin only): one line."""
    user = os.environ.get(SERVICE_USER_VAR) or DEFAULT_SERVICE_USER
    client = _client(tracking_uri)
    resource_id = _resource_id(tracking_uri, resource_type, name)
    others = other_writers(client, resource_type, resource_id, user)
    mine = client.get_user_permission(user, resource_type, resource_id).permission
    return (f"{_label(resource_type, name)}: {user} holds {mine}; "
            + (f"also written by {', '.join(f'{u} ({p})' for u, p in sorted(others.items()))}" if others
               else "no other account can write it (admins aside)"))


def adopt(tracking_uri: str, resource_type: str, name: str) -> str:
    """Take the experiment or registered model from every other account's own grant and give it to the service account
    (admin only; check its runs or versions first: they were written by whoever owned it). One line."""
    user = os.environ.get(SERVICE_USER_VAR) or DEFAULT_SERVICE_USER
    client = _client(tracking_uri)
    resource_id = _resource_id(tracking_uri, resource_type, name)
    taken = []
    for other, permission in other_writers(client, resource_type, resource_id, user).items():
        if permission.startswith("MANAGE (workspace"):
            continue
        try:
            client.revoke_user_permission(other, resource_type, resource_id)
            taken.append(other)
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
    left = other_writers(client, resource_type, resource_id, user)
    if left:
        raise AccessSetupError(f"{_label(resource_type, name)} can still be written by "
                               f"{', '.join(f'{u} ({p})' for u, p in sorted(left.items()))} through roles of their own: "
                               "remove those grants (MLflow's role API), then run adopt again")
    _grant_manage(client, user, resource_type, resource_id)
    return (f"{_label(resource_type, name)}: owned by {user}"
            + (f"; taken from {', '.join(sorted(taken))}" if taken else ""))


def registry_reads(config) -> dict[str, str]:
    """The registered models a configuration loads models from: {config key: model name}, from its `models:/` URIs
    (`reward.model: models:/alignflow-reward@champion` -> {"reward.model": "alignflow-reward"})."""
    found: dict[str, str] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for child, inner in value.items():
                walk(inner, f"{key}.{child}" if key else str(child))
        elif isinstance(value, str) and value.startswith("models:/"):
            name = value.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]
            if name:
                found[key] = name

    walk(config.model_dump(mode="json") if hasattr(config, "model_dump") else config, "")
    return found


def check_owned(tracking_uri: str, experiment: str | None = None, registered_model: str | None = None,
                reads: dict[str, str] | None = None) -> None:
    """Refuse (NotOwnedError, a UserError: exit 2) an experiment or registered model the stage writes to, or a
    registered model it loads a model from (`reads`: {config key: name}, see `registry_reads`), that the current
    MLflow account (MLFLOW_TRACKING_USERNAME) does not own (MANAGE: its creator, or given it by the stack's
    bootstrap). A name that does not exist yet passes: the stage creates it and owns it (on the team stack only the
    service account may create). Does nothing for a local store (SQLite, files) or a server without MLflow's
    basic-auth app, where there are no owners."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return
    from mlflow import MlflowClient

    auth = _client(tracking_uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    registry = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    wanted: list[tuple[str, str, str, str]] = []  # (resource type, id, name, what the stage does with it)
    try:
        if experiment:
            found = registry.get_experiment_by_name(experiment)
            if found is not None:
                wanted.append((EXPERIMENT, found.experiment_id, experiment, "records its runs in"))
        if registered_model:
            wanted.append((REGISTERED_MODEL, registered_model, registered_model, "registers its models in"))
        for key, name in (reads or {}).items():
            wanted.append((REGISTERED_MODEL, name, name, f"loads {key} from"))
        for resource_type, resource_id, name, use in wanted:
            held = auth.get_user_permission(user or "", resource_type, resource_id).permission
            if held == "MANAGE" or (resource_type == REGISTERED_MODEL and not _model_exists(registry, name)):
                continue
            raise NotOwnedError(
                f"MLflow user {user!r} does not own {_label(resource_type, name)}, which this stage {use} (it holds "
                f"{held} there, not MANAGE): another account created it or was given it, and that account, and "
                f"anyone it grants EDIT, can {_what_others_can(resource_type)} without this pipeline; nothing was "
                f"trained or recorded. An MLflow admin must see who (python -m components.security.access owners "
                f"{resource_type} {name}), check what they wrote, then delete it or give it to the service account "
                f"(python -m components.security.access adopt {resource_type} {name}); or set another name that the service "
                "account creates (README, 'Who may do what')")
    except MlflowException as exc:
        if _is(exc, "ENDPOINT_NOT_FOUND"):
            return  # no basic-auth app: nobody owns anything there
        message = explain(exc, "check who owns the names this stage writes to", "its own permissions", "READ")
        if message is None:
            raise
        raise NotOwnedError(message) from None


def _what_others_can(resource_type: str) -> str:
    return ("register versions of it and move its @champion" if resource_type == REGISTERED_MODEL
            else "log runs into it and change or delete them")


def _model_exists(registry, name: str) -> bool:
    try:
        registry.get_registered_model(name)
        return True
    except MlflowException as exc:
        if _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        if not _is(exc, "PERMISSION_DENIED"):
            raise
    return _listed(registry, name)


def _listed(registry, name: str) -> bool:
    """Whether a search finds the registered model: with workspaces on, MLflow answers 403, not 404, about a model that
    does not exist; a search lists what the account may read."""
    if "'" in name:
        return True  # not expressible in a filter: assume it exists (the stricter answer)
    return any(model.name == name for model in registry.search_registered_models(filter_string=f"name = '{name}'"))


def add_user(tracking_uri: str, username: str, role: str, password: str | None = None) -> str | None:
    """Create a person's account (a random password unless given) with exactly `role`; an existing account keeps
    its password and gets `role`. Returns the new password when one was generated."""
    client = _client(tracking_uri)
    generated = None
    try:
        client.get_user(username)
        exists = True
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
        exists = False
    if not exists:
        generated = None if password else random_secrets.token_urlsafe(18)
        ensure_user(client, username, password or generated)
    elif password:
        client.update_user_password(username, password)
    set_role(client, username, role, _names("ALIGNFLOW_REGISTERED_MODELS", DEFAULT_MODELS))
    return generated


# --- MLflow's refusals, in words ---------------------------------------------------------------------


def current_user() -> str:
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none: MLFLOW_TRACKING_USERNAME is not set)"


def promoter_hint(user: str) -> str:
    return (f"an MLflow admin can grant it with the promoter role: infra/local-stack add-user {user} promoter (or "
            f"python -m components.security.access add-user {user} promoter; README, 'Run it for a team')")


def explain(exc: MlflowException, action: str, resource: str, needs: str, hint: str | None = None) -> str | None:
    """A one-line explanation of MLflow's 401 or 403 for `action` on `resource`; None for any other error."""
    user = current_user()
    if _is(exc, "PERMISSION_DENIED"):
        return (f"MLflow user {user!r} may not {action}: that needs {needs} permission on {resource} (the server "
                f"answered 403 Permission denied); nothing was changed" + (f"; {hint}" if hint else ""))
    if _is(exc, "UNAUTHENTICATED"):
        return (f"the MLflow server refused the credentials of user {user!r} (401) to {action}: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (infra/local-stack: source .stack/env)")
    return None


def model_is_missing(exc: MlflowException, name: str) -> bool:
    """Whether a 403 about registered model `name` means it does not exist: MLflow's basic auth refuses a request
    about a version or alias of a model that does not exist (403) where the server without auth answers 404. Asks
    for the model itself, which an account allowed to read it gets as 404 (with workspaces off), or searches for it
    (with workspaces on MLflow answers 403 about the model itself too; a search lists what the account may read)."""
    if not _is(exc, "PERMISSION_DENIED"):
        return False
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as missing:
        if _is(missing, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return True
        return _is(missing, "PERMISSION_DENIED") and not _listed(client, name)
    return False


def explains_denial(action: str, needs: str = "EDIT") -> Callable:
    """Decorate a registry function taking `name` (and `alias`): MLflow's 403/401 becomes a
    `RegistryPermissionError` naming the user and the permission; `action` is formatted with the call's arguments."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except MlflowException as exc:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                message = explain(exc, action.format(**arguments), f"registered model {arguments.get('name')!r}",
                                  needs, promoter_hint(current_user()))
                if message is None:
                    raise
                raise RegistryPermissionError(message) from None

        return wrapper

    return decorate


# --- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.security.access", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bootstrap", help="create the roles, the service account, the experiments and models")
    adding = commands.add_parser("add-user", help="give a person an account with one alignflow role")
    adding.add_argument("username")
    adding.add_argument("role", choices=sorted(role_grants([])))
    adding.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    for command, what in (("owners", "who besides the service account can write an experiment or registered model"),
                          ("adopt", "take an experiment or registered model from other accounts' own grants and give it "
                                    "to the service account (check what they wrote first)")):
        named = commands.add_parser(command, help=what)
        named.add_argument("kind", choices=(EXPERIMENT, REGISTERED_MODEL))
        named.add_argument("name")
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        print("error: set MLFLOW_TRACKING_URI and the admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
              file=sys.stderr)
        return 2
    try:
        if args.command == "bootstrap":
            print(bootstrap(uri))
        elif args.command in ("owners", "adopt"):
            print((owners if args.command == "owners" else adopt)(uri, args.kind, args.name))
        else:
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
            generated = add_user(uri, args.username, args.role, password)
            print(f"MLflow user {args.username}: role {ROLE_PREFIX}{args.role}"
                  + (f"; password (shown once): {generated}" if generated else ""))
    except (AccessSetupError, MlflowException) as exc:
        message = explain(exc, args.command, "MLflow's users and roles", "admin",
                          "run it with the MLflow admin's credentials") if isinstance(exc, MlflowException) else None
        print(f"error: {message or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
