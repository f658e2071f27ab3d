"""Recipe: the YAML file that says exactly what runs (style guide R6), validated with pydantic.

Every mistake becomes one RecipeError line naming the file, the field path and what is allowed.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, UnknownNameError
from .pipeline import Pass, check_pipeline
from .qtypes import QuantSpec
from .registry import CALIBRATORS, METRICS, PASSES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightQuant(_Strict):
    """Quantization of constant weights (Conv/Gemm/MatMul input B)."""

    bits: Literal[4, 8] = 8
    symmetric: bool = True
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    calibrator: str = "max"
    calibrator_options: dict[str, Any] = Field(default_factory=dict)

    def spec(self, axis: int | None) -> QuantSpec:
        return QuantSpec(bits=self.bits, signed=True, symmetric=self.symmetric, narrow=self.symmetric,
                         axis=axis if self.granularity == "per_channel" else None,
                         calibrator=self.calibrator, calibrator_options=self.calibrator_options)


class ActivationQuant(_Strict):
    """Quantization of activations (everything computed at run time)."""

    bits: Literal[8, 16] = 8
    symmetric: bool = True
    signed: bool = True
    unsigned_when_nonnegative: bool = True
    calibrator: str = "max"
    calibrator_options: dict[str, Any] = Field(default_factory=dict)

    def spec(self, nonnegative: bool) -> QuantSpec:
        signed = self.signed and not (nonnegative and self.unsigned_when_nonnegative)
        return QuantSpec(bits=self.bits, signed=signed, symmetric=self.symmetric, narrow=False, axis=None,
                         calibrator=self.calibrator, calibrator_options=self.calibrator_options)


class Override(_Strict):
    """Settings for nodes or tensors whose name matches `match` (exact name or full-match regex)."""

    match: str
    quantize: bool = True
    weights: WeightQuant | None = None
    activations: ActivationQuant | None = None

    @field_validator("match")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        return pattern

    def matches(self, name: str) -> bool:
        return name == self.match or re.fullmatch(self.match, name) is not None


class Quantization(_Strict):
    weights: WeightQuant = Field(default_factory=WeightQuant)
    activations: ActivationQuant = Field(default_factory=ActivationQuant)
    overrides: list[Override] = Field(default_factory=list)

    def override_for(self, *names: str) -> Override | None:
        """The last override matching any of the names (later entries win)."""
        found = None
        for override in self.overrides:
            if any(override.matches(n) for n in names if n):
                found = override
        return found

    def weights_for(self, *names: str) -> WeightQuant:
        """Weight settings for a weight or its node: the last matching override that sets them."""
        return self._last_setting("weights", names)

    def activations_for(self, *names: str) -> ActivationQuant:
        """Activation settings for a tensor or a node that reads/writes it (last matching override wins)."""
        return self._last_setting("activations", names)

    def _last_setting(self, kind: str, names: tuple[str, ...]):
        found = getattr(self, kind)
        for override in self.overrides:
            setting = getattr(override, kind)
            if setting is not None and any(override.matches(n) for n in names if n):
                found = setting
        return found


class Preprocessing(_Strict):
    """How images (a folder of jpg/png, or uint8 arrays) become model input. Pixel units 0..255."""

    resize: int | None = Field(None, gt=0, description="resize the shorter side to this many pixels")
    crop: int | tuple[int, int] | None = Field(None, description="center crop size (int or [height, width])")
    color: Literal["rgb", "bgr", "grayscale"] = "rgb"
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [255.0])
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: list[float]) -> list[float]:
        if any(s <= 0 for s in std):
            raise ValueError("every std value must be > 0")
        return std


class Calibration(_Strict):
    batch_size: int = Field(16, gt=0)
    max_samples: int | None = Field(None, gt=0)
    memory_budget_mb: int = Field(512, gt=0, description="activations exposed per batch and onnxruntime session")


class GateCheck(_Strict):
    """One check of the quality gate (qcompile exits 3 when a check fails; see qcompile.gate)."""

    metric: str = Field("auto", description="a registered metric; auto: top1 with labels, else agreement")
    max_drop: float | None = Field(None, ge=0, description="allowed drop, in the metric's unit (points for %)")
    relative: bool = Field(False, description="max_drop is a percentage of the float model's value")
    min: float | None = Field(None, description="the quantized value must be >= min")
    max: float | None = Field(None, description="the quantized value must be <= max")

    @model_validator(mode="after")
    def _one_bound(self) -> "GateCheck":
        bounds = [k for k in ("max_drop", "min", "max") if getattr(self, k) is not None]
        if len(bounds) != 1:
            got = f" (got {', '.join(bounds)})" if bounds else ""
            raise ValueError(f"give exactly one of max_drop, min, max{got}")
        if self.relative and self.max_drop is None:
            raise ValueError("relative applies to max_drop only")
        if self.metric != "auto":
            if self.metric not in METRICS:
                raise ValueError(f"metric: {METRICS.unknown_message(self.metric)}")
            ideal = METRICS.get(self.metric).ideal
            if self.max_drop is not None and ideal is not None and not math.isfinite(ideal):
                raise ValueError(f"metric '{self.metric}' is {ideal} for the float model, so no drop from it is "
                                 f"measurable; gate it with min instead")
        return self


class Evaluation(_Strict):
    metrics: list[str] = Field(default_factory=list, description="metric names; empty: the defaults that apply")
    layer_samples: int = Field(8, ge=0, description="samples for the report's per-layer SQNR and histograms; 0: off")

    @field_validator("metrics")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in METRICS:
                raise ValueError(METRICS.unknown_message(name))
        return names


SensitivityMethod = Literal["quantize_one", "drop_one"]


class Sensitivity(_Strict):
    """Per-layer sensitivity ranking (qcompile.sensitivity), also run by fallback: auto."""

    enabled: bool = False
    eval_samples: int = Field(100, gt=0, description="evaluation samples each variant runs on")
    methods: list[SensitivityMethod] = Field(default_factory=lambda: ["quantize_one", "drop_one"], min_length=1)


class Fallback(_Strict):
    """fallback: auto moves the most damaging layers to float until the gate passes."""

    mode: Literal["off", "auto"] = "off"
    max_layers: int = Field(10, gt=0, description="never move more layers than this")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, mode: Any) -> Any:
        return "off" if mode is False else mode  # YAML 1.1 reads a bare `off` as false
    eval_samples: int = Field(100, gt=0, description="evaluation samples for the sensitivity ranking")
    # quantize_one only by default: drop-one adds as many runs again, and once one layer dominates the
    # noise, dropping any other one barely moves the output (measured on EfficientNet-Lite0)
    methods: list[SensitivityMethod] = Field(default_factory=lambda: ["quantize_one"], min_length=1)


class Recipe(_Strict):
    version: Literal[1] = 1
    target: Literal["qdq", "qoperator"] = "qdq"
    quantization: Quantization = Field(default_factory=Quantization)
    calibration: Calibration = Field(default_factory=Calibration)
    preprocessing: Preprocessing | None = None
    passes: list[str | dict[str, Any]]
    evaluation: Evaluation = Field(default_factory=Evaluation)
    gate: list[GateCheck] = Field(default_factory=list, description="one check (a mapping) or a list of them")
    sensitivity: Sensitivity = Field(default_factory=Sensitivity)
    fallback: Fallback = Field(default_factory=Fallback)

    @field_validator("gate", mode="before")
    @classmethod
    def _gate_list(cls, gate: Any) -> Any:
        return [gate] if isinstance(gate, dict) else [] if gate is None else gate

    @model_validator(mode="after")
    def _calibrators_exist(self) -> "Recipe":
        q = self.quantization
        for label, cfg in [("quantization.weights", q.weights), ("quantization.activations", q.activations)] + \
                [(f"quantization.overrides[{i}].{k}", getattr(o, k)) for i, o in enumerate(q.overrides)
                 for k in ("weights", "activations")]:
            if cfg is None:
                continue
            if cfg.calibrator not in CALIBRATORS:
                raise ValueError(f"{label}.calibrator: {CALIBRATORS.unknown_message(cfg.calibrator)}")
            cls = CALIBRATORS.get(cfg.calibrator)
            try:
                cls.Options(**cfg.calibrator_options)
            except ValidationError as exc:
                raise ValueError(f"{label}.calibrator_options: {_first_error(exc)}") from None
        return self


def _loc(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = _loc(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{loc}: {msg}" if loc else msg


def _allowed_keys(model: type[BaseModel], loc: tuple) -> str:
    """For an unknown key, the keys the enclosing section allows."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return ""
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)]
        if not candidates:
            inner = [a for arg in getattr(annotation, "__args__", ()) for a in getattr(arg, "__args__", (arg,))]
            candidates = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        current = candidates[0] if candidates else None
    if current is None or not hasattr(current, "model_fields"):
        return ""
    return " (allowed: " + ", ".join(current.model_fields) + ")"


