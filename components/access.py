"""Who may do what on a team's MLflow server: the accounts and roles the stack creates, and MLflow's refusals in
plain words.

The team stack runs MLflow's basic-auth app with `default_permission = NO_PERMISSIONS`: an account sees and changes
only what a role (or its own creation) grants it. The roles, in MLflow's default workspace:

    alignflow-pipeline  the service account of the pipeline and its workers: EDIT on every experiment and registered
                        model (log runs, register versions, move aliases); MLflow gives it MANAGE on what it creates
    alignflow-reader    READ on every experiment and registered model: runs, metrics, artifacts, models
    alignflow-promoter  READ on everything, EDIT on the registered models it may promote (ALIGNFLOW_REGISTERED_MODELS,
                        default alignflow-policy; `*` for every model): `alignflow promote` / `rollback`

`bootstrap` (run by `infra/local-stack up` and by the compose stack's `mlflow-roles` service) creates the roles, the
service account, and the experiment and registered models named by ALIGNFLOW_EXPERIMENTS / ALIGNFLOW_REGISTERED_MODELS
(so that no other account can create them first and own them); it is idempotent. `add-user NAME ROLE` gives a person
an account (a random password, printed once, unless `--password-stdin`) and exactly that alignflow role.

    MLFLOW_TRACKING_URI=... MLFLOW_TRACKING_USERNAME=<admin> MLFLOW_TRACKING_PASSWORD=... \\
        python -m components.access bootstrap | add-user NAME reader|promoter|pipeline [--password-stdin]

The registry functions of `components.tracking` turn MLflow's 403 into `RegistryPermissionError`, naming the user and
the permission the action needs (`explains_denial`).
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

from mlflow.exceptions import MlflowException

from components.errors import UserError

WORKSPACE = "default"  # MLflow's workspace when workspaces are off (the stack's setting)
ROLE_PREFIX = "alignflow-"
SERVICE_USER_VAR, SERVICE_PASSWORD_VAR = "ALIGNFLOW_PIPELINE_USER", "ALIGNFLOW_PIPELINE_PASSWORD"
DEFAULT_SERVICE_USER = "alignflow-pipeline"
DEFAULT_MODELS, DEFAULT_EXPERIMENTS = "alignflow-policy", "alignflow-demo"


class RegistryPermissionError(UserError, PermissionError):
    """MLflow refused a registry change (HTTP 403): the message names the user and the permission needed."""


class AccessSetupError(RuntimeError):
    """The roles or accounts could not be set up; the message says what is missing."""


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
        "pipeline": [Grant("experiment", "*", "EDIT"), Grant("registered_model", "*", "EDIT")],
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
        found = client.create_role(WORKSPACE, name, description=f"alignflow {role} (components/access.py)")
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
    """Roles, the pipeline's service account, and the experiments and registered models the team's runs use;
    run with admin credentials. Returns a one-line summary."""
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
    for name in (m for m in models if m != "*"):
        try:
            registry.create_registered_model(name, description="alignflow's policy; created with the team stack's roles")
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_ALREADY_EXISTS"):
                raise
    experiments = _names("ALIGNFLOW_EXPERIMENTS", DEFAULT_EXPERIMENTS)
    for name in experiments:
        if registry.get_experiment_by_name(name) is None:
            registry.create_experiment(name)
    return (f"MLflow roles {', '.join(ROLE_PREFIX + r for r in role_grants(models))}; service account {user}; "
            f"registered models {', '.join(models)}; experiments {', '.join(experiments)}")


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
            f"python -m components.access add-user {user} promoter; README, 'Run it for a team')")


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
    for the model itself, which an account allowed to read it gets as 404."""
    if not _is(exc, "PERMISSION_DENIED"):
        return False
    from mlflow import MlflowClient

    try:
        MlflowClient().get_registered_model(name)
    except MlflowException as missing:
        return _is(missing, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
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
    parser = argparse.ArgumentParser(prog="python -m components.access", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bootstrap", help="create the roles, the service account, the experiments and models")
    adding = commands.add_parser("add-user", help="give a person an account with one alignflow role")
    adding.add_argument("username")
    adding.add_argument("role", choices=sorted(role_grants([])))
    adding.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        print("error: set MLFLOW_TRACKING_URI and the admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
              file=sys.stderr)
        return 2
    try:
        if args.command == "bootstrap":
            print(bootstrap(uri))
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
