"""Run float and quantized models on the same data and compare them.

Classification outputs ([N, classes]) give top-1/top-5 (when labels exist) and agreement of
the quantized model's top-1 with the float model's; every output also gets SQNR in dB,
10·log10(Σ f² / Σ (f − q)²), and the maximum absolute difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import Dataset


def session(model_path: str, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def run_outputs(model_path: str, dataset: Dataset, batch_size: int, progress=lambda it, total, desc: it,
                desc: str = "evaluating") -> list[np.ndarray]:
    sess = session(model_path)
    chunks: list[list[np.ndarray]] = []
    for feeds in progress(dataset.batches(batch_size), len(dataset), desc):
        chunks.append(sess.run(None, feeds))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = np.sum((reference - test.astype(np.float64)) ** 2)
    signal = np.sum(reference**2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


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
    first_f, first_q = float_outputs[0], quant_outputs[0]
    if first_f.ndim == 2 and first_f.shape[1] > 1:
        result.quantized_metrics["agreement_top1"] = float(np.mean(first_f.argmax(1) == first_q.argmax(1)))
        if labels is not None and len(labels) == len(first_f):
            for key, logits in (("float", first_f), ("quantized", first_q)):
                metrics = result.float_metrics if key == "float" else result.quantized_metrics
                metrics["top1"] = topk_accuracy(logits, labels, 1)
                metrics["top5"] = topk_accuracy(logits, labels, 5)
    return result
