from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

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
