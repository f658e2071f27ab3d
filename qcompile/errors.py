"""Error hierarchy. Every user-facing failure is a QCompileError with a one-line message.

The CLI maps QCompileError to exit code 2 (usage or input error); anything else is a bug and
exits 1 with a traceback.
"""
from __future__ import annotations


class QCompileError(Exception):
    """A problem with the user's input (model, recipe, data, options): exit code 2."""

    exit_code = 2


class ModelError(QCompileError):
    """The model file is missing, not ONNX, truncated or invalid."""


class RecipeError(QCompileError):
    """The recipe is malformed: names the file, the field path and what is allowed."""


class DataError(QCompileError):
    """Calibration or evaluation data does not fit the model's inputs."""


class PassError(QCompileError):
    """A pass refused the graph; the message names the pass and the node."""


class CalibrationError(QCompileError):
    """Statistics are missing or unusable."""


class ExportError(QCompileError):
    """The quantized graph cannot be written in a form the target runtime accepts."""


class UnknownNameError(QCompileError):
    """No pass / calibrator registered under that name."""
