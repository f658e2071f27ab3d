"""Run float and quantized models on the same data and compare them.

Classification outputs ([N, classes]) give top-1/top-5 (when labels exist) and agreement of
the quantized model's top-1 with the float model's; every output also gets SQNR in dB,
10·log10(Σ f² / Σ (f − q)²), cosine similarity and the maximum absolute difference. The named
metrics of qcompile.metrics (built-in or plugins) are computed on both models (`evaluate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from .data import Dataset
from .metrics import MetricValue, Reference, compute_metrics, cosine_similarity, sqnr_db, topk_accuracy
from .runtime import session

__all__ = ["Comparison", "SubsetDataset", "compare", "evaluate", "run_outputs", "session", "sqnr_db", "subset"]

def run_outputs(model: str | onnx.ModelProto, dataset: Dataset, batch_size: int,
                progress=lambda it, total, desc: it, desc: str = "evaluating", threads: int = 0) -> list[np.ndarray]:
    sess = session(model, threads)
    chunks: list[list[np.ndarray]] = []
    for feeds in progress(dataset.batches(batch_size), len(dataset), desc):
        chunks.append(sess.run(None, feeds))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


class SubsetDataset(Dataset):
    """Some samples of a data set (by index), e.g. the small set sensitivity variants run on."""

    def __init__(self, parent: Dataset, indices: np.ndarray):
        labels = parent.labels[indices] if parent.labels is not None else None
        super().__init__(f"{parent.source}[{len(indices)} of {len(parent)}]", len(indices), labels)
        self.parent = parent
        self.indices = np.asarray(indices)

    def _slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        parts = [self.parent._slice(int(i), int(i) + 1) for i in self.indices[start:stop]]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def subset_indices(count: int, samples: int) -> np.ndarray:
    """`samples` indices spread evenly over [0, count) (all of them when samples >= count)."""
    if samples >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, samples).round().astype(np.int64))


def subset(dataset: Dataset, samples: int) -> Dataset:
    """Evenly spaced samples, so a data set sorted by class still gives every class a share."""
    if samples >= len(dataset):
        return dataset
    return SubsetDataset(dataset, subset_indices(len(dataset), samples))


@dataclass
class Comparison:
    samples: int
    outputs: list[dict] = field(default_factory=list)
    float_metrics: dict = field(default_factory=dict)
    quantized_metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "float": self.float_metrics, "quantized": self.quantized_metrics,
                "outputs": self.outputs}


def compare(float_outputs: list[np.ndarray], quant_outputs: list[np.ndarray], names: list[str],
            labels: np.ndarray | None) -> Comparison:
    result = Comparison(samples=len(float_outputs[0]))
    for name, f, q in zip(names, float_outputs, quant_outputs):
        result.outputs.append({"name": name, "sqnr_db": sqnr_db(f, q),
                               "max_abs_diff": float(np.max(np.abs(f.astype(np.float64) - q)))})
    for entry, f, q in zip(result.outputs, float_outputs, quant_outputs):
        entry["cosine"] = cosine_similarity(f, q)
    first_f, first_q = float_outputs[0], quant_outputs[0]
    if first_f.ndim == 2 and first_f.shape[1] > 1:
        result.quantized_metrics["agreement_top1"] = float(np.mean(first_f.argmax(1) == first_q.argmax(1)))
        if labels is not None and len(labels) == len(first_f):
            for key, logits in (("float", first_f), ("quantized", first_q)):
                metrics = result.float_metrics if key == "float" else result.quantized_metrics
                metrics["top1"] = topk_accuracy(logits, labels, 1)
                metrics["top5"] = topk_accuracy(logits, labels, 5)
    return result


def evaluate(float_outputs: list[np.ndarray], quant_outputs: list[np.ndarray], names: Sequence[str],
             labels: np.ndarray | None, metric_names: Sequence[str]) -> tuple[dict, dict[str, MetricValue]]:
    """The report's `evaluation` section (per-output figures, legacy fractions, named metrics) and
    the metric values themselves, for the gate.

    `float` / `quantized` keep schema-1 keys (fractions: top1 0.8875); `metrics` holds every named
    metric in its own unit (top1 88.75 %), with the drop the gate reads."""
    result = compare(float_outputs, quant_outputs, list(names), labels).as_dict()
    values = compute_metrics(metric_names, quant_outputs, Reference(tuple(names), float_outputs, labels))
    result["metrics"] = {name: value.as_dict() for name, value in values.items()}
    return result, values
