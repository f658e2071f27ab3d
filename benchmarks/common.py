"""What the benchmarks share: paths into ../shared, EfficientNet-Lite0 preprocessing, batch-1
inference, an onnxruntime calibration reader and onnxruntime's quantize_static as the peer. Not part
of the qcompile package."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from qcompile.runtime import session

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEV_DATA = SHARED / "data" / "imagenet_sample_dev.npz"
RECIPE_PREPROCESSING = "preprocessing: {mean: [127.0], std: [128.0], layout: NCHW}"  # the same, for recipes


def model(name: str) -> Path:
    return SHARED / "models" / name


def dev_split(n_calib: int, n_eval: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The issues' split of the dev images: calibrate on the first n_calib, evaluate on the n_eval after
    them. Returns (calibration images, evaluation images, evaluation labels)."""
    data = np.load(DEV_DATA)
    images, labels = data["images"], data["labels"]
    stop = n_calib + n_eval
    return images[:n_calib], images[n_calib:stop], labels[n_calib:stop]


def preprocess(u8: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite0 input: x = (u8 - 127) / 128, NHWC uint8 -> NCHW float32."""
    return np.ascontiguousarray(((np.asarray(u8).astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2))


def logits(model_path: Path, images: np.ndarray) -> np.ndarray:
    """The model's first output for each image, one image per run (the model's batch is fixed at 1)."""
    sess = session(model_path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: preprocess(images[i:i + 1])})[0] for i in range(len(images))])


def top1(model_path: Path, images: np.ndarray) -> np.ndarray:
    return logits(model_path, images).argmax(axis=1)


def image_reader(images: np.ndarray):
    """An onnxruntime CalibrationDataReader yielding one preprocessed image at a time (lazily, so a
    memory-mapped array is never materialised)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.index = 0

        def get_next(self):
            if self.index >= len(images):
                return None
            self.index += 1
            return {"input": preprocess(images[self.index - 1:self.index])}

    return Reader()


def ort_quantize(model_path: Path, out: Path, calib_images: np.ndarray, per_channel: bool,
                 symmetric: bool) -> tuple[Path, float]:
    """onnxruntime quantize_static, QDQ, MinMax calibration on calib_images: int8 symmetric weights;
    activations int8 symmetric, or uint8 asymmetric (its default) when symmetric is False.
    Returns the model's path and the seconds it took."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static warns through the root logger, e.g. once per BatchNormalization
    try:
        start = time.perf_counter()
        quantize_static(str(model_path), str(out), image_reader(calib_images), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
        return out, time.perf_counter() - start
    finally:
        root.setLevel(level)
