"""aciq_clip: recovers α = k(M)·b on Laplace data, one-sided for unsigned tensors, never widens.

The expected ranges use papers.md §2.1's constants (two-sided 8-bit Laplace 9.8968, one-sided
8-bit Laplace 11.16, Gaussian 3.9240) and statistics computed here with numpy.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.data import DataSource, model_inputs
from qcompile.importer import import_model
from qcompile.pipeline import PassContext, PassManager
from qcompile.recipe import ActivationQuant, Quantization, WeightQuant
from qcompile.registry import PASSES, load_builtins_and_entry_points

load_builtins_and_entry_points()
LAPLACE_8 = 9.8968  # papers.md §2.1, two-sided, M = 8
LAPLACE_8_ONE_SIDED = 11.16  # papers.md §2.1, one-sided M = 8 (= two-sided M = 9)
GAUSSIAN_8 = 3.9240
B = 0.7


def _model(tmp_path, weight=None):
    """x -> Conv(w) -> c;  c -> MaxPool -> pooled;  c -> Relu -> relu (c has two uses: not fused)."""
    weight = np.ones((1, 1, 1, 1), np.float32) if weight is None else weight
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("MaxPool", ["c"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["relu"], name="relu")]
    out_channels = weight.shape[0]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1], 16, 16])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", out_channels, 8, 8]),
         helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["N", out_channels, 16, 16])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


def _run(tmp_path, x, activations, steps, weights=None, model_weight=None):
    np.savez(tmp_path / "calib.npz", x=x)
    graph = import_model(_model(tmp_path, model_weight))
    source = DataSource(str(tmp_path / "calib.npz"), tuple(model_inputs(graph)), None, 32)
    scheme = Quantization(activations=activations, weights=weights or WeightQuant())
    ctx = PassContext(scheme=scheme, calibration=source)
    PassManager([PASSES.get(n)(PASSES.get(n).Options(**o)) for n, o in steps]).run(graph, ctx)
    return graph, ctx


def _ranges(graph) -> dict[str, tuple[float, float, float]]:
    return {name: (float(v.qparams.lo), float(v.qparams.hi), float(v.qparams.scale))
            for name, v in graph.values.items() if v.qparams is not None and not v.is_const}


@pytest.fixture(scope="module")
def laplace_x():
    return np.random.default_rng(0).laplace(0.1, B, (256, 1, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("activations", [
    ActivationQuant(calibrator="max"),  # no statistics kept: the pass collects them itself
    ActivationQuant(calibrator="percentile", calibrator_options={"percentile": 99.999}),  # reuses the histogram
], ids=["max", "percentile"])
def test_recovers_laplace_alpha(tmp_path, laplace_x, activations):
    steps = [("annotate", {}), ("calibrate", {}), ("aciq_clip", {"outputs": True, "prior": "laplace"})]
    graph, ctx = _run(tmp_path, laplace_x, activations, steps)
    x = laplace_x.astype(np.float64).ravel()
    mu, b = x.mean(), np.abs(x - x.mean()).mean()
    for name in ("x", "c"):  # the Conv multiplies by 1: the same data
        lo, hi, scale = _ranges(graph)[name]
        assert hi == pytest.approx(abs(mu) + LAPLACE_8 * b, rel=2e-3) and lo == -hi
        assert (hi - abs(mu)) / B == pytest.approx(LAPLACE_8, rel=2e-2)  # the true b of the source
        assert scale == pytest.approx(hi / 127, rel=1e-6)
    # unsigned (after Relu): one-sided window [0, max(mu, 0) + k(M + 1) b] of the data it sees
    r = np.maximum(x, 0.0)
    mu_r, b_r = r.mean(), np.abs(r - r.mean()).mean()
    lo, hi, scale = _ranges(graph)["relu"]
    assert lo == 0.0 and hi == pytest.approx(mu_r + LAPLACE_8_ONE_SIDED * b_r, rel=2e-3)
    assert scale == pytest.approx(hi / 255, rel=1e-6)
    # MaxPool shares the Conv output's scale and follows it
    assert graph.values["pooled"].qparams is graph.values["c"].qparams
    assert {n["tensor"] for n in ctx.notes["aciq_clip"]} == {"x", "c", "relu"}


def test_graph_outputs_are_left_alone_by_default(tmp_path, laplace_x):
    before, _ = _run(tmp_path, laplace_x, ActivationQuant(), [("annotate", {}), ("calibrate", {})])
    after, ctx = _run(tmp_path, laplace_x, ActivationQuant(), [("annotate", {}), ("calibrate", {}),
                                                               ("aciq_clip", {"prior": "laplace"})])
    assert _ranges(after)["relu"] == _ranges(before)["relu"]  # 'relu' is a graph output
    assert _ranges(after)["x"][2] < _ranges(before)["x"][2]
    assert {"skipped_graph_outputs": 1} in ctx.notes["aciq_clip"]


def test_gaussian_prior(tmp_path):
    x = np.random.default_rng(1).normal(0.0, 1.3, (256, 1, 16, 16)).astype(np.float32)
    graph, _ = _run(tmp_path, x, ActivationQuant(), [("annotate", {}), ("calibrate", {}),
                                                      ("aciq_clip", {"prior": "gaussian"})])
    data = x.astype(np.float64).ravel()
    _, hi, _ = _ranges(graph)["x"]
    assert hi == pytest.approx(abs(data.mean()) + GAUSSIAN_8 * data.std(ddof=1), rel=1e-3)


@pytest.mark.parametrize("activations", [
    ActivationQuant(calibrator="percentile", calibrator_options={"percentile": 99.0}),
    ActivationQuant(calibrator="max"),
], ids=["percentile99", "max_uniform"])
def test_never_widens_a_range(tmp_path, laplace_x, activations):
    # 99th percentile of |Laplace| ~ 4.6 b < 9.9 b; uniform data has max < k(8) b (b = 1/4 of the width)
    x = laplace_x if activations.calibrator == "percentile" else \
        np.random.default_rng(2).uniform(-1, 1, laplace_x.shape).astype(np.float32)
    before, _ = _run(tmp_path, x, activations, [("annotate", {}), ("calibrate", {})])
    after, ctx = _run(tmp_path, x, activations, [("annotate", {}), ("calibrate", {}), ("aciq_clip", {})])
    old, new = _ranges(before), _ranges(after)
    assert old.keys() == new.keys()
    for name in old:
        assert new[name][2] <= old[name][2], name
        assert old[name][0] <= new[name][0] <= new[name][1] <= old[name][1], name
    assert new == old  # here ACIQ's window is wider than every calibrated range
    assert "aciq_clip" not in ctx.notes or all("tensor" not in n for n in ctx.notes["aciq_clip"])


def test_weights_option_clips_per_tensor_weights_only(tmp_path, laplace_x):
    weight = np.random.default_rng(3).laplace(0.0, 0.05, (64, 1, 1, 1)).astype(np.float32)
    weight[0, 0, 0, 0] = 1.0  # an outlier: max calibration puts the range at 1.0
    per_tensor = WeightQuant(granularity="per_tensor")
    steps = [("annotate", {}), ("calibrate", {}), ("aciq_clip", {"weights": True, "prior": "laplace"})]
    graph, _ = _run(tmp_path, laplace_x, ActivationQuant(), steps, weights=per_tensor, model_weight=weight)
    w = weight.astype(np.float64).ravel()
    mad = np.abs(w - w.mean()).mean()
    qp = graph.values["w"].qparams
    assert float(qp.hi) == pytest.approx(abs(w.mean()) + LAPLACE_8 * mad, rel=1e-2)
    assert float(qp.scale) == pytest.approx(float(qp.hi) / 127, rel=1e-6)  # narrow symmetric weights

    graph, ctx = _run(tmp_path, laplace_x, ActivationQuant(), steps, model_weight=weight)  # per channel
    assert float(graph.values["w"].qparams.scale.max()) == pytest.approx(1.0 / 127, rel=1e-6)
    assert {"skipped_per_channel": 1} in ctx.notes["aciq_clip"]


def _data_mse(x: np.ndarray, qp) -> float:
    """Clipping + rounding MSE of x under qp, computed directly on the samples."""
    scale, zero_point = float(qp.scale), float(qp.zero_point)
    codes = np.clip(np.round(x / scale) + zero_point, qp.spec.qmin, qp.spec.qmax)
    return float(np.mean(((codes - zero_point) * scale - x) ** 2))


def test_mix_keeps_the_outliers_a_prior_would_clip(tmp_path):
    """A narrow body with 1% outliers at ±6 (a residual sum's shape): Laplace's k(8)·b window cuts the
    outliers; mix scores it on the data and keeps the calibrated range instead."""
    rng = np.random.default_rng(5)
    x = rng.laplace(0.0, 0.1, (256, 1, 16, 16))
    outliers = rng.random(x.shape) < 0.01
    x = np.where(outliers, np.sign(x) * 6.0, x).astype(np.float32)
    data = x.astype(np.float64).ravel()
    calibrated, _ = _run(tmp_path, x, ActivationQuant(), [("annotate", {}), ("calibrate", {})])
    laplace, _ = _run(tmp_path, x, ActivationQuant(), [("annotate", {}), ("calibrate", {}),
                                                        ("aciq_clip", {"prior": "laplace"})])
    mixed, ctx = _run(tmp_path, x, ActivationQuant(), [("annotate", {}), ("calibrate", {}), ("aciq_clip", {})])
    assert _ranges(laplace)["x"][1] < 3.0  # the prior's window, far inside the outliers
    assert _ranges(mixed)["x"] == _ranges(calibrated)["x"]
    errors = {name: _data_mse(data, g.values["x"].qparams) for name, g in
              (("calibrated", calibrated), ("laplace", laplace))}
    assert errors["calibrated"] < 0.01 * errors["laplace"], errors
    assert "aciq_clip" not in ctx.notes or all("tensor" not in n for n in ctx.notes["aciq_clip"])


def test_mix_clips_laplace_weights_at_four_bits(tmp_path):
    """At 4 bits clipping pays on Laplace data: mix picks the Laplace window for a per-tensor weight,
    and the weight's own MSE (computed here from the values) is lower than with its max range."""
    rng = np.random.default_rng(6)
    weight = rng.laplace(0.0, 0.05, (256, 16, 1, 1)).astype(np.float32)
    x = rng.standard_normal((8, 16, 16, 16)).astype(np.float32)
    weights = WeightQuant(bits=4, granularity="per_tensor")
    calibrated, _ = _run(tmp_path, x, ActivationQuant(), [("annotate", {}), ("calibrate", {})],
                         weights=weights, model_weight=weight)
    mixed, ctx = _run(tmp_path, x, ActivationQuant(), [("annotate", {}), ("calibrate", {}),
                                                        ("aciq_clip", {"weights": True})],
                      weights=weights, model_weight=weight)
    note = next(n for n in ctx.notes["aciq_clip"] if n.get("tensor") == "w")
    assert note["prior"] == "laplace"
    data = weight.astype(np.float64).ravel()
    before, after = (_data_mse(data, g.values["w"].qparams) for g in (calibrated, mixed))
    assert after < 0.7 * before, (before, after)
