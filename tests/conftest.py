from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLE = ROOT / "examples" / "digits"
RECIPES = ROOT / "recipes"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def digits_model() -> Path:
    return EXAMPLE / "digits_mobilenet.onnx"


@pytest.fixture
def digits_calib() -> Path:
    return EXAMPLE / "calib.npz"


@pytest.fixture
def digits_test() -> Path:
    return EXAMPLE / "test.npz"


def ort_run(model_path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def plain_recipe(directory: Path, base: str = "int8_sym.yaml") -> Path:
    """A shipped recipe's quantization settings with only the core passes (no refinements)."""
    head = (RECIPES / base).read_text().split("passes:")[0]
    path = Path(directory) / f"plain_{base}"
    path.write_text(head + "passes:\n  - fold_batchnorm\n  - annotate\n  - calibrate\n  - insert_qdq\n")
    return path


def run_passes(path, tmp_path, passes, name="out.onnx"):
    """Import `path`, run `passes` on it and write the result: (graph, written path, records, ctx)."""
    from qcompile.exporter import to_proto, write_model
    from qcompile.importer import import_model
    from qcompile.pipeline import PassContext, PassManager

    graph = import_model(path)
    ctx = PassContext()
    manager = PassManager(passes)
    manager.run(graph, ctx)
    return graph, write_model(to_proto(graph), tmp_path / name), manager.records, ctx


def max_rel_err(reference, got) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-30))


def save_graph(tmp_path, nodes, inits, x_shape, y_shape, name="m.onnx", opset=13) -> Path:
    """A checked one-input ("x"), one-output ("y") float model from nodes and initializers."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
                              [numpy_helper.from_array(np.asarray(a, np.float32) if np.asarray(a).dtype.kind == "f"
                                                       else np.asarray(a), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path
