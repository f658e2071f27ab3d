"""hswish_shift keeps float outputs, folds b - 3/8 W_sum as the formula says, and quantizes y + 3/8 unsigned."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE, SHARED, ort_run, write_recipe
from qcompile.compiler import compile_model
from qcompile.exporter import to_proto, write_model
from qcompile.importer import import_model
from qcompile.pipeline import PassContext, PassManager
from qcompile.registry import PASSES, load_builtins_and_entry_points

load_builtins_and_entry_points()
CLS = SHARED / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
D = 0.375


def _shift(path, tmp_path, *, fold=False, **options):
    graph = import_model(path)
    ctx = PassContext()
    shift = PASSES.get("hswish_shift")
    passes = ([PASSES.get("fold_batchnorm")()] if fold else []) + [shift(shift.Options(**options))]
    PassManager(passes).run(graph, ctx)
    return graph, write_model(to_proto(graph), tmp_path / "shifted.onnx"), ctx


def _assert_same(path, shifted, feeds):
    expected, got = ort_run(path, feeds), ort_run(shifted, feeds)
    for e, g in zip(expected, got):
        assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max()


def _save(tmp_path, nodes, inputs, outputs, inits, name="m.onnx", opset=14):
    initializers = [numpy_helper.from_array(np.asarray(a), n) for n, a in inits]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / name))
    return tmp_path / name


def _outputs(*names, rank=4):
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{n}_{i}" for i in range(rank)]) for n in names]


def _f32(v):
    return np.asarray(v, np.float32)


# ---- real models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("padding,shifted,padded", [("exact_pad", 9, 8), ("skip_padded", 1, 0)])
def test_ppocr_cls_float_outputs_unchanged(tmp_path, padding, shifted, padded):
    graph, out, ctx = _shift(CLS, tmp_path, fold=True, padding=padding)
    notes = ctx.notes["hswish_shifted"]
    assert len(notes) == shifted and sum(n["padded_consumers"] for n in notes) == padded
    assert {n["form"] for n in notes} == {"x*Clip(x+3,0,6)/6"}
    assert len(ctx.notes["hswish_not_shifted"]) == 18 - shifted  # SE-block (GlobalAveragePool, Mul) and MaxPool
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    _assert_same(CLS, out, {"x": x})


def test_digits_float_outputs_unchanged_and_nothing_qualifies(tmp_path, digits_model):
    graph, out, ctx = _shift(digits_model, tmp_path)
    # every HardSwish there also feeds an Add (residual), a GlobalAveragePool or the SE Mul
    assert "hswish_shifted" not in ctx.notes
    reasons = ctx.notes["hswish_not_shifted"]
    assert len(reasons) == 5 and all(r["form"] == "HardSwish" and "not a Conv or Gemm" in r["reason"] for r in reasons)
    _assert_same(digits_model, out, {"input": np.load(EXAMPLE / "test.npz")["input"][:8]})


# ---- the three h-swish forms on tiny graphs ---------------------------------------------------------
def _hswish_nodes(form: str) -> tuple[list, list]:
    """Nodes computing h = hswish(x) in the given form, and their constants."""
    consts = [("three", _f32(3.0)), ("zero", _f32(0.0)), ("six", _f32(6.0)), ("sixth", _f32(1 / 6))]
    if form == "HardSwish":
        return [helper.make_node("HardSwish", ["x"], ["h"])], []
    if form == "HardSigmoid":
        return [helper.make_node("HardSigmoid", ["x"], ["s"], alpha=1 / 6, beta=0.5),
                helper.make_node("Mul", ["s", "x"], ["h"])], []
    gate = [helper.make_node("Add", ["three", "x"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"])]
    if form == "AddClipMulDiv":
        return gate + [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["h"])], consts
    if form == "AddClipMulMulSixth":
        return gate + [helper.make_node("Mul", ["c", "x"], ["m"]),
                       helper.make_node("Mul", ["sixth", "m"], ["h"])], consts
    if form == "AddClipDivMul":  # x * (relu6(x + 3) / 6)
        return gate + [helper.make_node("Div", ["c", "six"], ["g"]), helper.make_node("Mul", ["g", "x"], ["h"])], consts
    raise AssertionError(form)


FORMS = ["HardSwish", "HardSigmoid", "AddClipMulDiv", "AddClipMulMulSixth", "AddClipDivMul"]


@pytest.mark.parametrize("form", FORMS)
def test_each_form_feeding_padded_convs_is_shifted_exactly(tmp_path, form):
    rng = np.random.default_rng(1)
    nodes, consts = _hswish_nodes(form)
    nodes += [helper.make_node("Conv", ["h", "w1", "b1"], ["y1"], pads=[1, 1, 1, 1]),  # 3x3, zero padded
              # depthwise, SAME_UPPER with stride 2 on 8x8: pads 0 before, 1 after
              helper.make_node("Conv", ["h", "w2"], ["y2"], group=3, auto_pad="SAME_UPPER", strides=[2, 2]),
              helper.make_node("Conv", ["h", "w3", "b3"], ["y3"])]  # 1x1, no padding
    inits = consts + [("w1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                      ("b1", _f32(rng.standard_normal(4))),
                      ("w2", rng.standard_normal((3, 1, 3, 3)).astype(np.float32)),
                      ("w3", rng.standard_normal((2, 3, 1, 1)).astype(np.float32)), ("b3", _f32([0.5, -0.5]))]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                 _outputs("y1", "y2", "y3"), inits)
    graph, out, ctx = _shift(path, tmp_path)
    (note,) = ctx.notes["hswish_shifted"]
    assert note["padded_consumers"] == 2 and len(note["consumers"]) == 3
    x = rng.uniform(-5, 5, (2, 3, 8, 8)).astype(np.float32)
    x[0, 0, 0, :3] = [-1.5, -3.0, 3.0]  # the minimum -3/8 and the kinks
    _assert_same(path, out, {"x": x})
    shifted = graph.values["h_shifted"]
    assert shifted.meta["nonnegative"] and shifted.producer.op_type == "Add"
    assert float(shifted.producer.inputs[1].const) == D
    pads = [n for n in graph.nodes if n.op_type == "Pad"]
    assert len(pads) == 2 and all(float(p.inputs[2].const) == D and p.outputs[0].meta["nonnegative"] for p in pads)
    assert all(not any(n.attr("pads", [0])) and n.attr("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
               for n in graph.nodes if n.op_type == "Conv")
    # the h-swish nodes and the shift are kept float, so y + 3/8 is quantized once
    assert all(n.meta.get("keep_float") for n in graph.nodes if n.op_type not in ("Conv",))
    # y + 3/8 >= 0 in onnxruntime, at -1.5 too
    model = onnx.load(str(out))
    model.graph.output.append(helper.make_tensor_value_info("h_shifted", TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "exposed.onnx"))
    assert ort_run(tmp_path / "exposed.onnx", {"x": x})[-1].min() >= 0.0


def test_gemm_consumers_honour_transb_alpha_beta(tmp_path):
    rng = np.random.default_rng(2)
    nodes, consts = _hswish_nodes("AddClipMulDiv")
    nodes += [helper.make_node("Gemm", ["h", "wt", "gc"], ["y1"], transB=1, alpha=0.5, beta=2.0),
              helper.make_node("Gemm", ["h", "w"], ["y2"], beta=3.0)]  # no C: one is made
    wt, w, c = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (6, 5), (4,)))
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                 _outputs("y1", "y2", rank=2),
                 consts + [("wt", wt), ("w", w), ("gc", c)])
    graph, out, ctx = _shift(path, tmp_path)
    _assert_same(path, out, {"x": rng.uniform(-5, 5, (8, 6)).astype(np.float32)})
    gemm1, gemm2 = (n for n in graph.nodes if n.op_type == "Gemm")
    np.testing.assert_allclose(gemm1.inputs[2].const, 2.0 * c - 0.5 * D * wt.sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(gemm2.inputs[2].const, -D * w.sum(axis=0), rtol=1e-6)
    assert gemm1.attr("beta") == 1.0 and gemm2.attr("beta") == 1.0


# ---- hand-worked bias fold ------------------------------------------------------------------------
def test_hand_worked_conv_bias(tmp_path):
    w = _f32([[[[1, 2], [3, 4]], [[-1, 0], [0.5, 0]]],     # out 0: taps of in 0, in 1
              [[[0, 0], [0, 1]], [[2, -2], [-0.25, 1]]]])  # out 1
    b = _f32([0.5, -1.0])
    dw = _f32([[[[1, 1], [1, -1]]], [[[0.5, 0.5], [2, 0]]]])  # depthwise: one input channel each
    path = _save(tmp_path, [helper.make_node("HardSwish", ["x"], ["h"]),
                            helper.make_node("Conv", ["h", "w", "b"], ["y"]),
                            helper.make_node("Conv", ["h", "dw"], ["z"], group=2)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                 _outputs("y", "z"),
                 [("w", w), ("b", b), ("dw", dw)])
    graph, _, _ = _shift(path, tmp_path)
    conv, depthwise = (n for n in graph.nodes if n.op_type == "Conv")
    # W_sum over input channels and taps: out 0: (1+2+3+4) + (-1+0+0.5+0) = 9.5; out 1: 1 + (2-2-0.25+1) = 1.75
    np.testing.assert_allclose(conv.inputs[2].const, [0.5 - 0.375 * 9.5, -1.0 - 0.375 * 1.75], rtol=1e-6)
    # depthwise: over the taps of each channel, 2 and 3; it had no bias and got one
    np.testing.assert_allclose(depthwise.inputs[2].const, [-0.375 * 2.0, -0.375 * 3.0], rtol=1e-6)
    assert w.reshape(2, -1).sum(1).tolist() == [9.5, 1.75]


# ---- what is left alone --------------------------------------------------------------------------
def test_left_alone_with_reasons(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("HardSwish", ["x"], ["h1"]),  # feeds a Relu too
             helper.make_node("Relu", ["h1"], ["r"], name="relu"),
             helper.make_node("Conv", ["h1", "w"], ["y1"], pads=[1, 1, 1, 1]),
             helper.make_node("HardSigmoid", ["x"], ["s"]),  # default alpha 0.2: not an h-swish
             helper.make_node("Mul", ["x", "s"], ["h2"]), helper.make_node("Conv", ["h2", "w"], ["y2"]),
             helper.make_node("HardSwish", ["x"], ["h3"]),  # padded conv under skip_padded
             helper.make_node("Conv", ["h3", "w"], ["y3"], pads=[1, 1, 1, 1], name="conv3")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                 _outputs("y1", "r", "y2", "y3"), [("w", w)])
    graph, out, ctx = _shift(path, tmp_path, padding="skip_padded")
    assert "hswish_shifted" not in ctx.notes
    reasons = {r["tensor"]: r["reason"] for r in ctx.notes["hswish_not_shifted"]}
    assert reasons == {"h1": "consumer node 'relu' (Relu) is not a Conv or Gemm",
                       "h3": "node 'conv3' (Conv) pads its input (padding: skip_padded)"}
    assert [n.op_type for n in graph.nodes].count("Add") == 0
    # running it again on a shifted graph shifts nothing twice
    graph, _, ctx = _shift(path, tmp_path)
    assert [n["tensor"] for n in ctx.notes["hswish_shifted"]] == ["h3"]
    again = PassContext()
    PassManager([PASSES.get("hswish_shift")()]).run(graph, again)
    assert "hswish_shifted" not in again.notes and [n.op_type for n in graph.nodes].count("Add") == 1


def test_offset_below_three_eighths_is_refused():
    with pytest.raises(ValueError):
        PASSES.get("hswish_shift").Options(offset=0.25)


# ---- compiled: unsigned codes, zero point 0 ------------------------------------------------------------
def test_compiled_shifted_tensors_are_uint8_with_zero_point_0(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "\n".join([
        "version: 1", "quantization:",
        "  weights: {bits: 8, symmetric: true, granularity: per_channel, calibrator: max}",
        "  activations: {bits: 8, symmetric: true, signed: true, unsigned_when_nonnegative: true, calibrator: max}",
        "calibration: {batch_size: 8}",
        "passes: [fold_batchnorm, hswish_shift, annotate, calibrate, insert_qdq]", ""]))
    x = np.random.default_rng(4).uniform(-1, 1, (16, 3, 48, 192)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "cls.onnx"
    report = compile_model(CLS, recipe, out, calib=tmp_path / "calib.npz", eval_data=tmp_path / "calib.npz")
    shifted = {n["tensor"] for n in report["notes"]["hswish_shifted"]}
    assert len(shifted) == 9
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    sources = [f"{t}_shifted_padded" if f"{t}_shifted_padded" in quantizers else f"{t}_shifted" for t in shifted]
    assert all(s in quantizers for s in sources)
    assert not set(shifted) & set(quantizers)  # the unshifted h-swish output is not quantized on its own
    for source in sources:
        zero_point = inits[quantizers[source].input[2]]
        assert zero_point.dtype == np.uint8 and int(zero_point) == 0
    for source in sources:
        model.graph.output.append(helper.make_tensor_value_info(source, TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "exposed.onnx"))
    values = ort_run(tmp_path / "exposed.onnx", {"x": x})[1:]
    assert all(v.min() >= 0.0 for v in values)
    assert report["evaluation"]["outputs"][0]["sqnr_db"] > 15
