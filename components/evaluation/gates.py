"""The promotion gates: the candidate's evaluation against `gates.*`, one row per rule, in a report that MLflow,
Prefect and the terminal show alike (`to_markdown`, `to_rich_table`, `as_metrics`, `as_tags`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.config import GatesConfig
from components.evaluation.policy import Comparison

# --- gates ------------------------------------------------------------------------------------

_NEGATION = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


@dataclass(frozen=True)
class Gate:
    """One promotion check: `value op threshold`, or `value in [low, high]` for op `in`."""

    name: str
    value: float
    threshold: float | tuple[float, float]
    passed: bool
    op: str
    threshold_name: str | tuple[str, str] | None = None  # the config key(s) the threshold comes from

    @property
    def rule(self) -> str:
        """The requirement, e.g. `<= max_kl 10.0` or `in [min_length_ratio 0.5, max_length_ratio 2.0]`."""
        if self.op == "in":
            (low, high), (low_name, high_name) = self.threshold, self.threshold_name
            return f"in [{low_name} {_fmt(low)}, {high_name} {_fmt(high)}]"
        return f"{self.op} {_named(self.threshold_name, self.threshold)}"

    @property
    def message(self) -> str:
        """What happened, e.g. `kl 14.2 > max_kl 10.0` (a failure states the violated relation)."""
        if self.passed:
            return f"{self.name} {_fmt(self.value)} {self.rule}"
        if self.op == "in":
            return f"{self.name} {_fmt(self.value)} outside {self.rule.removeprefix('in ')}"
        return f"{self.name} {_fmt(self.value)} {_NEGATION[self.op]} {_named(self.threshold_name, self.threshold)}"


@dataclass(frozen=True)
class GateReport:
    gates: tuple[Gate, ...]
    kl: float = float("nan")  # the policy's KL from the reference; meaningless (NaN) for a reward model
    champion_score: float | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    @classmethod
    def from_json(cls, value: dict) -> "GateReport":
        """The report back from its `dataclasses.asdict` JSON (a run's recorded result)."""
        as_tuple = lambda x: tuple(x) if isinstance(x, list) else x  # noqa: E731
        gates = tuple(Gate(**{**g, "threshold": as_tuple(g["threshold"]), "threshold_name": as_tuple(g["threshold_name"])})
                      for g in value["gates"])
        return cls(gates=gates, kl=value["kl"], champion_score=value["champion_score"], notes=tuple(value["notes"]))

    @property
    def failed_names(self) -> list[str]:
        return [gate.name for gate in self.gates if not gate.passed]

    @property
    def failures(self) -> list[str]:
        """One sentence per failed gate, e.g. `kl 14.2 > max_kl 10.0`."""
        return [gate.message for gate in self.gates if not gate.passed]

    def summary(self) -> str:
        if self.passed:
            return f"all {len(self.gates)} gates passed"
        return f"{len(self.failures)} of {len(self.gates)} gates failed: " + "; ".join(self.failures)

    def to_markdown(self) -> str:
        """A Markdown table (e.g. for a Prefect markdown artifact)."""
        lines = [
            f"## Promotion gates: {'PASSED' if self.passed else 'FAILED'}",
            "",
            "| gate | value | requirement | result |",
            "|---|---:|---|---|",
        ]
        for gate in self.gates:
            lines.append(f"| {gate.name} | {_fmt(gate.value)} | {gate.rule} | {'pass' if gate.passed else '**FAIL**'} |")
        lines.append("")
        lines.append(self.summary() + ".")
        lines.extend(f"\n_{note}_" for note in self.notes)
        return "\n".join(lines) + "\n"

    def to_rich_table(self):
        """A `rich.table.Table` for the terminal."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"Promotion gates: {'[green]PASSED' if self.passed else '[red]FAILED'}")
        table.add_column("gate")
        table.add_column("value", justify="right")
        table.add_column("requirement")
        table.add_column("result")
        for gate in self.gates:
            table.add_row(gate.name, _fmt(gate.value), escape(gate.rule), "[green]pass" if gate.passed else "[bold red]FAIL")
        return table

    def as_metrics(self) -> dict[str, float]:
        """`gate/<name>` is 1.0 or 0.0, `gate/<name>/value` the checked value; `gate/passed` overall."""
        metrics: dict[str, float] = {"gate/passed": float(self.passed)}
        for gate in self.gates:
            metrics[f"gate/{gate.name}"] = float(gate.passed)
            metrics[f"gate/{gate.name}/value"] = float(gate.value)
        return metrics

    def as_tags(self, prefix: str = "alignflow.") -> dict[str, str]:
        """`<prefix>gates_passed` true/false and `<prefix>gates_failed` (comma-separated names)."""
        return {
            f"{prefix}gates_passed": "true" if self.passed else "false",
            f"{prefix}gates_failed": ",".join(self.failed_names),
        }


def check_gates(comparison: Comparison, gates: GatesConfig, champion_score: float | None = None) -> GateReport:
    """Every promotion gate as a row; `champion_score` is the current champion's mean score, if any. The candidate's
    KL is its summary's (`comparison.candidate.kl`; unknown counts as NaN, which fails the kl gate).

    The champion rule applies when a champion exists and `gates.beats_champion` is on; its score
    must come from the same evaluation prompts as the candidate's.
    """
    kl = comparison.candidate.kl if comparison.candidate.kl is not None else float("nan")
    gain, (gain_low, _) = comparison.score_gain, comparison.score_gain_ci
    ratio, distinct2 = comparison.length_ratio, comparison.candidate.distinct2
    low, high = gates.min_length_ratio, gates.max_length_ratio
    rows = [Gate("score_gain", gain, gates.min_score_gain, gain >= gates.min_score_gain, ">=", "min_score_gain")]
    if gates.significant_gain:
        rows.append(Gate("score_gain_ci_low", gain_low, 0.0, gain_low > 0.0, ">"))
    rows += [
        Gate("win_rate", comparison.win_rate, gates.min_win_rate, comparison.win_rate >= gates.min_win_rate, ">=", "min_win_rate"),
        Gate("kl", kl, gates.max_kl, kl <= gates.max_kl, "<=", "max_kl"),
        Gate("length_ratio", ratio, (low, high), low <= ratio <= high, "in", ("min_length_ratio", "max_length_ratio")),
        Gate("distinct2", distinct2, gates.min_distinct2, distinct2 >= gates.min_distinct2, ">=", "min_distinct2"),
    ]
    notes: list[str] = []
    if comparison.judge_gain is not None:
        judge_low = comparison.judge_gain_ci[0]
        if gates.judge_gain:
            rows.append(Gate("judge_gain_ci_low", judge_low, 0.0, judge_low > 0.0, ">"))
        notes.append(f"gain by the reward model {_fmt(gain)} (95% CI {_fmt(gain_low)} to {_fmt(comparison.score_gain_ci[1])}); "
                     f"by the judge {_fmt(comparison.judge_gain)} (95% CI {_fmt(judge_low)} to {_fmt(comparison.judge_gain_ci[1])})"
                     + ("" if gates.judge_gain else "; gates.judge_gain is off: not checked"))
    if champion_score is not None and gates.beats_champion:
        score = comparison.candidate.mean_score
        rows.append(Gate("beats_champion", score, champion_score, score > champion_score, ">", "champion score"))
    elif champion_score is None:
        notes.append("no champion yet: beats_champion not checked")
    else:
        notes.append("gates.beats_champion is off: beats_champion not checked")
    if math.isnan(kl):
        notes.append("kl is NaN: the kl gate fails")
    return GateReport(gates=tuple(rows), kl=float(kl), champion_score=champion_score, notes=tuple(notes))


def _fmt(value: float) -> str:
    """Four significant digits, keeping a trailing `.0` (10.0, 14.2, 0.3333)."""
    if not math.isfinite(value):
        return str(value)
    return str(float(f"{value:.4g}"))


def _named(name: str | None, value: float) -> str:
    return f"{name} {_fmt(value)}" if name else _fmt(value)
