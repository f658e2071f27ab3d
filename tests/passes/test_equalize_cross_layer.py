"""equalize_cross_layer keeps float outputs, reaches the paper's fixed point and keeps ReLU6 exact."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # tests/: conftest helpers

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import EXAMPLE, SHARED, max_rel_err, ort_run, run_passes, save_graph
from qcompile.compiler import compile_model
from qcompile.registry import PASSES, load_builtins_and_entry_points

load_builtins_and_entry_points()
EFFNET = SHARED / "models" / "efficientnet_lite0_bn.onnx"
PPOCR = SHARED / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
IMAGES = SHARED / "data" / "imagenet_sample_dev.npz"


# ---- helpers ------------------------------------------------------------------------------------
def _cle(**options):
    cls = PASSES.get("equalize_cross_layer")
    return cls(cls.Options(**options))


def _conv_weight(rng, cout, cin, k, spread=1.5):
    """Random weight whose output channels span 10^±spread in range (what CLE is for)."""
    return rng.standard_normal((cout, cin, k, k)) * 10 ** rng.uniform(-spread, spread, (cout, 1, 1, 1))


def _w(graph, node_name):
    return next(n for n in graph.nodes if n.name == node_name).inputs[1].const


def _b(graph, node_name):
    return next(n for n in graph.nodes if n.name == node_name).inputs[2].const


def _out_ranges(w):
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def _in_ranges(w, group=1):
    cout, cin_g = w.shape[:2]
    return np.abs(w).reshape(group, cout // group, cin_g, -1).max(axis=(1, 3)).reshape(-1)


# ---- random small graphs ------------------------------------------------------------------------
def _random_graph(kind, rng):
    """(nodes, initializers, x shape, y shape) of a small seeded graph of one kind."""
    c = lambda *a: rng.standard_normal(a)  # noqa: E731
    six = {"zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    if kind == "conv_relu_conv":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
                 helper.make_node("Relu", ["a"], ["r"]),
                 helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
        inits = {"w1": _conv_weight(rng, 6, 4, 3), "b1": c(6), "w2": _conv_weight(rng, 5, 6, 1), "b2": c(5)}
        return nodes, inits, (2, 4, 7, 7), (2, 5, 7, 7)
    if kind == "conv_relu6_conv":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
                 helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                 helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="c2")]
        inits = {"w1": _conv_weight(rng, 8, 3, 3), "b1": 2 * c(8), "w2": _conv_weight(rng, 4, 8, 3), "b2": c(4), **six}
        return nodes, inits, (2, 3, 6, 6), (2, 4, 6, 6)
    if kind == "depthwise_triple":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="expand"),
                 helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                 helper.make_node("Pad", ["r", "pads"], ["p"]),
                 helper.make_node("Conv", ["p", "wd", "bd"], ["d"], group=8, strides=[2, 2], name="dw"),
                 helper.make_node("Clip", ["d", "zero", "six"], ["rd"]),
                 helper.make_node("Conv", ["rd", "w3", "b3"], ["y"], name="project")]
        inits = {"w1": _conv_weight(rng, 8, 4, 1), "b1": 2 * c(8), "wd": _conv_weight(rng, 8, 1, 3), "bd": c(8),
                 "w3": _conv_weight(rng, 4, 8, 1), "b3": c(4), "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64),
                 **six}
        return nodes, inits, (1, 4, 9, 9), (1, 4, 4, 4)
    if kind == "grouped":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], group=2, pads=[1, 1, 1, 1], name="g1"),
                 helper.make_node("LeakyRelu", ["a"], ["r"], alpha=0.1),
                 helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Conv", ["m", "w2", "b2"], ["y"], group=2, name="g2")]
        inits = {"w1": _conv_weight(rng, 8, 2, 3), "b1": c(8), "w2": _conv_weight(rng, 6, 4, 3), "b2": c(6)}
        return nodes, inits, (2, 4, 8, 8), (2, 6, 2, 2)
    if kind == "gemm_head":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
                 helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                 helper.make_node("GlobalAveragePool", ["r"], ["gp"]),
                 helper.make_node("Flatten", ["gp"], ["f"]),
                 helper.make_node("Gemm", ["f", "wg", "bg"], ["h"], transB=1, name="fc1"),
                 helper.make_node("Relu", ["h"], ["hr"]),
                 helper.make_node("Gemm", ["hr", "wg2", "bg2"], ["y"], name="fc2")]
        inits = {"w1": _conv_weight(rng, 6, 3, 3), "b1": np.abs(c(6)), "wg": c(5, 6) * 10 ** rng.uniform(-1, 1, (1, 6)),
                 "bg": np.abs(c(5)), "wg2": c(5, 3), "bg2": c(3), **six}
        return nodes, inits, (2, 3, 5, 5), (2, 3)
    if kind == "flatten_gemm":
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], strides=[2, 2], name="c1"),
                 helper.make_node("PRelu", ["a", "slope"], ["r"]),
                 helper.make_node("Flatten", ["r"], ["f"]),
                 helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1, name="fc")]
        inits = {"w1": _conv_weight(rng, 3, 2, 3), "b1": c(3), "slope": np.abs(c(3, 1, 1)) * 0.2,
                 "wg": c(4, 3 * 3 * 3), "bg": c(4)}
        return nodes, inits, (2, 2, 7, 7), (2, 4)
    raise ValueError(kind)


KINDS = ["conv_relu_conv", "conv_relu6_conv", "depthwise_triple", "grouped", "gemm_head", "flatten_gemm"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_random_graphs_keep_float_outputs(tmp_path, kind, seed):
    rng = np.random.default_rng(1000 * seed + KINDS.index(kind))
    nodes, inits, x_shape, y_shape = _random_graph(kind, rng)
    path = save_graph(tmp_path, nodes, inits, x_shape, y_shape)
    graph, out, records, _ = run_passes(path, tmp_path, [_cle()])
    assert records[0].stats["links"] >= 1 and records[0].stats["converged"]
    x = (3 * rng.standard_normal(x_shape)).astype(np.float32)
    expected, got = ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert max_rel_err(expected, got) <= 1e-4
    changed = [n for n in graph.nodes if n.op_type in ("Conv", "Gemm") and n.inputs[1].name not in inits]
    assert changed, "nothing was rescaled"


def test_relu6_clip_is_active_and_kept_exact(tmp_path):
    """Inputs large enough that many values exceed 6: the per-channel clip must reproduce them."""
    rng = np.random.default_rng(7)
    nodes, inits, x_shape, y_shape = _random_graph("conv_relu6_conv", rng)
    path = save_graph(tmp_path, nodes, inits, x_shape, y_shape)
    graph, out, _, _ = run_passes(path, tmp_path, [_cle()])
    x = (10 * rng.standard_normal(x_shape)).astype(np.float32)
    pre = np.einsum("oikl,nihw->nohw", inits["w1"][:, :, 1:2, 1:2], x)  # centre tap only: rough check
    assert (np.abs(pre) > 6).mean() > 0.1
    expected, got = ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert max_rel_err(expected, got) <= 1e-4
    ops = [n.op_type for n in graph.nodes]
    assert "Relu" not in ops and ops.count("Clip") == 1 and ops.count("Min") == 1  # ReLU6 not turned into ReLU


# ---- hand-worked graphs: the paper's formula, computed here -------------------------------------
def test_hand_worked_pair_with_relu6_and_batchnorm(tmp_path):
    w1 = np.array([[[[4.0]], [[-2.0]]], [[[0.5]], [[0.25]]], [[[1.0]], [[-3.0]]]])  # 3 out, 2 in, 1x1
    b1 = np.array([1.0, -0.5, 2.0])
    w2 = np.array([[[[1.0]], [[8.0]], [[0.5]]], [[[-2.0]], [[1.0]], [[-0.75]]]])  # 2 out, 3 in
    b2 = np.array([0.1, -0.2])
    ones, zeros = np.ones(3), np.zeros(3)
    gamma, beta = np.array([2.0, 0.5, 1.5]), np.array([1.0, -1.0, 3.0])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["n"], epsilon=0.0),
             helper.make_node("Clip", ["n", "zero", "six"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "gamma": gamma, "beta": beta, "mean": zeros, "var": ones,
             "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    path = save_graph(tmp_path, nodes, inits, (1, 2, 3, 3), (1, 2, 3, 3))
    graph, out, records, _ = run_passes(path, tmp_path, [PASSES.get("fold_batchnorm")(), _cle()])
    # BN folded by hand (mean 0, var 1, eps 0): W1f = gamma * W1, b1f = gamma * b1 + beta
    w1f, b1f = w1 * gamma[:, None, None, None], gamma * b1 + beta
    r1 = np.abs(w1f).reshape(3, -1).max(1)  # [8, 0.25, 4.5]
    r2 = np.abs(w2).reshape(2, 3).max(0)  # [2, 8, 0.75]
    s = np.sqrt(r1 / r2)
    np.testing.assert_allclose(_w(graph, "c1"), w1f / s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(_b(graph, "c1"), b1f / s, rtol=1e-6)
    np.testing.assert_allclose(_w(graph, "c2"), w2 * s[None, :, None, None], rtol=1e-6)
    np.testing.assert_allclose(_b(graph, "c2"), b2, rtol=1e-6)
    np.testing.assert_allclose(_out_ranges(_w(graph, "c1")), np.sqrt(r1 * r2), rtol=1e-6)  # both ranges equal
    np.testing.assert_allclose(_in_ranges(_w(graph, "c2")), np.sqrt(r1 * r2), rtol=1e-6)
    bn = next(n for n in graph.nodes if n.name == "c1").meta["batchnorm"]
    np.testing.assert_allclose(bn["gamma"], gamma / s, rtol=1e-6)
    np.testing.assert_allclose(bn["beta"], beta / s, rtol=1e-6)
    # ReLU6 kept exact: Clip(0, max 6/s) then Min with 6/s per channel, shape [C, 1, 1]
    clip = next(n for n in graph.nodes if n.op_type == "Clip")
    minimum = next(n for n in graph.nodes if n.op_type == "Min")
    np.testing.assert_allclose(float(clip.inputs[2].const), (6 / s).max(), rtol=1e-6)
    assert minimum.inputs[0] is clip.outputs[0] and minimum.inputs[1].const.shape == (3, 1, 1)
    np.testing.assert_allclose(minimum.inputs[1].const.reshape(-1), 6 / s, rtol=1e-6)
    assert records[1].stats["sweeps"] == 2  # one sweep to the fixed point, one to see it stays
    x = np.random.default_rng(3).uniform(-4, 4, (1, 2, 3, 3)).astype(np.float32)
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-5


def _triple_model(tmp_path):
    w0 = np.array([[[[2.0]]], [[[0.1]]], [[[-4.0]]]])  # 3 out, 1 in, 1x1
    wd = np.array([[[[1.0, -3.0]]], [[[0.2, 0.1]]], [[[5.0, 0.5]]]])  # depthwise 3 ch, 1x2
    w2 = np.array([[[[0.5]], [[4.0]], [[-0.25]]]])  # 1 out, 3 in
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wd", "bd"], ["d"], group=3, name="dw"),
             helper.make_node("Relu", ["d"], ["rd"]),
             helper.make_node("Conv", ["rd", "w2", "b2"], ["y"], name="c2")]
    inits = {"w0": w0, "b0": np.array([0.5, 0.1, -1.0]), "wd": wd, "bd": np.array([0.2, -0.3, 1.0]), "w2": w2,
             "b2": np.array([0.3])}
    return save_graph(tmp_path, nodes, inits, (1, 1, 2, 3), (1, 1, 2, 2)), inits


@pytest.mark.parametrize("mode", ["closed_form", "pairwise"])
def test_hand_worked_depthwise_triple(tmp_path, mode):
    path, p = _triple_model(tmp_path)
    graph, out, records, _ = run_passes(path, tmp_path, [_cle(depthwise=mode, tolerance=1e-10, max_iterations=500)])
    r0 = np.abs(p["w0"]).reshape(3, -1).max(1)
    r1 = np.abs(p["wd"]).reshape(3, -1).max(1)
    r2 = np.abs(p["w2"]).reshape(1, 3).max(0)
    c = np.cbrt(r0 * r1 * r2)  # AIMET / papers.md §1.2: all three ranges become c
    s12, s23 = r0 / c, c / r2
    tol = dict(rtol=1e-6) if mode == "closed_form" else dict(rtol=1e-5)
    np.testing.assert_allclose(_w(graph, "c0"), p["w0"] / s12[:, None, None, None], **tol)
    np.testing.assert_allclose(_b(graph, "c0"), p["b0"] / s12, **tol)
    np.testing.assert_allclose(_w(graph, "dw"), p["wd"] * (s12 / s23)[:, None, None, None], **tol)
    np.testing.assert_allclose(_b(graph, "dw"), p["bd"] / s23, **tol)
    np.testing.assert_allclose(_w(graph, "c2"), p["w2"] * s23[None, :, None, None], **tol)
    if mode == "closed_form":
        assert records[0].stats["triples"] == 1 and records[0].stats["sweeps"] == 2
    else:
        assert records[0].stats["triples"] == 0 and records[0].stats["sweeps"] > 2
    x = np.random.default_rng(0).standard_normal((1, 1, 2, 3)).astype(np.float32)
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-5


def test_dead_channel_is_left_unscaled(tmp_path):
    w1 = np.array([[[[1.0]]], [[[1e-9]]], [[[0.01]]]])  # channel 1 is dead (weights ~0, like BN var 0)
    b1 = np.array([0.0, 3.0, 0.5])
    w2 = np.array([[[[2.0]], [[5.0]], [[1.0]]]])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    inits = {"w1": w1, "b1": b1, "w2": w2, "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    path = save_graph(tmp_path, nodes, inits, (1, 1, 2, 2), (1, 1, 2, 2))
    graph, out, records, _ = run_passes(path, tmp_path, [_cle()])
    s = np.sqrt(np.array([1.0, 1.0, 0.01]) / np.array([2.0, 5.0, 1.0]))
    s[1] = 1.0
    np.testing.assert_allclose(_w(graph, "c1").reshape(-1), w1.reshape(-1) / s, rtol=1e-6)
    np.testing.assert_allclose(_b(graph, "c1"), b1 / s, rtol=1e-6)  # the dead channel's bias 3.0 stays 3.0
    assert records[0].stats["dead_channels"] == 1
    x = np.random.default_rng(0).standard_normal((1, 1, 2, 2)).astype(np.float32)
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-5


def test_not_equalized_through_non_homogeneous_ops_or_shared_outputs(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
             helper.make_node("Sigmoid", ["a"], ["h"]),
             helper.make_node("Conv", ["h", "w2"], ["b"], name="c2"),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Conv", ["r", "w3"], ["c"], name="c3"),
             helper.make_node("Add", ["c", "r"], ["y"])]  # r has two uses: c2 -> c3 is not a link
    inits = {"w1": _conv_weight(rng, 3, 3, 1), "w2": _conv_weight(rng, 3, 3, 1), "w3": _conv_weight(rng, 3, 3, 1)}
    path = save_graph(tmp_path, nodes, inits, (1, 3, 2, 2), (1, 3, 2, 2))
    graph, _, records, _ = run_passes(path, tmp_path, [_cle()])
    assert records[0].stats["links"] == 0 and not records[0].modified
    for name, key in (("c1", "w1"), ("c2", "w2"), ("c3", "w3")):
        np.testing.assert_array_equal(_w(graph, name), inits[key].astype(np.float32))


def test_second_run_changes_nothing_and_keeps_one_min(tmp_path):
    rng = np.random.default_rng(5)
    nodes, inits, x_shape, y_shape = _random_graph("depthwise_triple", rng)
    path = save_graph(tmp_path, nodes, inits, x_shape, y_shape)
    graph, out, _, _ = run_passes(path, tmp_path, [_cle(), _cle()])
    assert [n.op_type for n in graph.nodes].count("Min") == 2
    x = (3 * rng.standard_normal(x_shape)).astype(np.float32)
    assert max_rel_err(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0]) <= 1e-4


# ---- real models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet_equalized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("effnet")
    folded, _, _, _ = run_passes(EFFNET, tmp, [PASSES.get("fold_batchnorm")()], "folded.onnx")
    graph, out, records, _ = run_passes(EFFNET, tmp, [PASSES.get("fold_batchnorm")(), _cle()])
    return folded, graph, out, records[1].stats


def test_efficientnet_float_outputs_unchanged(effnet_equalized):
    _, _, out, stats = effnet_equalized
    assert stats["converged"] and stats["links"] == 35 and stats["per_channel_clips"] == 33
    images = np.load(IMAGES)["images"][:2]
    for image in images:
        x = ((image[None].astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2).copy()
        assert max_rel_err(ort_run(EFFNET, {"input": x})[0], ort_run(out, {"input": x})[0]) <= 1e-4


def test_efficientnet_depthwise_spread_reduced(effnet_equalized):
    """max/median of per-channel max|W| of each depthwise conv: 3.3-17.5 before, <= 3.4 after (findings.md)."""
    folded, graph, _, _ = effnet_equalized

    def spreads(g):
        out = {}
        for n in g.nodes:
            if n.op_type == "Conv" and n.attr("group", 1) > 1:
                r = _out_ranges(n.inputs[1].const)
                out[n.name] = float(r.max() / np.median(r))
        return out
    before, after = spreads(folded), spreads(graph)
    assert len(before) == 16 and before.keys() == after.keys()
    assert all(after[k] < before[k] for k in before)
    assert max(before.values()) > 15 and max(after.values()) < 3.5


def test_efficientnet_dead_channels_are_guarded(effnet_equalized):
    """No bias of the equalized model grows out of the original's league (findings: a range of 535)."""
    folded, graph, _, stats = effnet_equalized
    assert stats["dead_channels"] > 100
    before = max(float(np.abs(n.inputs[2].const).max()) for n in folded.nodes if n.op_type == "Conv")
    after = max(float(np.abs(n.inputs[2].const).max()) for n in graph.nodes if n.op_type == "Conv")
    assert after < 10 * before


