"""QOperator lowering and the integer reference executor on EfficientNet-Lite0 (one run, one table).

    python benchmarks/bench_integer.py [--verify-samples 50] [--eval 400] [--latency-runs 50]

1. qcompile int8_sym (per-channel) as QDQ, and lowered with fuse_requant (profiles onnxruntime-x86
   and generic): top-1 and agreement with FP32 on images[100:500] of imagenet_sample_dev.npz
   (calibration: images[:100]).
2. The integer executor vs onnxruntime on the QOperator model, in "onnx" and "fixed-point" modes,
   on --verify-samples images: per integer tensor, the share of identical codes and the max LSB
   with each op run on onnxruntime's inputs (qcompile verify's check), and the max LSB when the
   executor runs end to end on its own results (drift), for the layers and for the logits.
3. onnxruntime latency (1 thread, median of --latency-runs) of FP32, each qcompile output and
   onnxruntime quantize_static's QOperator (U8S8 per-channel) and QDQ outputs.
4. Executor seconds per image in both modes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from common import dev_split, image_reader, model, preprocess, top1

from qcompile.runtime import session

MODEL = model("efficientnet_lite0_fused.onnx")

RECIPE = """
version: 1
target: {target}
quantization:
  weights: {{bits: 8, symmetric: true, granularity: per_channel, calibrator: max}}
  activations: {{bits: 8, symmetric: true, signed: true, unsigned_when_nonnegative: {unsigned}, calibrator: max}}
calibration: {{batch_size: 1}}
preprocessing: {{mean: [127.0], std: [128.0], layout: NCHW}}
passes: [annotate, calibrate, insert_qdq{lower}]
"""


def latency_ms(path, image, runs):
    sess = session(path, threads=1)
    x = preprocess(image)
    for _ in range(5):
        sess.run(None, {"input": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def ort_quantize(work, calib, fmt):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = work / f"ort_{fmt}.onnx"
    quantize_static(str(MODEL), str(out), image_reader(calib),
                    quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify-samples", type=int, default=50)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--skip-accuracy", action="store_true", help="only the executor checks and speed")
    args = parser.parse_args()

    from qcompile.compiler import compile_model
    from qcompile.executor import IntegerExecutor
    from qcompile.recipe import Preprocessing
    from qcompile.verify import verify

    calib, eval_images, eval_labels = dev_split(100, args.eval)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "calib.npy", calib)
        np.save(work / "verify.npy", eval_images[:args.verify_samples])
        variants = {
            "qcompile QDQ": ("qdq", "true", ""),
            "qcompile QOperator onnxruntime-x86": ("qoperator", "true", ", {fuse_requant: {profile: onnxruntime-x86}}"),
            "qcompile QOperator generic (int8)": ("qoperator", "false", ", {fuse_requant: {profile: generic}}"),
        }
        paths = {"FP32": MODEL}
        for name, (target, unsigned, lower) in variants.items():
            recipe = work / f"{len(paths)}.yaml"
            recipe.write_text(RECIPE.format(target=target, unsigned=unsigned, lower=lower))
            paths[name] = work / f"{len(paths)}.onnx"
            compile_model(MODEL, recipe, paths[name], calib=work / "calib.npy")
        paths["onnxruntime quantize_static QOperator"] = ort_quantize(work, calib, "qoperator")
        paths["onnxruntime quantize_static QDQ"] = ort_quantize(work, calib, "qdq")

        float_pred = None if args.skip_accuracy else top1(MODEL, eval_images)
        print(f"EfficientNet-Lite0 fused; calibration images[:100], evaluation images[100:{100 + args.eval}], "
              "per-channel int8 weights, max calibration")
        print(f"{'model':<40}{'top-1 %':>9}{'agree %':>9}{'latency ms (1 thread)':>23}")
        for name, path in ({} if args.skip_accuracy else paths).items():
            pred = float_pred if name == "FP32" else top1(path, eval_images)
            print(f"{name:<40}{100 * np.mean(pred == eval_labels):>9.2f}{100 * np.mean(pred == float_pred):>9.2f}"
                  f"{latency_ms(path, eval_images[:1], args.latency_runs):>23.2f}", flush=True)

        print(f"\nInteger executor vs onnxruntime on {args.verify_samples} images (per integer tensor)")
        print(f"{'model':<40}{'mode':<13}{'tensors':>8}{'all identical %':>16}{'min ident %':>12}{'max LSB':>8}"
              f"{'drift LSB':>10}{'logit drift':>12}")
        for name in ("qcompile QOperator onnxruntime-x86", "qcompile QOperator generic (int8)"):
            for mode in ("onnx", "fixed-point"):
                result = verify(paths[name], work / "verify.npy", mode=mode, samples=args.verify_samples,
                                preprocessing=Preprocessing(mean=[127.0], std=[128.0], layout="NCHW"))
                layers = result.layers
                total = sum(c.elements for c in layers)
                same = sum(c.identical for c in layers)
                print(f"{name:<40}{mode:<13}{len(layers):>8}{100 * same / total:>16.3f}"
                      f"{100 * min(c.identical / c.elements for c in layers):>12.3f}"
                      f"{max(c.max_lsb for c in layers + result.outputs):>8}{max(c.drift_lsb for c in layers):>10}"
                      f"{result.outputs[0].drift_lsb:>12}", flush=True)

        print("\nExecutor speed (EfficientNet-Lite0, seconds per image, batch 1)")
        model = onnx.load(str(paths["qcompile QOperator onnxruntime-x86"]))
        for mode in ("onnx", "fixed-point"):
            executor = IntegerExecutor(model, mode=mode)
            executor.run({"input": preprocess(eval_images[:1])})  # warm the weight caches
            start = time.perf_counter()
            n = min(10, len(eval_images))
            for i in range(n):
                executor.run({"input": preprocess(eval_images[i:i + 1])})
            print(f"  {mode:<12} {(time.perf_counter() - start) / n:.3f} s/image", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
