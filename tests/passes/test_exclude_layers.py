"""exclude_layers: exactly the first/last N layers, regex names and op types stay float."""
from __future__ import annotations

import re

import onnx
import pytest

from conftest import EXAMPLE, write_recipe
from qcompile.compiler import compile_model
from qcompile.errors import QCompileError, RecipeError

MODEL = EXAMPLE / "digits_mobilenet.onnx"
CALIB = EXAMPLE / "calib.npz"
HEADER = "version: 1\ncalibration: {max_samples: 32}\npasses:\n"


@pytest.fixture(scope="module")
def onnx_nodes():
    return list(onnx.load(str(MODEL)).graph.node)


@pytest.fixture(scope="module")
def layers(onnx_nodes):
    """Conv / Gemm names in the file's (topological) order: 25 Conv then the Gemm."""
    names = [n.name for n in onnx_nodes if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert len(names) == 26
    return names


def _fused_activation(onnx_nodes, layer: str) -> str | None:
    """The Relu/Clip that alone reads the layer's output (runtimes fuse it into the layer)."""
    node = next(n for n in onnx_nodes if n.name == layer)
    readers = [n for n in onnx_nodes if node.output[0] in n.input]
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
        return readers[0].name
    return None


def _excluded(tmp_path, step: str) -> tuple[dict[str, str], onnx.ModelProto]:
    recipe = write_recipe(tmp_path / "r.yaml", HEADER + f"  - {step}\n  - annotate\n  - calibrate\n  - insert_qdq\n")
    report = compile_model(MODEL, recipe, tmp_path / "out.onnx", calib=CALIB)
    excluded = {item["node"]: item["reason"] for item in report["float_nodes"]
                if item["reason"].startswith("excluded by exclude_layers")}
    return excluded, onnx.load(str(tmp_path / "out.onnx"))


def _weight_is_quantized(model: onnx.ModelProto, node_name: str) -> bool:
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    producer = producers.get(node.input[1])
    return producer is not None and producer.op_type == "DequantizeLinear"


def test_first_and_last_layer(tmp_path, layers, onnx_nodes):
    assert _fused_activation(onnx_nodes, layers[0]) is None and _fused_activation(onnx_nodes, layers[-1]) is None
    excluded, model = _excluded(tmp_path, "{exclude_layers: {first: 1, last: 1}}")
    assert excluded == {layers[0]: "excluded by exclude_layers (first layer)",
                        layers[-1]: "excluded by exclude_layers (last layer)"}
    assert not _weight_is_quantized(model, layers[0]) and not _weight_is_quantized(model, layers[-1])
    assert all(_weight_is_quantized(model, name) for name in layers[1:-1])


@pytest.mark.parametrize("fused", [True, False])
def test_first_and_last_n_layers(tmp_path, layers, onnx_nodes, fused):
    options = f"{{first: 3, last: 2, fused_activations: {str(fused).lower()}}}"
    excluded, _ = _excluded(tmp_path, f"{{exclude_layers: {options}}}")
    expected = {**{n: "excluded by exclude_layers (first 3 layers)" for n in layers[:3]},
                **{n: "excluded by exclude_layers (last 2 layers)" for n in layers[-2:]}}
    activations = {}
    for layer, reason in expected.items():
        act = _fused_activation(onnx_nodes, layer)
        if act is not None:
            activations[act] = reason[:-1] + ", fused activation)"
    assert activations, "the digits model has Relu/Clip after some of these layers"
    assert excluded == ({**expected, **activations} if fused else expected)


def test_names_and_op_types(tmp_path, onnx_nodes):
    pattern = r"/blocks/blocks\.1/.*"
    exact = "/stem/stem.0/Conv"
    excluded, _ = _excluded(tmp_path, f"{{exclude_layers: {{names: ['{exact}', '{pattern}'], op_types: [HardSwish]}}}}")
    expected = {}
    for node in onnx_nodes:
        if node.name == exact:
            expected[node.name] = f"excluded by exclude_layers (name matches '{exact}')"
        elif re.fullmatch(pattern, node.name):
            expected[node.name] = f"excluded by exclude_layers (name matches '{pattern}')"
        elif node.op_type == "HardSwish":
            expected[node.name] = "excluded by exclude_layers (op type HardSwish)"
    assert len(expected) > 10 and excluded == expected
    # a regex must match the whole name: '/blocks/blocks\.1' alone matches nothing
    excluded, _ = _excluded(tmp_path, r"{exclude_layers: {names: ['/blocks/blocks\.1']}}")
    assert excluded == {}


def test_must_run_before_annotate(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", HEADER + "  - annotate\n  - {exclude_layers: {first: 1}}\n"
                                                        "  - calibrate\n  - insert_qdq\n")
    with pytest.raises(QCompileError, match="before 'annotate'"):
        compile_model(MODEL, recipe, tmp_path / "out.onnx", calib=CALIB)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("options,message", [("{first: -1}", "greater than or equal to 0"),
                                             ("{names: ['(']}", "not a valid regular expression"),
                                             ("{bits: 16}", "unknown key")])
def test_bad_options_are_refused(tmp_path, options, message):
    recipe = write_recipe(tmp_path / "r.yaml", HEADER + f"  - {{exclude_layers: {options}}}\n  - annotate\n")
    with pytest.raises(RecipeError, match=re.escape(message)):
        compile_model(MODEL, recipe, tmp_path / "out.onnx", calib=CALIB)