@pytest.mark.parametrize("path,shape", [(PPOCR, (2, 3, 48, 192)), (EXAMPLE / "digits_mobilenet_bn.onnx", None)])
def test_other_models_float_outputs_unchanged(tmp_path, path, shape):
    _, out, records, _ = run_passes(path, tmp_path, [PASSES.get("fold_batchnorm")(), _cle()])
    assert records[1].stats["links"] > 0
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    x = np.load(EXAMPLE / "test.npz")["input"][:8] if shape is None else \
        np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert max_rel_err(ort_run(path, {name: x})[0], ort_run(out, {name: x})[0]) <= 1e-4


def test_quantization_pipeline_handles_the_per_channel_min(tmp_path):
    """fold -> CLE -> annotate -> calibrate -> insert_qdq: Min is quantized as a clamp sharing its input's scale."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nquantization:\n  weights: {granularity: per_tensor}\n"
                      "passes: [fold_batchnorm, equalize_cross_layer, annotate, calibrate, insert_qdq]\n")
    out = tmp_path / "q.onnx"
    report = compile_model(EXAMPLE / "digits_mobilenet_bn.onnx", recipe, out, calib=EXAMPLE / "calib.npz")
    assert not [f for f in report.get("float_nodes", []) if f.get("op") == "Min"]
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mins = [n for n in model.graph.node if n.op_type == "Min"]
    assert mins
    for m in mins:
        dq = producers[m.input[0]]
        assert dq.op_type == "DequantizeLinear"
        q_after = [n for n in model.graph.node if m.output[0] in n.input]
        assert q_after and q_after[0].op_type == "QuantizeLinear"
        assert float(inits[q_after[0].input[1]]) == float(inits[dq.input[1]])  # same scale: a clamp on codes
    x = np.load(EXAMPLE / "test.npz")["input"][:64]
    name = model.graph.input[0].name
    reference, quantized = ort_run(EXAMPLE / "digits_mobilenet_bn.onnx", {name: x})[0], ort_run(out, {name: x})[0]
    assert np.mean(reference.argmax(1) == quantized.argmax(1)) >= 0.95
