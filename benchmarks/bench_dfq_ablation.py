"""DFQ ablation on EfficientNet-Lite0 with its BatchNorms: what each transform does to per-tensor INT8.

    python benchmarks/bench_dfq_ablation.py [--calib 100] [--eval 400] [--variants] [--json FILE]

Model: ../shared/models/efficientnet_lite0_bn.onnx (fixed batch 1). Calibration: the first N
images of ../shared/data/imagenet_sample_dev.npz; evaluation: the next M; preprocessing
(u8 − 127) / 128, NCHW. Quantization: weights int8 symmetric per tensor, activations int8
symmetric (uint8 with zero point 0 where proven non-negative), max calibration, QDQ run by
onnxruntime (CPU, its int8 kernels where it fuses them).

Rows are cumulative: nothing, + fold_batchnorm, + equalize_cross_layer, + absorb_high_bias, then
the refine passes other modules provide when they are registered (correct_bias, aciq_clip),
and exclude_layers / hswish_shift rows when present; then per-channel weights for reference, and
4-bit per-channel weights (W4A8) with fold only, with DFQ, and with gptq + bias correction
(symmetric, then asymmetric as recipes/w4a8.yaml has them);
last, the peer on the same images: onnxruntime quantize_static (QDQ, MinMax, its defaults of
uint8 asymmetric activations and int8 symmetric weights) per tensor and per channel.
For every row: the float model after the transform passes alone (top-1, agreement of its
top-1 with the original FP32 model), and the quantized model (top-1, agreement with FP32,
mean KL(FP32 ‖ INT8) of the softmax). --variants adds the option ablations quoted in the pass
docstrings (ReLU6 handling, pairwise vs closed-form depthwise, high-bias absorption modes).
Not a test: prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qcompile.metrics import mean_kl

from common import dev_split, logits, model, ort_quantize

MODEL = model("efficientnet_lite0_bn.onnx")

RECIPE = """
version: 1
quantization:
  weights: {{bits: {bits}, symmetric: {symmetric}, granularity: {granularity}, calibrator: max}}
  activations: {{bits: 8, symmetric: true, signed: true, calibrator: max}}
