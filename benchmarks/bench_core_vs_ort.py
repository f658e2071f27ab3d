"""qcompile max calibration vs onnxruntime quantize_static on EfficientNet-Lite0 (one run, one table).

    python benchmarks/bench_core_vs_ort.py [--calib 100] [--eval 400]

Calibration: the first N images of ../shared/data/imagenet_sample_dev.npz; evaluation: the next M.
Both tools produce QDQ models with max (MinMax) calibration; settings are matched pairwise:
  asym  = activations uint8 asymmetric, weights int8 symmetric (onnxruntime's defaults)
  sym   = activations int8 symmetric (uint8 zero point 0 where qcompile proves non-negativity),
          weights int8 symmetric
each per channel and per tensor. Not a test: prints a table (and --json writes it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import dev_split, model, ort_quantize, top1

MODEL = model("efficientnet_lite0_fused.onnx")

RECIPE = """
version: 1
quantization:
  weights: {{bits: 8, symmetric: true, granularity: {granularity}, calibrator: max}}
  activations: {{bits: 8, symmetric: {symmetric}, signed: {signed}, calibrator: max}}
calibration: {{batch_size: 1}}
preprocessing: {{mean: [127.0], std: [128.0], layout: NCHW}}
passes: [annotate, calibrate, insert_qdq]
"""


def qcompile_model(work: Path, calib_npz: Path, granularity: str, symmetric: bool) -> tuple[Path, float]:
    from qcompile.compiler import compile_model

    recipe = work / f"qc_{granularity}_{symmetric}.yaml"
    recipe.write_text(RECIPE.format(granularity=granularity, symmetric=str(symmetric).lower(),
                                    signed=str(symmetric).lower()))
    out = work / f"qc_{granularity}_{'sym' if symmetric else 'asym'}.onnx"
    start = time.perf_counter()
    compile_model(MODEL, recipe, out, calib=calib_npz)
    return out, time.perf_counter() - start


def ort_model(work: Path, calib_images: np.ndarray, per_channel: bool, symmetric: bool) -> tuple[Path, float]:
    out = work / f"ort_{'pc' if per_channel else 'pt'}_{'sym' if symmetric else 'asym'}.onnx"
    return ort_quantize(MODEL, out, calib_images, per_channel, symmetric)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=100)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()

    calib, eval_images, eval_labels = dev_split(args.calib, args.eval)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib_npz = work / "calib.npz"
        np.savez(calib_npz, images=calib)
        float_pred = top1(MODEL, eval_images)
        rows.append({"tool": "float", "setting": "fp32", "top1": float(np.mean(float_pred == eval_labels)),
                     "agreement": 1.0, "seconds": 0.0})
        for granularity, per_channel in (("per_channel", True), ("per_tensor", False)):
            for symmetric in (False, True):
                setting = f"{'per-channel' if per_channel else 'per-tensor'} {'sym' if symmetric else 'asym'}"
                for tool, build in (("qcompile", lambda: qcompile_model(work, calib_npz, granularity, symmetric)),
                                    ("onnxruntime", lambda: ort_model(work, calib, per_channel, symmetric))):
                    path, seconds = build()
                    pred = top1(path, eval_images)
                    rows.append({"tool": tool, "setting": setting, "top1": float(np.mean(pred == eval_labels)),
                                 "agreement": float(np.mean(pred == float_pred)), "seconds": seconds})
                    print(f"  done: {tool} {setting}", file=sys.stderr)

    print(f"EfficientNet-Lite0 fused, calibration {args.calib} images, evaluation {args.eval} images "
          f"(imagenet_sample_dev.npz), QDQ, max/MinMax calibration")
    print(f"{'setting':<22}{'tool':<13}{'top-1 %':>9}{'agree %':>9}{'Δtop-1 vs ORT':>15}{'build s':>9}")
    ort_top1 = {r["setting"]: r["top1"] for r in rows if r["tool"] == "onnxruntime"}
    for r in rows:
        delta = f"{100 * (r['top1'] - ort_top1[r['setting']]):+.2f}" if r["tool"] == "qcompile" else ""
        print(f"{r['setting']:<22}{r['tool']:<13}{100 * r['top1']:>9.2f}{100 * r['agreement']:>9.2f}{delta:>15}"
              f"{r['seconds']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
