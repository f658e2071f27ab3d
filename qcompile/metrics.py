"""Evaluation metrics, registered by name like passes (recipe `evaluation.metrics`, `--metrics`, gates).

A metric turns one model's outputs on the evaluation data into one number. It sees the float
model's outputs and the labels (when the data has them) through a Reference, so the same
function gives both sides of a comparison: the float model's value is ``compute(ref.outputs,
ref)``, the quantized model's ``compute(quantized_outputs, ref)``. Metrics that measure closeness
to the float model therefore give their ideal on the float side (agreement 100 %, SQNR +inf dB,
cosine 1, KL 0), and model-quality metrics (top-1) give the float model's real accuracy.

Built-ins (units are what gates and reports use; accuracies are in %, so a drop is in points):

| name | unit | needs | value |
| --- | --- | --- | --- |
| top1, top5 | % | labels, a classification output [N, classes] | share of samples whose label is in the top k |
| agreement | % | a classification output | share of samples whose top-1 equals the float model's |
| sqnr | dB | — | 10·log10(Σf² / Σ(f−q)²) per output; the worst output |
| cosine | — | — | mean per-sample cosine similarity to the float output; the worst output |
| kl | nats | a classification output | mean KL(softmax(float) ‖ softmax(quantized)); lower is better |

A plugin adds one with ``@register_metric("name")`` on a Metric subclass (``--plugin`` or the
``qcompile.metrics`` entry-point group); it is computed when the recipe or ``--metrics`` names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from .errors import DataError
from .registry import METRICS, register_metric

__all__ = ["DEFAULT_METRICS", "Metric", "MetricValue", "Reference", "compute_metrics", "mean_kl", "metric",
           "resolve_metrics", "topk_accuracy"]

# Computed when neither the recipe nor --metrics names any (each only where it applies).
DEFAULT_METRICS = ("top1", "top5", "agreement", "sqnr", "cosine", "kl")


@dataclass(frozen=True)
class Reference:
    """What every metric compares against: the float model's outputs and the labels."""

    names: tuple[str, ...]
    outputs: list[np.ndarray]
    labels: np.ndarray | None = None

    def subset(self, indices: np.ndarray) -> "Reference":
        labels = self.labels[indices] if self.labels is not None else None
        return Reference(self.names, [o[indices] for o in self.outputs], labels)


class Metric:
    """Base class of every metric. Subclasses set the class attributes and implement compute()."""

    name: ClassVar[str] = ""  # set by @register_metric
    unit: ClassVar[str] = ""  # "%", "dB", "nats", "" — the unit of compute()'s value, drops and gates
    higher_is_better: ClassVar[bool] = True
    # The value of a model identical to the float one, for metrics that compare with it (agreement
    # 100, sqnr +inf); None for model-quality metrics. A gate cannot allow a drop from +inf.
    ideal: ClassVar[float | None] = None
    description: ClassVar[str] = ""

    def applies(self, shapes: Sequence[tuple | None], has_labels: bool) -> str:
        """Why this metric cannot be computed for outputs of these shapes, or "" when it can.

        shapes: each model output's shape (ints, or str/None for free dimensions; None: unknown)."""
        return ""

    def compute(self, outputs: list[np.ndarray], ref: Reference) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_classification(shape: tuple | None) -> bool:
    """[N, classes] with more than one class (a free class dimension counts)."""
    if shape is None:
        return True  # unknown: decided on the data
    return len(shape) == 2 and not (isinstance(shape[1], int) and shape[1] <= 1)


def _classification(outputs: list[np.ndarray], name: str) -> np.ndarray:
    logits = outputs[0]
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise DataError(f"metric '{name}' needs the first model output to be [N, classes]; "
                        f"it is {list(logits.shape)}")
    return logits


class _Classification(Metric):
    def applies(self, shapes, has_labels):
        if shapes and not _is_classification(shapes[0]):
            return f"needs a classification output [N, classes] (the first output is {list(shapes[0])})"
        return ""


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows [N, classes] whose label is among the k largest logits.

    Equal logits rank by class index, lower first, as ONNX TopK and ArgMax (select_last_index=0)
    and numpy's argmax rank them, so top-1 and agreement (argmax) judge a tie alike. Quantized
    logits sit on a grid and tie often: ranking ties arbitrarily (argpartition) moved
    EfficientNet-Lite0 W4A8's top-1 by 0.5 points against the same logits' argmax."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


class _TopK(_Classification):
    k: ClassVar[int] = 1
    unit = "%"

    def applies(self, shapes, has_labels):
        if not has_labels:
            return "needs labels in the evaluation data (key 'labels' in the .npz, or class sub-folders)"
        return super().applies(shapes, has_labels)

    def compute(self, outputs, ref):
        logits = _classification(outputs, self.name)
        if ref.labels is None or len(ref.labels) != len(logits):
            raise DataError(f"metric '{self.name}' needs one label per evaluation sample")
        return 100.0 * topk_accuracy(logits, ref.labels, self.k)


