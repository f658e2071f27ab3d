"""The quality gate: checks on evaluation metrics that decide qcompile's exit code 3.

A check names a metric and one bound (recipe `gate:`, or `--max-drop` / `--min` / `--max`):

- ``max_drop``: the quantized model may be at most this much worse than the float model, in the
  metric's unit (points for top1, dB for SQNR ...); with ``relative: true`` it is a percentage
  of the float model's value (1.0 with float top-1 88.75 % allows 0.8875 points);
- ``min`` / ``max``: the quantized model's value must be at least / at most this.

``metric: auto`` is top1 when the evaluation data has labels, else agreement. A failing gate
still leaves the model and the report on disk: the CLI prints one line on stderr and exits 3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .errors import QCompileError
from .metrics import MetricValue
from .recipe import GateCheck

__all__ = ["CheckResult", "GateVerdict", "checks_from_cli", "evaluate_gate", "merge_checks", "resolve_auto",
           "validate_checks"]


def resolve_auto(checks: Sequence[GateCheck], has_labels: bool) -> list[GateCheck]:
    """`metric: auto` becomes top1 (labels) or agreement (no labels)."""
    default = "top1" if has_labels else "agreement"
    return [c.model_copy(update={"metric": default}) if c.metric == "auto" else c for c in checks]


def _parse_bound(text: str, option: str) -> tuple[str, float]:
    metric, _, number = text.rpartition("=")
    try:
        value = float(number)
    except ValueError:
        raise QCompileError(f"{option} {text}: expected [METRIC=]NUMBER, e.g. {option} top1=1.0") from None
    return metric.strip() or "auto", value


def checks_from_cli(max_drop: Iterable[str] = (), minimum: Iterable[str] = (),
                    maximum: Iterable[str] = ()) -> list[GateCheck]:
    """--max-drop [METRIC=]N, --min METRIC=N, --max METRIC=N as GateChecks.

    Only the syntax is checked here: metric names are validated by validate_checks once plugins
    (which may register metrics) are loaded."""
    checks = []
    for option, texts, key in (("--max-drop", max_drop, "max_drop"), ("--min", minimum, "min"),
                               ("--max", maximum, "max")):
        for text in texts:
            metric, value = _parse_bound(text, option)
            checks.append(GateCheck.model_construct(metric=metric, **{key: value}))
    return checks


def validate_checks(checks: Iterable[GateCheck]) -> list[GateCheck]:
    """Every check validated as the recipe's are (registered metric, one bound, ...)."""
    from pydantic import ValidationError

    from .recipe import _first_error

    valid = []
    for check in checks:
        try:
            valid.append(GateCheck.model_validate(check.model_dump()))
        except ValidationError as exc:
            bound = next(k for k in ("max_drop", "min", "max") if getattr(check, k, None) is not None)
            option = "--max-drop" if bound == "max_drop" else f"--{bound}"
            raise QCompileError(f"{option} {check.metric}={getattr(check, bound)}: {_first_error(exc)}") from None
    return valid


def merge_checks(recipe_checks: Sequence[GateCheck], cli_checks: Sequence[GateCheck]) -> list[GateCheck]:
    """The recipe's checks, with a command-line check replacing the recipe's on the same metric."""
    overridden = {c.metric for c in cli_checks}
    return [c for c in recipe_checks if c.metric not in overridden] + list(cli_checks)


@dataclass(frozen=True)
class CheckResult:
    metric: str
    unit: str
    float_value: float
    quantized_value: float
    bound: str  # "max_drop" | "min" | "max"
    limit: float  # the allowed drop (max_drop, in the metric's unit) or the min / max value
    relative: bool
    passed: bool
    drop: float | None  # how much worse than the float model (None when a side is not finite)

    def describe(self) -> str:
        """One sentence: metric, float value, quantized value, what was allowed."""
        unit = _unit(self.unit)
        head = f"{self.metric} float {_num(self.float_value)}{unit} -> quantized {_num(self.quantized_value)}{unit}"
        if self.bound == "max_drop":
            points = " points" if self.unit == "%" else unit
            relative = " (relative)" if self.relative else ""
            drop = self.drop if self.drop is not None else math.inf
            verb = "<=" if self.passed else ">"
            return f"{head}: drop {drop:.2f}{points} {verb} allowed {self.limit:.2f}{points}{relative}"
        verb = {("min", True): ">=", ("min", False): "<", ("max", True): "<=", ("max", False): ">"}[(self.bound,
                                                                                                     self.passed)]
        return f"{head}: {verb} {self.bound} {_num(self.limit)}{unit}"

    def as_dict(self) -> dict:
        return {"metric": self.metric, "unit": self.unit, "float": self.float_value,
                "quantized": self.quantized_value, "bound": self.bound, "limit": self.limit,
                "relative": self.relative, "drop": self.drop, "passed": self.passed, "message": self.describe()}


def _unit(unit: str) -> str:
    return "%" if unit == "%" else f" {unit}" if unit else ""


def _num(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class GateVerdict:
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def line(self) -> str:
        """The one stderr line for a failed gate (every failing check, separated by '; ')."""
        return "gate failed: " + "; ".join(c.describe() for c in self.failures())

    def as_dict(self) -> dict:
        return {"passed": self.passed, "checks": [c.as_dict() for c in self.checks]}


def _check(check: GateCheck, value: MetricValue) -> CheckResult:
    f, q, drop = value.float_value, value.quantized_value, value.drop
    if check.max_drop is not None:
        allowed = check.max_drop * abs(f) / 100.0 if check.relative else check.max_drop
        # 1e-9: a drop exactly at the limit passes despite float rounding (88.75 - 87.75 == 1.0)
        passed = drop is not None and drop <= allowed + 1e-9
        return CheckResult(check.metric, value.unit, f, q, "max_drop", allowed, check.relative, passed, drop)
    if check.min is not None:
        return CheckResult(check.metric, value.unit, f, q, "min", check.min, False, q >= check.min, drop)
    return CheckResult(check.metric, value.unit, f, q, "max", check.max, False, q <= check.max, drop)


def evaluate_gate(checks: Sequence[GateCheck], metrics: dict[str, MetricValue]) -> GateVerdict:
    """Every check against the computed metrics (each check's metric must have been computed)."""
    return GateVerdict([_check(c, metrics[c.metric]) for c in checks])
