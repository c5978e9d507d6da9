"""`alignflow plan`: what a run will hold in memory per device, per role, before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flows.cli import ConfigOption, SetOption, app, console, explain_errors, resolved


@app.command()
@explain_errors
def plan(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    device_gb: Optional[float] = typer.Option(None, "--device-gb", help="Check against this much memory per device (GB) instead of what the device reports."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Print the expected memory per device of each role (policy, reference, critic, reward model, optimizer state,
    activations, KV cache) for the configured models (sizes from their config files: no weights are loaded), whether
    it fits the device, and what would make it fit. Exit code 1 when it does not fit."""
    from components.models.memory_plan import GIB, check_sizes, plan_run
    from components.models.lengths import check_lengths
    from components.models.loading import resolved_models

    run_config = resolved(config, set_)
    check_sizes(run_config, device_gb, "--device-gb")  # before any model is located or sized
    run_config = resolved_models(run_config)
    check_lengths(run_config)  # a run its own input check would refuse: exit code 2, as `alignflow run` would
    result = plan_run(run_config, None if device_gb is None else int(device_gb * GIB))
    if as_json:
        console.print_json(json.dumps(result.as_dict()))
    else:
        table = Table(title=f"memory per device: {result.processes} process(es)" + (", FSDP" if result.sharded else ""))
        for column in ("role", "when", "GiB", "what"):
            table.add_column(column, justify="right" if column == "GiB" else "left")
        for line in result.lines:
            table.add_row(line.role, line.phase, f"{line.bytes / GIB:.3f}", line.note)
        console.print(table)
        device = "unknown" if result.device_bytes is None else f"{result.device_bytes / GIB:.2f} GiB"
        verdict = {True: "[green]fits[/]", False: "[bold red]does not fit[/]", None: "cannot tell"}[result.fits]
        console.print(f"peak {result.peak_bytes / GIB:.2f} GiB per {result.device} device (everything resident + the largest "
                      f"transient: the rollout, the backward's start or the optimizer step); available {device}: {verdict}")
        for line in result.advice:
            console.print(f"  - {line}", highlight=False, soft_wrap=True)
    if result.fits is False:
        raise typer.Exit(1)
