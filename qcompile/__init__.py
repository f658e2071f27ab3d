"""qcompile: an ahead-of-time post-training quantization compiler for ONNX models."""
from __future__ import annotations

__version__ = "0.1.0"
