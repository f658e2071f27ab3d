"""Per-layer figures for the report: SQNR of every quantized activation, and histograms.

For each QuantizeLinear -> DequantizeLinear pair of the quantized model, the DequantizeLinear
output (`<tensor>_dequantized`, or the graph output's own name) is compared with the tensor of the
same name in the float model, on a few samples:

- sqnr_db: 10·log10(Σf² / Σ(f − q)²) of the quantized model's tensor, so it includes every error
  made upstream (it falls along the network);
- local_sqnr_db: the float tensor quantized with the tensor's own scale / zero point and nothing
  else, i.e. the damage this quantizer alone does (clipping plus rounding);
- clip: the representable range [scale·(qmin − zp), scale·(qmax − zp)]; clipped: share of the float
  values outside it.

The tensors with the lowest local SQNR get an exact histogram of their float values (a second run
of the float model exposing only them), which the HTML report draws with the clip range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data import Dataset
from .runtime import session, with_outputs

__all__ = ["layer_report"]

_CODE_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
               np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535)}
HISTOGRAM_BINS = 100
_SUFFIX = "_dequantized"


@dataclass
class _Pair:
    tensor: str  # float model's name
    output: str  # the DequantizeLinear output in the quantized model
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    qmin: int
    qmax: int
    signal: float = 0.0
    noise: float = 0.0
    local_noise: float = 0.0
    count: int = 0
    clipped: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def clip_range(self) -> tuple[float, float]:
        s, z = self.scale.astype(np.float64), self.zero_point.astype(np.float64)
        return float(np.min(s * (self.qmin - z))), float(np.max(s * (self.qmax - z)))

    def _broadcast(self, param: np.ndarray, ndim: int) -> np.ndarray:
        if param.ndim == 0:
            return param
        shape = [1] * ndim
        shape[self.axis % ndim] = param.size
        return param.reshape(shape)

    def observe(self, f: np.ndarray, q: np.ndarray) -> None:
        f64 = f.astype(np.float64)
        scale = self._broadcast(self.scale.astype(np.float32), f.ndim)
        zp = self._broadcast(self.zero_point.astype(np.float32), f.ndim)
        codes = np.clip(np.rint(f.astype(np.float32) / scale) + zp, self.qmin, self.qmax)
        local = ((codes - zp) * scale).astype(np.float64)
        lo, hi = self.clip_range()
        self.signal += float(np.sum(f64**2))
        self.noise += float(np.sum((f64 - q.astype(np.float64)) ** 2))
        self.local_noise += float(np.sum((f64 - local) ** 2))
        self.count += f.size
        self.clipped += int(np.sum((f64 < lo) | (f64 > hi)))
        if f.size:
            self.lo, self.hi = min(self.lo, float(f.min())), max(self.hi, float(f.max()))

    @staticmethod
    def _db(signal: float, noise: float) -> float:
        if noise == 0:
            return math.inf
        return 10 * math.log10(signal / noise) if signal > 0 else -math.inf

    def row(self, producers: dict[str, onnx.NodeProto]) -> dict:
        node = producers.get(self.tensor)
        return {"tensor": self.tensor, "node": node.name if node is not None else "",
                "op": node.op_type if node is not None else "input",
                "sqnr_db": self._db(self.signal, self.noise), "local_sqnr_db": self._db(self.signal, self.local_noise),
                "clip": list(self.clip_range()), "observed": [self.lo, self.hi],
                "clipped": self.clipped / self.count if self.count else 0.0, "histogram": None}


def _qdq_pairs(model: onnx.ModelProto) -> list[_Pair]:
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        out = node.output[0]
        if out.endswith(_SUFFIX):
            tensor = out[: -len(_SUFFIX)]
        elif out in outputs:
            tensor = out
        else:
            continue
        if q.input[1] not in inits or q.input[2] not in inits:
            continue
        zero_point = numpy_helper.to_array(inits[q.input[2]])
        if zero_point.dtype not in _CODE_RANGE:
            continue
        axis = next((helper.get_attribute_value(a) for a in q.attribute if a.name == "axis"), 1)
        qmin, qmax = _CODE_RANGE[zero_point.dtype]
        pairs.append(_Pair(tensor, out, numpy_helper.to_array(inits[q.input[1]]), zero_point, axis, qmin, qmax))
    return pairs


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def layer_report(float_model: str | Path, quantized: onnx.ModelProto, data: Dataset, batch_size: int,
                 weights: list[dict] | None = None, histograms: int = 6) -> dict:
    """The report's `layers` section, computed on every sample of `data` (keep it small)."""
    reference = onnx.load(str(float_model))
    known = _tensor_names(reference)
    pairs = _qdq_pairs(quantized)
    skipped = sorted(p.tensor for p in pairs if p.tensor not in known)
    pairs = [p for p in pairs if p.tensor in known]
    producers = {o: n for n in reference.graph.node for o in n.output}
    order = {name: i for i, name in enumerate(o for n in reference.graph.node for o in n.output)}
    pairs.sort(key=lambda p: order.get(p.tensor, -1))
    rows: list[dict] = []
    if pairs:
        float_sess = session(with_outputs(reference, [p.tensor for p in pairs]))
        quant_sess = session(with_outputs(quantized, [p.output for p in pairs]))
        float_names = [o.name for o in float_sess.get_outputs()]
        quant_names = [o.name for o in quant_sess.get_outputs()]
        for feeds in data.batches(batch_size):
            f_out = dict(zip(float_names, float_sess.run(None, feeds)))
            q_out = dict(zip(quant_names, quant_sess.run(None, feeds)))
            for pair in pairs:
                pair.observe(f_out[pair.tensor], q_out[pair.output])
        rows = [p.row(producers) for p in pairs]
        _add_histograms(float_sess, data, batch_size, pairs, rows, histograms)
    return {"samples": len(data), "activations": rows, "weights": list(weights or []), "skipped": skipped}


def _add_histograms(float_sess, data: Dataset, batch_size: int, pairs: list[_Pair], rows: list[dict],
                    count: int) -> None:
    """Exact histograms of the float values of the `count` tensors with the lowest local SQNR."""
    worst = sorted(range(len(rows)), key=lambda i: rows[i]["local_sqnr_db"])[:count]
    if not worst:
        return
    edges = {}
    for i in worst:
        lo, hi = rows[i]["clip"]
        a, b = min(pairs[i].lo, lo), max(pairs[i].hi, hi)
        edges[i] = np.linspace(a, b if b > a else a + 1.0, HISTOGRAM_BINS + 1)
    counts = {i: np.zeros(HISTOGRAM_BINS, np.int64) for i in worst}
    names = [pairs[i].tensor for i in worst]
    for feeds in data.batches(batch_size):
        values = float_sess.run(names, feeds)
        for i, v in zip(worst, values):
            counts[i] += np.histogram(v, bins=edges[i])[0]
    for i in worst:
        rows[i]["histogram"] = {"edges": [float(e) for e in edges[i]], "counts": [int(c) for c in counts[i]]}