def parse_recipe(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a YAML mapping with a 'passes' list")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        allowed = _allowed_keys(Recipe, err["loc"]) if err["type"] == "extra_forbidden" else ""
        raise RecipeError(f"{source}: {_first_error(exc)}{allowed}{more}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, str(path))


def build_passes(recipe: Recipe, source: str) -> list[Pass]:
    """Instantiate the recipe's passes with validated options; check the pipeline order."""
    passes: list[Pass] = []
    for index, step in enumerate(recipe.passes):
        if isinstance(step, str):
            name, options = step, {}
        elif len(step) == 1:
            name, options = next(iter(step.items()))
            options = options or {}
        else:
            raise RecipeError(f"{source}: passes[{index}]: a step is a pass name or a one-key mapping "
                              f"'name: {{options}}', got keys {sorted(step)}")
        try:
            cls = PASSES.get(name)
        except UnknownNameError as exc:
            raise RecipeError(f"{source}: passes[{index}]: {exc}") from None
        if not isinstance(options, dict):
            raise RecipeError(f"{source}: passes[{index}].{name}: options must be a mapping, got {options!r}")
        try:
            opts = cls.Options(**options)
        except ValidationError as exc:
            allowed = " (allowed: " + ", ".join(cls.Options.model_fields) + ")" \
                if exc.errors()[0]["type"] == "extra_forbidden" else ""
            raise RecipeError(f"{source}: passes[{index}].{name}.{_first_error(exc)}{allowed}") from None
        passes.append(cls(opts))
    check_pipeline(passes, where=source)
    lowers_to_qoperator = any(p.name == "fuse_requant" for p in passes)
    if recipe.target == "qoperator" and not lowers_to_qoperator:
        raise RecipeError(f"{source}: target: qoperator needs the 'fuse_requant' pass after 'insert_qdq'")
    if recipe.target == "qdq" and lowers_to_qoperator:
        raise RecipeError(f"{source}: 'fuse_requant' writes QOperator nodes; set target: qoperator")
    return passes
