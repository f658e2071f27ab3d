"""Shipped recipes on rotating calibration splits: how far one split's figures can be trusted.

    python benchmarks/bench_splits.py [RECIPE ...] [--splits 5] [--calib 100] [--json FILE]

Model: ../shared/models/efficientnet_lite0_bn.onnx (fixed batch 1). The first splits × calib images
of ../shared/data/imagenet_sample_dev.npz are cut into `splits` blocks; split k calibrates on
block k and evaluates on all the other blocks (5 × 100 by default: 100 calibration images, 400
evaluation images, split 0 being the issue's and bench_dfq_ablation's). One image is 0.25 points
of 400, and which images land in the evaluation set moves top-1 by more than that, so a recipe's
figure on one split says little about a 1-2 point goal. Each recipe (default: recipes/int8_sym,
int8_per_tensor, w4a8) runs as written except `calibration.batch_size: 1` and the model's
preprocessing ((u8 − 127) / 128, NCHW). The peer on the same splits: onnxruntime quantize_static
per channel (QDQ, MinMax, its default uint8 asymmetric activations, int8 symmetric weights).

Per split: float top-1, quantized top-1, their difference, top-1 agreement with FP32 and mean
KL(FP32 ‖ quantized) of the softmax; then per recipe the mean, min and max over the splits.
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
import yaml

from qcompile.metrics import mean_kl

from common import DEV_DATA, ROOT, logits, model, ort_quantize

MODEL = model("efficientnet_lite0_bn.onnx")
DEFAULT_RECIPES = [ROOT / "recipes" / name for name in ("int8_sym.yaml", "int8_per_tensor.yaml", "w4a8.yaml")]
PEER = "onnxruntime quantize_static per-channel"


def bench_recipe(source: Path, work: Path) -> Path:
    """The recipe as written, with batch 1 and the model's preprocessing."""
    doc = yaml.safe_load(source.read_text())
    doc.setdefault("calibration", {})["batch_size"] = 1
    doc["preprocessing"] = {"mean": [127.0], "std": [128.0], "layout": "NCHW"}
    out = work / f"{source.stem}.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, default=DEFAULT_RECIPES)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--calib", type=int, default=100, help="images per split (the calibration block)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    for recipe in args.recipes:
        if not recipe.is_file():
            parser.error(f"{recipe}: no such recipe file")

    from qcompile.compiler import compile_model

    data = np.load(DEV_DATA)
    total = args.splits * args.calib
    if args.splits < 2 or total > len(data["labels"]):
        parser.error(f"--splits {args.splits} x --calib {args.calib} needs 2 or more splits and at most "
                     f"{len(data['labels'])} images")
    images, labels = data["images"][:total], data["labels"][:total]
    reference = logits(MODEL, images)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipes = {recipe.stem: bench_recipe(recipe, work) for recipe in args.recipes}
        for split in range(args.splits):
            calib = np.arange(split * args.calib, (split + 1) * args.calib)
            evaluation = np.setdiff1d(np.arange(total), calib)
            calib_npz = work / "calib.npz"
            np.savez(calib_npz, images=images[calib])
            ref = reference[evaluation]
            for name in [*recipes, PEER]:
                start = time.perf_counter()
                if name == PEER:
                    path = ort_quantize(MODEL, work / "q.onnx", images[calib], per_channel=True, symmetric=False)[0]
                else:
                    path = work / "q.onnx"
                    compile_model(MODEL, recipes[name], path, calib=calib_npz)
                seconds = time.perf_counter() - start
                out = logits(path, images[evaluation])
                rows.append({"recipe": name, "split": split, "calib": [int(calib[0]), int(calib[-1]) + 1],
                             "float_top1": float(np.mean(ref.argmax(1) == labels[evaluation])),
                             "top1": float(np.mean(out.argmax(1) == labels[evaluation])),
                             "agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
                             "kl": mean_kl(ref, out), "seconds": seconds})
                print(f"  done: split {split} {name}", file=sys.stderr)

    print(f"EfficientNet-Lite0 (BN kept), {args.splits} splits of imagenet_sample_dev.npz[:{total}]: calibrate on "
          f"{args.calib} images, evaluate on the other {total - args.calib}")
    print(f"{'recipe':<42}{'split':>6}{'calib':>10}{'float':>8}{'quant':>8}{'delta':>8}{'agree':>8}{'KL':>8}"
          f"{'build s':>9}")
    for name in [*recipes, PEER]:
        mine = [r for r in rows if r["recipe"] == name]
        for r in mine:
            print(f"{name:<42}{r['split']:>6}{'%d:%d' % tuple(r['calib']):>10}{100 * r['float_top1']:>8.2f}"
                  f"{100 * r['top1']:>8.2f}{100 * (r['top1'] - r['float_top1']):>+8.2f}{100 * r['agreement']:>8.2f}"
                  f"{r['kl']:>8.4f}{r['seconds']:>9.1f}")
        delta = np.array([r["top1"] - r["float_top1"] for r in mine]) * 100
        agree = np.array([r["agreement"] for r in mine]) * 100
        kl = np.array([r["kl"] for r in mine])
        for label, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
            print(f"{name if label == 'mean' else '':<42}{label:>6}{'':>26}{reduce(delta):>+8.2f}{reduce(agree):>8.2f}"
                  f"{reduce(kl):>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
