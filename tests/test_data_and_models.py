"""Data input (image folders, arrays) and model forms (external data, subgraphs)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import EXAMPLE, RECIPES, ort_run, write_recipe
from qcompile.compiler import compile_model
from qcompile.data import ModelInput, load_dataset
from qcompile.errors import DataError
from qcompile.exporter import to_proto, write_model
from qcompile.importer import import_model
from qcompile.recipe import Preprocessing


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 40, 50, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        folder = tmp_path / ("cat" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    pp = Preprocessing(resize=None, crop=[32, 48], mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 8.0], layout="NCHW")
    data = load_dataset(tmp_path, [ModelInput("x", np.dtype("float32"), ("N", 3, 32, 48))], pp)
    assert len(data) == 6
    batches = list(data.batches(4))
    x = np.concatenate([b["x"] for b in batches])
    files = [p for p in sorted(tmp_path.rglob("*.png"))]  # cat/1,3,5 then dog/0,2,4
    order = [int(p.stem) for p in files]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    crop = pixels[order][:, 4:36, 1:49, :].astype(np.float32)  # centre crop of 40x50 to 32x48
    expected = ((crop - [10, 20, 30]) / np.array([2, 4, 8], np.float32)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_uint8_arrays_with_preprocessing_match_manual_normalisation(tmp_path):
    u8 = np.random.default_rng(1).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=u8, labels=np.arange(5), files=np.array(["a"] * 5))
    pp = Preprocessing(mean=[127.0], std=[128.0], layout="NCHW")
    data = load_dataset(tmp_path / "imgs.npz", [ModelInput("input", np.dtype("float32"), (1, 3, 8, 8))], pp)
    x = np.concatenate([b["input"] for b in data.batches(1)])
    np.testing.assert_array_equal(x, ((u8.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2))
    assert data.labels.tolist() == list(range(5))


def test_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 1, 32, 32), np.float32), labels=np.zeros(3))
    with pytest.raises(DataError, match="3 labels for 4 samples"):
        load_dataset(tmp_path / "d.npz", [ModelInput("input", np.dtype("float32"), ("N", 1, 32, 32))])


def test_compile_from_image_folder(tmp_path, digits_model):
    test = np.load(EXAMPLE / "test.npz")
    pixels = np.clip((test["input"][:40, 0] + 1) / 2 * 255, 0, 255).round().astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, test["labels"][:40])):
        folder = tmp_path / "imgs" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    recipe = write_recipe(tmp_path / "r.yaml", (RECIPES / "int8_sym.yaml").read_text().replace(
        "passes:", "preprocessing:\n  color: grayscale\n  mean: [127.5]\n  std: [127.5]\npasses:"))
    report = compile_model(digits_model, recipe, tmp_path / "o.onnx", calib=tmp_path / "imgs", eval_data=tmp_path / "imgs")
    assert report["evaluation"]["samples"] == 40
    assert report["evaluation"]["float"]["top1"] >= 0.9  # labels come from the folder names
    assert report["evaluation"]["quantized"]["agreement_top1"] >= 0.95


def test_external_data_model_loads_and_saves(tmp_path, digits_calib):
    model = onnx.load(str(EXAMPLE / "digits_mobilenet.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    graph = import_model(tmp_path / "ext.onnx")
    assert graph.model_props["external_data"]
    x = np.load(digits_calib)["input"][:4]
    out = write_model(to_proto(graph), tmp_path / "rt" / "ext_rt.onnx", external_data=True)
    assert (tmp_path / "rt" / "ext_rt.onnx.data").exists()
    assert np.array_equal(ort_run(tmp_path / "ext.onnx", {"input": x})[0], ort_run(out, {"input": x})[0])
    compile_model(tmp_path / "ext.onnx", RECIPES / "int8_sym.yaml", tmp_path / "q" / "ext.int8.onnx", calib=digits_calib)
    assert (tmp_path / "q" / "ext.int8.onnx.data").exists()
    assert ort_run(tmp_path / "q" / "ext.int8.onnx", {"input": x})[0].shape == (4, 10)


def _if_model(path):
    """Conv, then If(cond) whose branches read the Conv output from the outer scope."""
    then_graph = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2, 4, 4])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 2, 4, 4])])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((2, 2, 1, 1)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_subgraph_ops_pass_through(tmp_path):
    _if_model(tmp_path / "if.onnx")
    graph = import_model(tmp_path / "if.onnx")
    if_node = next(n for n in graph.nodes if n.op_type == "If")
    assert [v.name for v in if_node.implicit_inputs] == ["c"]  # the outer value the branches read
    out = write_model(to_proto(graph), tmp_path / "rt.onnx")
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert np.array_equal(ort_run(tmp_path / "if.onnx", feeds)[0], ort_run(out, feeds)[0])
    np.savez(tmp_path / "c.npz", x=x, cond=np.array([True]))
    report = compile_model(tmp_path / "if.onnx", RECIPES / "int8_sym.yaml", tmp_path / "q.onnx", calib=tmp_path / "c.npz")
    assert {"node": "If_1", "op": "If", "reason": "no quantization rule for op 'If'"} in report["float_nodes"]
    q = onnx.load(str(tmp_path / "q.onnx"))
    if_proto = next(n for n in q.graph.node if n.op_type == "If")
    original = next(n for n in onnx.load(str(tmp_path / "if.onnx")).graph.node if n.op_type == "If")
    assert if_proto.attribute == original.attribute
