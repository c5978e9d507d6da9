"""The README's team section documents every role the stack creates and how to add a user, with commands that exist."""

import re
import subprocess
import sys

from components.security import access
from components.config import PROJECT_ROOT


def team_section() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    start = readme.index("## Run it for a team")
    return readme[start:readme.index("\n## ", start + 1)]


def test_the_team_section_names_every_role_and_what_it_may_do():
    section = team_section()
    for role, grants in access.role_grants(["alignflow-policy"]).items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{access.ROLE_PREFIX}{role}` |")), None)
        assert row is not None, f"no row for the role {access.ROLE_PREFIX}{role}"
        for permission in {g.permission for g in grants}:
            assert permission in row, (role, permission, row)
    assert "default_permission = NO_PERMISSIONS" in section


def test_the_team_section_says_how_to_add_a_user_with_commands_that_exist():
    section = team_section()
    assert "Adding a user" in section
    stack_command = re.search(r"infra/local-stack add-user NAME (\S+)", section)
    assert stack_command and "add-user) shift; add_user" in (PROJECT_ROOT / "infra" / "local-stack").read_text()
    for role in stack_command[1].strip("`").split("|"):
        assert role in access.role_grants([]), role
    usage = subprocess.run([sys.executable, "-m", "components.security.access", "add-user", "--help"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "--password-stdin" in usage.stdout and "--password-stdin" in section
