"""absorb_high_bias moves exactly the paper's (or the provable) bias and keeps float outputs."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # tests/: conftest helpers

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import EXAMPLE, SHARED, max_rel_err, ort_run, run_passes, save_graph
from qcompile.registry import PASSES, load_builtins_and_entry_points

load_builtins_and_entry_points()
EFFNET = SHARED / "models" / "efficientnet_lite0_bn.onnx"
PPOCR = SHARED / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
IMAGES = SHARED / "data" / "imagenet_sample_dev.npz"
ZERO, SIX = np.array(0.0, np.float32), np.array(6.0, np.float32)


def _hba(**options):
    cls = PASSES.get("absorb_high_bias")
    return cls(cls.Options(**options))


def _node(graph, name):
    return next(n for n in graph.nodes if n.name == name)


def _bn_pair(tmp_path, w2, pads2=(0, 0, 0, 0), activation="clip"):
    """x -> Conv c1 (2 in, 3 out, 1x1) -> BN -> Clip(0,6) | Relu -> Conv c2 (W2) -> y, BN mean 0 var 1 eps 0."""
    w1 = np.array([[[[1.0]], [[0.5]]], [[[-1.0]], [[2.0]]], [[[0.25]], [[0.25]]]])
    b1 = np.array([0.5, -1.0, 0.0])
    gamma, beta = np.array([1.0, 0.5, -0.25]), np.array([4.0, 0.2, 2.0])  # c = max(0, beta - 3|gamma|) = [1, 0, 1.25]
    act = helper.make_node("Clip", ["n", "zero", "six"], ["r"]) if activation == "clip" else \
        helper.make_node("Relu", ["n"], ["r"])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["n"], epsilon=0.0),
             act,
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=list(pads2), name="c2")]
    inits = {"w1": w1, "b1": b1, "gamma": gamma, "beta": beta, "mean": np.zeros(3), "var": np.ones(3),
             "w2": w2, "b2": np.array([0.1, -0.3]), "zero": ZERO, "six": SIX}
    k = w2.shape[-1]
    out_hw = 4 - k + 1 + pads2[0] + pads2[2]
    path = save_graph(tmp_path, nodes, inits, (1, 2, 4, 4), (1, 2, out_hw, out_hw))
    w1f, b1f = w1 * gamma[:, None, None, None], gamma * b1 + beta  # BN folded by hand
    return path, w1f, b1f, inits


# ---- hand-worked: the paper's formula -----------------------------------------------------------
@pytest.mark.parametrize("activation", ["clip", "relu"])
def test_hand_worked_batchnorm_shift(tmp_path, activation):
    w2 = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2) / 10 - 0.5  # 2x2 kernel, no padding
    path, w1f, b1f, p = _bn_pair(tmp_path, w2, activation=activation)
    graph, out, records, _ = run_passes(path, tmp_path, [PASSES.get("fold_batchnorm")(), _hba(lower_bound="batchnorm")])
    gamma, beta = p["gamma"], p["beta"]
    c = np.maximum(0.0, beta - 3 * np.abs(gamma))  # DFQ §4.2: [1, 0, 1.25]
    w2_sum = w2.sum(axis=(2, 3))  # [out, in]: Σ over kernel taps
    np.testing.assert_allclose(_node(graph, "c1").inputs[2].const, b1f - c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_node(graph, "c2").inputs[2].const, p["b2"] + w2_sum @ c, rtol=1e-6)
    np.testing.assert_allclose(_node(graph, "c1").inputs[1].const, w1f, rtol=1e-6)  # weights untouched
    np.testing.assert_allclose(_node(graph, "c1").meta["batchnorm"]["beta"], beta - c, rtol=1e-6)
    if activation == "clip":  # clip(x - c, 0, 6 - c): the bound moves with the bias, per channel
        clip = next(n for n in graph.nodes if n.op_type == "Clip")
        minimum = next(n for n in graph.nodes if n.op_type == "Min")
        assert float(clip.inputs[2].const) == pytest.approx(6.0)  # max(6 - c) = 6 (channel 1 moves nothing)
        np.testing.assert_allclose(minimum.inputs[1].const.reshape(-1), 6.0 - c, rtol=1e-6)
    assert records[1].stats["absorbed_links"] == 1 and records[1].stats["absorbed_channels"] == 2
    # exact wherever every pre-activation of a moved channel is >= c: inputs near 0 give x ≈ BN beta
    x = np.random.default_rng(0).uniform(-0.1, 0.1, (1, 2, 4, 4)).astype(np.float32)
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-5


def test_hand_worked_interval_bound_is_exact_for_any_input(tmp_path):
    """Layer 1 reads Clip(0, 6) data, so x_i >= b_i + Σ min(W_i, 0)·6: that much moves, for every input."""
    w1 = np.array([[[[0.5]], [[-0.25]]], [[[-1.0]], [[0.5]]], [[[0.1]], [[0.2]]]])
    b1 = np.array([3.0, 1.0, 0.5])
    w2 = np.array([[[[1.0]], [[2.0]], [[-1.0]]], [[[0.5]], [[-0.5]], [[3.0]]]])
    nodes = [helper.make_node("Clip", ["x", "zero", "six"], ["xc"]),
             helper.make_node("Conv", ["xc", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": np.array([0.0, 1.0]), "zero": ZERO, "six": SIX}
    path = save_graph(tmp_path, nodes, inits, (1, 2, 3, 3), (1, 2, 3, 3))
    graph, out, records, _ = run_passes(path, tmp_path, [_hba()])
    lower = b1 + (np.minimum(w1, 0) * 6).reshape(3, -1).sum(1)  # [1.5, -5, 0.5]
    c = np.maximum(lower, 0.0)
    np.testing.assert_allclose(_node(graph, "c1").inputs[2].const, b1 - c, rtol=1e-6)
    np.testing.assert_allclose(_node(graph, "c2").inputs[2].const, inits["b2"] + w2.sum(axis=(2, 3)) @ c, rtol=1e-6)
    rng = np.random.default_rng(1)
    for x in (rng.uniform(-2, 8, (1, 2, 3, 3)), np.zeros((1, 2, 3, 3)), np.full((1, 2, 3, 3), 6.0),
              np.stack([np.zeros((3, 3)), np.full((3, 3), 6.0)])[None]):  # the extreme corner
        x = x.astype(np.float32)
        assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-5


def test_dead_channel_constant_is_absorbed(tmp_path):
    w1 = np.array([[[[1.0]]], [[[1e-9]]]])  # channel 1 outputs the constant 2.5 (weights ~0, BN variance 0)
    b1 = np.array([-0.5, 2.5])
    w2 = np.array([[[[2.0]], [[4.0]]]])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    path = save_graph(tmp_path, nodes, {"w1": w1, "b1": b1, "w2": w2}, (1, 1, 2, 2), (1, 1, 2, 2))
    graph, out, _, _ = run_passes(path, tmp_path, [_hba()])
    np.testing.assert_allclose(_node(graph, "c1").inputs[2].const, [-0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(_node(graph, "c2").inputs[2].const, [4.0 * 2.5], rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((1, 1, 2, 2)).astype(np.float32)
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-6


def test_identity_link_moves_the_whole_mean(tmp_path):
    w1, w2 = np.array([[[[1.0]]], [[[2.0]]]]), np.array([[[[0.5]], [[-1.0]]]])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("BatchNormalization", ["a", "g", "beta", "m", "v"], ["n"], epsilon=0.0),
             helper.make_node("Conv", ["n", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": w1, "b1": np.zeros(2), "g": np.ones(2), "beta": np.array([3.0, -2.0]), "m": np.zeros(2),
             "v": np.ones(2), "w2": w2, "b2": np.array([1.0])}
    path = save_graph(tmp_path, nodes, inits, (1, 1, 2, 2), (1, 1, 2, 2))
    graph, out, _, _ = run_passes(path, tmp_path, [PASSES.get("fold_batchnorm")(), _hba()])
    np.testing.assert_allclose(_node(graph, "c1").inputs[2].const, [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(_node(graph, "c2").inputs[2].const, [1.0 + 0.5 * 3.0 - 1.0 * -2.0], rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((1, 1, 2, 2)).astype(np.float32) * 10
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-5


# ---- zero padding -------------------------------------------------------------------------------
def test_padding_modes(tmp_path):
    w2 = np.random.default_rng(4).standard_normal((2, 3, 3, 3))
    path, _, b1f, p = _bn_pair(tmp_path, w2, pads2=(1, 1, 1, 1))
    x = np.random.default_rng(0).uniform(-0.1, 0.1, (1, 2, 4, 4)).astype(np.float32)  # x >= c everywhere
    expected = ort_run(path, {"x": x})[0]
    fold = PASSES.get("fold_batchnorm")

    graph, out, records, ctx = run_passes(path, tmp_path, [fold(), _hba(lower_bound="batchnorm")], "exact.onnx")
    assert records[1].stats["absorbed_links"] == 0 and records[1].stats["skipped_padded"] == 1
    assert "zero padding" in ctx.notes["not_absorbed"][0]["reason"]
    np.testing.assert_allclose(_node(graph, "c1").inputs[2].const, b1f, rtol=1e-6)

    graph, out, records, _ = run_passes(path, tmp_path, [fold(), _hba(lower_bound="batchnorm", padding="explicit")],
                                  "explicit.onnx")
    assert records[1].stats["explicit_pads"] == 1
    assert [n.op_type for n in graph.nodes].count("Pad") == 1 and _node(graph, "c2").attr("pads") == [0, 0, 0, 0]
    assert max_rel_err(expected, ort_run(out, {"x": x})[0]) <= 1e-5

    graph, out, records, _ = run_passes(path, tmp_path, [fold(), _hba(lower_bound="batchnorm", padding="ignore")],
                                  "ignore.onnx")
    assert records[1].stats["border_inexact"] == 1
    got = ort_run(out, {"x": x})[0]
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)  # inside: exact
    assert np.abs(got - expected).max() > 0.1  # the borders are what the paper's form gets wrong


# ---- random graphs ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_random_bounded_graphs_keep_float_outputs(tmp_path, seed):
    """Clip -> Conv(3x3, padded) -> Clip -> Pad -> depthwise -> Clip -> Conv(1x1): interval mode is exact."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Clip", ["x", "zero", "six"], ["xc"]),
             helper.make_node("Conv", ["xc", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
             helper.make_node("Pad", ["r", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "wd", "bd"], ["d"], group=6, name="dw"),
             helper.make_node("Clip", ["d", "zero", "six"], ["rd"]),
             helper.make_node("Conv", ["rd", "w3", "b3"], ["y"], name="c3")]
    inits = {"w1": rng.standard_normal((6, 3, 3, 3)) * 0.1, "b1": rng.uniform(0, 5, 6),
             "wd": rng.standard_normal((6, 1, 3, 3)) * 0.05, "bd": rng.uniform(1, 5, 6),
             "w3": rng.standard_normal((4, 6, 1, 1)), "b3": rng.standard_normal(4),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "zero": ZERO, "six": SIX}
    path = save_graph(tmp_path, nodes, inits, (2, 3, 6, 6), (2, 4, 6, 6))
    graph, out, records, _ = run_passes(path, tmp_path, [PASSES.get("equalize_cross_layer")(), _hba()])
    assert records[1].stats["absorbed_links"] >= 1  # dw -> c3 (c1 -> dw is padded: skipped)
    for x in (rng.uniform(-1, 7, (2, 3, 6, 6)), np.full((2, 3, 6, 6), 6.0)):
        x = x.astype(np.float32)
        assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-4


# ---- real models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet_images():
    images = np.load(IMAGES)["images"][[0, 1, 2]]
    return [((im[None].astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2).copy() for im in images]


def test_efficientnet_float_outputs_unchanged(tmp_path, effnet_images):
    passes = [PASSES.get("fold_batchnorm")(), PASSES.get("equalize_cross_layer")(), _hba()]
    _, out, records, _ = run_passes(EFFNET, tmp_path, passes)
    assert records[2].stats["absorbed_links"] >= 10 and records[2].stats["absorbed_channels"] > 500
    for x in effnet_images:
        assert max_rel_err(ort_run(EFFNET, {"input": x})[0], ort_run(out, {"input": x})[0]) <= 1e-4


def test_efficientnet_batchnorm_shift_is_not_exact(tmp_path, effnet_images):
    """Measured fact: pre-activations reach 5-22 sigma below BN's beta, so beta - 3|gamma| changes the model."""
    passes = [PASSES.get("fold_batchnorm")(), _hba(lower_bound="batchnorm")]
    _, out, _, _ = run_passes(EFFNET, tmp_path, passes)
    x = effnet_images[0]
    assert max_rel_err(ort_run(EFFNET, {"input": x})[0], ort_run(out, {"input": x})[0]) > 1e-3


@pytest.mark.parametrize("path,shape", [(PPOCR, (2, 3, 48, 192)), (EXAMPLE / "digits_mobilenet_bn.onnx", None)])
def test_other_models_float_outputs_unchanged(tmp_path, path, shape):
    passes = [PASSES.get("fold_batchnorm")(), PASSES.get("equalize_cross_layer")(), _hba()]
    _, out, _, _ = run_passes(path, tmp_path, passes)
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    x = np.load(EXAMPLE / "test.npz")["input"][:8] if shape is None else \
        np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert max_rel_err(ort_run(path, {name: x})[0], ort_run(out, {name: x})[0]) <= 1e-4