calibration: {{batch_size: 1}}
preprocessing: {{mean: [127.0], std: [128.0], layout: NCHW}}
passes: {passes}
"""
QUANTIZE = ["annotate", "calibrate", "insert_qdq"]


def compile_with(work: Path, tag: str, steps: list, granularity: str,
                 calib_npz: Path | None, bits: int = 8, symmetric: bool = True) -> tuple[Path, dict, float]:
    from qcompile.compiler import compile_model

    recipe = work / f"{tag}.yaml"
    recipe.write_text(RECIPE.format(bits=bits, symmetric=str(symmetric).lower(), granularity=granularity,
                                    passes=json.dumps(steps)))
    out = work / f"{tag}.onnx"
    start = time.perf_counter()
    report = compile_model(MODEL, recipe, out, calib=calib_npz)
    return out, report, time.perf_counter() - start


def pass_stats(report: dict, name: str) -> dict:
    for record in report.get("passes", []):
        if record.get("name") == name:
            return record.get("stats", {})
    return {}


def rows_to_run(registered: set[str], variants: bool) -> list[tuple[str, list, str, int, bool]]:
    """(label, transform + refine steps, weight granularity, weight bits, symmetric weights);
    quantization steps are added around them."""
    fold, cle, hba = "fold_batchnorm", "equalize_cross_layer", "absorb_high_bias"
    dfq = [fold, cle, hba]
    rows = [("nothing", [], "per_tensor"),
            ("+ fold_batchnorm", [fold], "per_tensor"),
            ("+ equalize_cross_layer", [fold, cle], "per_tensor"),
            ("+ absorb_high_bias", dfq, "per_tensor")]
    refine = []
    if "correct_bias" in registered:
        refine = ["correct_bias"]
        rows.append(("+ correct_bias (empirical)", dfq + refine, "per_tensor"))
        rows.append(("  correct_bias analytic instead", dfq + [{"correct_bias": {"mode": "analytic"}}], "per_tensor"))
    if "aciq_clip" in registered:
        rows.append(("+ aciq_clip", dfq + refine + ["aciq_clip"], "per_tensor"))
    if "hswish_shift" in registered:  # EfficientNet-Lite0 has no h-swish: expected to change nothing
        rows.append(("  DFQ + hswish_shift", [fold, "hswish_shift", cle, hba] + refine, "per_tensor"))
    if "exclude_layers" in registered:
        rows.append(("  DFQ, first+last layer float", dfq + [{"exclude_layers": {"first": 1, "last": 1}}] + refine,
                     "per_tensor"))
    if variants:
        rows += [("  CLE relu6: skip", [fold, {cle: {"relu6": "skip"}}], "per_tensor"),
                 ("  CLE depthwise: pairwise", [fold, {cle: {"depthwise": "pairwise"}}], "per_tensor"),
                 ("  CLE without dead-channel guard", [fold, {cle: {"min_relative_range": 0.0}}], "per_tensor"),
                 ("  HBA lower_bound: batchnorm", [fold, cle, {hba: {"lower_bound": "batchnorm"}}], "per_tensor"),
                 ("  HBA batchnorm, padding: explicit",
                  [fold, cle, {hba: {"lower_bound": "batchnorm", "padding": "explicit"}}], "per_tensor"),
                 ("  HBA batchnorm, padding: ignore",
                  [fold, cle, {hba: {"lower_bound": "batchnorm", "padding": "ignore"}}], "per_tensor"),
                 ("  HBA interval, padding: explicit", [fold, cle, {hba: {"padding": "explicit"}}], "per_tensor"),
                 ("  HBA without CLE", [fold, hba], "per_tensor")]
    rows += [("per-channel + fold", [fold], "per_channel"),
             ("per-channel + DFQ", dfq + refine, "per_channel")]
    rows = [(*row, 8) for row in rows]
    rows += [("W4A8 + fold", [fold], "per_channel", 4),
             ("W4A8 + DFQ", dfq + refine, "per_channel", 4)]
    if "gptq" in registered:
        rows.append(("W4A8 + fold + gptq" + (" + correct_bias" if refine else ""), [fold, "gptq"] + refine,
                     "per_channel", 4))
        rows.append(("W4A8 asymmetric weights, same passes", [fold, "gptq"] + refine, "per_channel", 4, False))
        if variants:
            rows += [("  gptq without clip search", [fold, {"gptq": {"clip_search": False}}] + refine,
                      "per_channel", 4),
                     ("  gptq after CLE", [fold, cle, "gptq"] + refine, "per_channel", 4),
                     ("  gptq without correct_bias", [fold, "gptq"], "per_channel", 4),
                     ("per-channel W8A8 + fold + gptq", [fold, "gptq"] + refine, "per_channel", 8)]
    return [row if len(row) == 5 else (*row, True) for row in rows]


def by_phase(steps: list) -> dict:
    """The steps grouped by phase name ('TRANSFORM', 'ANNOTATE', 'REFINE', ...), in order."""
    from qcompile.registry import PASSES

    groups: dict[str, list] = {}
    for step in steps:
        phase = PASSES.get(step if isinstance(step, str) else next(iter(step))).phase
        groups.setdefault(phase.name, []).append(step)
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=100)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--variants", action="store_true", help="also the option ablations")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()

    from qcompile.registry import PASSES, load_builtins_and_entry_points
    load_builtins_and_entry_points()
    registered = set(PASSES.names())

    calib, eval_images, eval_labels = dev_split(args.calib, args.eval)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib_npz = work / "calib.npz"
        np.savez(calib_npz, images=calib)
        reference = logits(MODEL, eval_images)
        ref_pred = reference.argmax(1)
        float_cache: dict[str, tuple[float, float]] = {}
        for index, (label, steps, granularity, bits, symmetric) in enumerate(rows_to_run(registered, args.variants)):
            phases = by_phase(steps)
            transform, annotate, refine = (phases.get(p, []) for p in ("TRANSFORM", "ANNOTATE", "REFINE"))
            key = json.dumps(transform)
            if key not in float_cache:
                if transform:
                    path, _, _ = compile_with(work, f"float{index}", transform, granularity, None)
                    pred = logits(path, eval_images).argmax(1)
                else:
                    pred = ref_pred
                float_cache[key] = (float(np.mean(pred == eval_labels)), float(np.mean(pred == ref_pred)))
            path, report, seconds = compile_with(work, f"q{index}", transform + annotate + QUANTIZE[:2] + refine
                                                 + QUANTIZE[2:], granularity, calib_npz, bits, symmetric)
            out = logits(path, eval_images)
            pred = out.argmax(1)
            stats = {s: pass_stats(report, s) for s in ("equalize_cross_layer", "absorb_high_bias")}
            results.append({"row": label, "granularity": granularity, "weight_bits": bits,
                            "weight_symmetric": symmetric, "steps": steps,
                            "float_top1": float_cache[key][0], "float_agreement": float_cache[key][1],
                            "top1": float(np.mean(pred == eval_labels)), "agreement": float(np.mean(pred == ref_pred)),
                            "kl": mean_kl(reference, out), "seconds": seconds,
                            "stats": {k: v for k, v in stats.items() if v}})
            print(f"  done: {label}", file=sys.stderr)
        float_top1 = float(np.mean(ref_pred == eval_labels))
        for per_channel in (False, True):
            granularity = "per_channel" if per_channel else "per_tensor"
            label = f"onnxruntime quantize_static {granularity.replace('_', '-')}"
            path, seconds = ort_quantize(MODEL, work / f"ort_{granularity}.onnx", calib, per_channel,
                                         symmetric=False)
            out = logits(path, eval_images)
            pred = out.argmax(1)
            results.append({"row": label, "granularity": granularity, "weight_bits": 8, "steps": [],
                            "float_top1": float_top1, "float_agreement": 1.0,
                            "top1": float(np.mean(pred == eval_labels)), "agreement": float(np.mean(pred == ref_pred)),
                            "kl": mean_kl(reference, out), "seconds": seconds, "stats": {}})
            print(f"  done: {label}", file=sys.stderr)

    print(f"EfficientNet-Lite0 (BN kept), calibration {args.calib} images, evaluation {args.eval} images "
          f"(imagenet_sample_dev.npz); symmetric weights unless said (8-bit unless W4A8) and 8-bit activations, max "
          f"calibration, QDQ in onnxruntime")
    print(f"{'row':<40}{'weights':<13}{'float top-1':>12}{'float agr':>10}{'quant top-1':>12}{'agree':>8}"
          f"{'KL':>8}{'build s':>9}")
    for r in results:
        print(f"{r['row']:<40}{r['granularity']:<13}{100 * r['float_top1']:>12.2f}{100 * r['float_agreement']:>10.2f}"
              f"{100 * r['top1']:>12.2f}{100 * r['agreement']:>8.2f}{r['kl']:>8.4f}{r['seconds']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