@register_metric("top1")
class Top1(_TopK):
    """Top-1 accuracy against the labels, in %."""

    k = 1
    description = "top-1 accuracy"


@register_metric("top5")
class Top5(_TopK):
    """Top-5 accuracy against the labels, in % (top-k for k = the class count when there are fewer)."""

    k = 5
    description = "top-5 accuracy"


@register_metric("agreement")
class Agreement(_Classification):
    """Share of samples whose top-1 class equals the float model's, in % (needs no labels)."""

    unit = "%"
    ideal = 100.0
    description = "top-1 agreement with the float model"

    def compute(self, outputs, ref):
        mine = _classification(outputs, self.name).argmax(1)
        return 100.0 * float(np.mean(mine == _classification(ref.outputs, self.name).argmax(1)))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10·log10(Σ f² / Σ (f − q)²): +inf when identical, -inf when the reference is all zero."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - test.astype(np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def cosine_similarity(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over samples (first axis) of the cosine similarity of the flattened samples."""
    f = reference.reshape(len(reference), -1).astype(np.float64)
    q = test.reshape(len(test), -1).astype(np.float64)
    norms = np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1)
    dots = np.sum(f * q, axis=1)
    both_zero = (np.linalg.norm(f, axis=1) == 0) & (np.linalg.norm(q, axis=1) == 0)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(cos))


@register_metric("sqnr")
class SQNR(Metric):
    """Output signal-to-quantization-noise ratio in dB; the worst output of a multi-output model."""

    unit = "dB"
    ideal = math.inf
    description = "output SQNR (worst output)"

    def compute(self, outputs, ref):
        return min(sqnr_db(f, q) for f, q in zip(ref.outputs, outputs))


@register_metric("cosine")
class Cosine(Metric):
    """Mean per-sample cosine similarity to the float output; the worst output."""

    ideal = 1.0
    description = "output cosine similarity (worst output)"

    def compute(self, outputs, ref):
        return min(cosine_similarity(f, q) for f, q in zip(ref.outputs, outputs))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=1, keepdims=True))


def mean_kl(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(test)), in nats ([N, classes] logits)."""
    log_p, log_q = _log_softmax(reference), _log_softmax(test)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


@register_metric("kl")
class KL(_Classification):
    """Mean KL(softmax(float) ‖ softmax(quantized)) over samples, in nats; lower is better."""

    unit = "nats"
    higher_is_better = False
    ideal = 0.0
    description = "KL divergence from the float model's softmax"

    def compute(self, outputs, ref):
        return mean_kl(_classification(ref.outputs, self.name), _classification(outputs, self.name))


def metric(name: str) -> Metric:
    """An instance of the registered metric `name` (UnknownNameError lists the known ones)."""
    return METRICS.get(name)()


@dataclass(frozen=True)
class MetricValue:
    """One metric on both models. drop > 0 means the quantized model is worse (in the metric's unit)."""

    name: str
    unit: str
    higher_is_better: bool
    float_value: float
    quantized_value: float

    @property
    def drop(self) -> float | None:
        """How much worse the quantized model is; None when a side is not finite (SQNR's +inf)."""
        if not (math.isfinite(self.float_value) and math.isfinite(self.quantized_value)):
            return None
        diff = self.float_value - self.quantized_value
        return diff if self.higher_is_better else -diff

    def as_dict(self) -> dict:
        return {"unit": self.unit, "higher_is_better": self.higher_is_better, "float": self.float_value,
                "quantized": self.quantized_value, "drop": self.drop}


def resolve_metrics(requested: Sequence[str], required: Sequence[str], shapes: Sequence[tuple | None],
                    has_labels: bool, source: str = "--metrics") -> list[str]:
    """The metric names to compute: the requested ones (or the defaults that apply) plus `required`
    (gate metrics). A named metric that cannot be computed is a DataError naming the reason."""
    names: list[str] = []
    for name in list(requested) + [r for r in required if r not in requested]:
        reason = metric(name).applies(shapes, has_labels)
        if reason:
            raise DataError(f"{source}: metric '{name}' {reason}")
        names.append(name)
    if not requested:  # the defaults that apply, in their order, then required plugin metrics
        defaults = [n for n in DEFAULT_METRICS if n in names or not metric(n).applies(shapes, has_labels)]
        names = defaults + [n for n in names if n not in defaults]
    return names


def compute_metrics(names: Sequence[str], outputs: list[np.ndarray], ref: Reference) -> dict[str, MetricValue]:
    result = {}
    for name in names:
        m = metric(name)
        result[name] = MetricValue(name, m.unit, m.higher_is_better, float(m.compute(ref.outputs, ref)),
                                   float(m.compute(outputs, ref)))
    return result
