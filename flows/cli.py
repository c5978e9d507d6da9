"""The `alignflow` command: run, schedule, inspect and promote; plus config, data and demo helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from components.config import ConfigError, load_config

app = typer.Typer(help="alignflow: RLHF with PPO as a scheduled, auditable MLOps workflow.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the run configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Check the data pinned by data.dvc.", no_args_is_help=True)
demo_app = typer.Typer(help="The offline demo kit (the embedded default).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")

console = Console()
errors = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="Run configuration (YAML). Default: configs/demo.yaml.")
SetOption = typer.Option([], "--set", "-s", help="Override a setting, e.g. --set ppo.learning_rate=1e-5 (repeatable).")


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def resolved(config: Optional[Path], overrides: list[str]):
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Print the resolved configuration (YAML), after overrides and defaults."""
    console.print(resolved(config, set_).to_yaml(), highlight=False, soft_wrap=True)


@data_app.command("check")
def data_check(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Check data/ against data.dvc and report the prompt rows that would be left out."""
    from components.data import DataError, check_data, load_prompts

    run = resolved(config, set_)
    try:
        version = check_data(Path(run.data.dvc_file))
        prompts = load_prompts(run.data)
    except DataError as exc:
        fail(str(exc))
    console.print(f"data version (md5 from {run.data.dvc_file}): [bold]{version.md5}[/] ({version.files} files)")
    console.print(prompts.report.summary(), highlight=False)


@demo_app.command("data")
def demo_data(out: Path = typer.Option(Path("data/demo"), help="Where to write the demo datasets."), seed: int = 0) -> None:
    """Regenerate the demo datasets exactly (the same seed gives the bytes data.dvc pins)."""
    from components.demo.domain import generate_demo_data

    files = generate_demo_data(out, seed=seed)
    for name, path in files.items():
        console.print(f"wrote {name}: {path}")


@demo_app.command("bootstrap")
def demo_bootstrap(
    data_dir: Path = typer.Option(Path("data/demo")),
    out: Path = typer.Option(Path("artifacts/demo")),
    force: bool = typer.Option(False, help="Retrain even if the models exist for this data and these settings."),
) -> None:
    """Train the demo's instruct model and reward model from scratch on the CPU."""
    from components.demo.bootstrap import bootstrap

    ensure_demo_data(data_dir)
    report = bootstrap(data_dir, out, force=force)
    console.print(report)


def ensure_demo_data(data_dir: Path = Path("data/demo")) -> None:
    """Generate the demo data when it is missing (a fresh clone), then check it against data.dvc."""
    from components.data import DataError, check_data
    from components.demo.domain import generate_demo_data

    if not data_dir.exists():
        console.print(f"{data_dir} is missing: regenerating the demo data (seed 0)")
        generate_demo_data(data_dir, seed=0)
    try:
        check_data(Path("data.dvc"))
    except DataError as exc:
        fail(str(exc))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
