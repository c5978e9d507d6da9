"""`alignflow config`, `alignflow data` and `alignflow demo`: the configuration, the dataset, the demo kit."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from components.config import PROJECT_ROOT
from flows.cli import ConfigOption, SetOption, config_app, console, data_app, demo_app, explain_errors, resolved


@config_app.command("show")
@explain_errors
def config_show(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Print the resolved configuration (YAML), after overrides and defaults."""
    from components.security import secrets

    console.print(secrets.redacted_yaml(resolved(config, set_)), highlight=False, soft_wrap=True)


@data_app.command("check")
@explain_errors
def data_check(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Check the dataset a run would read against its .dvc file, and report every row left out or shortened (to
    generation.max_prompt_tokens, counted with the policy's tokenizer) by row number."""
    from components.data.prompts import prepare
    from components.models.loading import load_tokenizer, locate
    from components.rl.tokenization import prompt_ids
    from components.data.versioning import dataset_version

    run = resolved(config, set_)
    if run.data.source.startswith("data/demo"):
        ensure_demo_data()
    version = dataset_version(run.data, PROJECT_ROOT)
    tokenizer = load_tokenizer(locate("policy.model", run.policy.model, run.policy.revision), run.policy.revision)
    chat = run.policy.use_chat_template
    prepared = prepare(run.data, run.generation, lambda prompt: len(prompt_ids(tokenizer, [prompt], chat)[0]), run.seed,
                       PROJECT_ROOT)
    from components.security.secrets import redact_text

    pinned = f"pinned by {version.dvc_file}" if version.versioned else "[yellow]not versioned by DVC[/] (data.check_dvc: false)"
    console.print(f"dataset [bold]{escape(version.name)}[/] ({escape(redact_text(version.source))}): md5 of the bytes read "
                  f"[bold]{version.md5}[/], {pinned}")
    console.print(escape(redact_text(prepared.summary)), highlight=False)
    console.print(f"{len(prepared.train_prompts)} training prompts, {len(prepared.eval_prompts)} held out (data.eval_size)")


@demo_app.command("data")
@explain_errors
def demo_data(out: Path = typer.Option(PROJECT_ROOT / "data/demo", help="Where to write the demo datasets."), seed: int = 0) -> None:
    """Regenerate the demo datasets exactly (the same seed gives the bytes data.dvc pins), under the lock that
    `make demo`, the tests and `alignflow run` take to regenerate missing demo data."""
    from components.demo.domain import generate_demo_data

    with demo_data_lock(out):
        files = generate_demo_data(out, seed=seed)
    for name, path in files.items():
        console.print(f"wrote {name}: {path}")


@demo_app.command("bootstrap")
@explain_errors
def demo_bootstrap(
    data_dir: Path = typer.Option(PROJECT_ROOT / "data/demo"),
    out: Path = typer.Option(PROJECT_ROOT / "artifacts/demo"),
    force: bool = typer.Option(False, help="Retrain even if the models exist for this data and these settings."),
) -> None:
    """Train the demo's instruct model and reward model from scratch on the CPU."""
    from components.demo.bootstrap import bootstrap

    ensure_demo_data(data_dir)
    report = bootstrap(data_dir, out, force=force)
    console.print(report)


def demo_data_lock_path(data_dir: Path) -> Path:
    """The lock file of the demo data in `data_dir`: under artifacts/ (outside the DVC-tracked tree, gitignored)."""
    name = hashlib.md5(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return PROJECT_ROOT / "artifacts" / f".demo-data-{name}.lock"


def demo_data_lock(data_dir: Path):
    """The lock every writer of the demo data in `data_dir` holds while it writes (the files are written in place:
    no temporary file inside the DVC-tracked directory), and `ensure_demo_data` while it checks them."""
    from components.tracking.runs import file_lock

    return file_lock(demo_data_lock_path(data_dir))


def ensure_demo_data(data_dir: Path = PROJECT_ROOT / "data/demo") -> None:
    """Generate the demo data when it is missing (a fresh clone); it must then match what data.dvc pins. Two processes
    at once take turns (the second finds it), as does `alignflow demo data` (the same lock)."""
    from components.config import DataConfig
    from components.demo.domain import DATA_FILES, generate_demo_data
    from components.data.versioning import dataset_version

    with demo_data_lock(data_dir):
        if not all((data_dir / name).is_file() for name in DATA_FILES):
            console.print(f"{data_dir} is missing: regenerating the demo data (seed 0)")
            generate_demo_data(data_dir, seed=0)
        dataset_version(DataConfig(source=str(data_dir.relative_to(PROJECT_ROOT))), PROJECT_ROOT)  # DVC's state: one at a time


def prepare_demo_if_needed(run) -> None:
    """The embedded default brings its own world: data regenerated and models bootstrapped if missing."""
    from components.demo.bootstrap import bootstrap

    if run.policy.model.startswith("artifacts/demo") or run.reward.model.startswith("artifacts/demo"):
        ensure_demo_data()
        report = bootstrap(PROJECT_ROOT / "data/demo", PROJECT_ROOT / "artifacts/demo")
        if not report.skipped:
            console.print(report)


@demo_app.command("annotate")
@explain_errors
def demo_annotate(
    policy: str = typer.Argument(..., help="The policy whose completions are labelled: a path or models:/NAME/VERSION (@ALIAS)."),
    out: Path = typer.Option(..., help="The preference pairs written (JSONL: prompt, chosen, rejected), for the reward stage."),
    prompts: int = typer.Option(1000, min=1, help="How many of data/demo/prompts.jsonl's prompts, from the first."),
    reference: str = typer.Option("artifacts/demo/instruct", help="The model the policy's completions are paired with."),
    max_new_tokens: int = typer.Option(24, min=1, help="Tokens sampled per completion, as generation.max_new_tokens."),
    seed: int = typer.Option(0, help="Seeds the sampling and the annotators' flipped labels."),
    config: Optional[Path] = ConfigOption,
    overrides: list[str] = SetOption,
) -> None:
    """The demo's annotators label POLICY's completions against the reference's: the human-feedback loop, simulated.
    Train a reward model or judge on the pairs with `alignflow reward run --set data.source=...`."""
    from components.tracking import runs as tracking
    from components.demo.annotators import annotate_policy
    from components.demo.bootstrap import bootstrap, read_jsonl
    from components.demo.domain import write_jsonl
    from components.models.loading import locate

    ensure_demo_data()
    if reference.startswith("artifacts/demo"):
        bootstrap(PROJECT_ROOT / "data/demo", PROJECT_ROOT / "artifacts/demo")  # reused when it is there
    if policy.startswith("models:") or reference.startswith("models:"):
        tracking.use_tracking(resolved(config, overrides).tracking)
    rows = [row["prompt"] for row in read_jsonl(PROJECT_ROOT / "data/demo/prompts.jsonl", ("prompt",))][:prompts]
    annotated = annotate_policy(locate("POLICY", policy), locate("--reference", reference), rows, seed, max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, annotated.pairs)
    console.print(f"wrote {len(annotated.pairs)} labelled pairs to {out} ({annotated.sampled} prompts sampled, "
                  f"{annotated.near_ties} near-ties left unlabelled; the policy's completion chosen in "
                  f"{annotated.policy_chosen} of {len(annotated.pairs)})")
