"""hswish_shift on the PP-OCR text-direction classifier: int8_sym with and without it.

    python benchmarks/bench_hswish_ocr.py [--calib 100] [--eval 300] [--seed 2020] [--json FILE]

Model: ../shared/models/ch_ppocr_mobile_v2.0_cls_infer.onnx (MobileNetV3-small style; its h-swish
is written Add -> Clip -> Mul -> Div). Data: text lines rendered here with Pillow's built-in
font (random letters and digits, 1-4 words, size 18-33 px, dark or coloured ink on a light
background), half of them rotated by 180 degrees (label 1, as PP-OCR's cls labels '0' / '180'),
resized and normalised as PP-OCR's predict_cls does (height 48, width min(ceil(48 w / h), 192),
(x / 255 - 0.5) / 0.5, right-padded with 0). The first --calib lines calibrate, the next --eval
lines evaluate. Recipe: recipes/int8_sym.yaml's quantization with fold_batchnorm, with and without
hswish_shift. Printed per row: float and quantized accuracy on the labels, agreement of the
quantized top-1 with the float model's, and the SQNR of the model's output (its softmax
probabilities) against float. Not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common import ROOT, model
from qcompile.runtime import session

MODEL = model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
LETTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def render_line(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One preprocessed text line [3, 48, 192] and its label (1 = upside down)."""
    text = " ".join("".join(rng.choice(LETTERS, size=rng.integers(2, 9))) for _ in range(rng.integers(1, 5)))
    font = ImageFont.load_default(size=int(rng.integers(18, 34)))
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    margin_x, margin_y = int(rng.integers(2, 12)), int(rng.integers(2, 8))
    background = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = (0, 0, 0) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 120, 3))
    image = Image.new("RGB", (right - left + 2 * margin_x, bottom - top + 2 * margin_y), background)
    ImageDraw.Draw(image).text((margin_x - left, margin_y - top), text, font=font, fill=ink)
    label = int(rng.random() < 0.5)
    if label:
        image = image.rotate(180)
    width, height = image.size
    new_width = min(int(np.ceil(48 * width / height)), 192)
    pixels = np.asarray(image.resize((new_width, 48), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    line = np.zeros((3, 48, 192), np.float32)
    line[:, :, :new_width] = (pixels / 255.0 - 0.5) / 0.5
    return line, label


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=100)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()

    from qcompile.compiler import compile_model

    rng = np.random.default_rng(args.seed)
    lines = [render_line(rng) for _ in range(args.calib + args.eval)]
    x = np.stack([line for line, _ in lines])
    labels = np.array([label for _, label in lines])
    quantization = (ROOT / "recipes" / "int8_sym.yaml").read_text().split("passes:")[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.savez(work / "calib.npz", x=x[:args.calib])
        test_x, test_labels = x[args.calib:], labels[args.calib:]
        reference = session(MODEL).run(None, {"x": test_x})[0]
        for label, passes in (("int8_sym + fold", ["fold_batchnorm"]),
                              ("int8_sym + fold + hswish_shift", ["fold_batchnorm", "hswish_shift"])):
            recipe = work / "recipe.yaml"
            recipe.write_text(quantization + "passes: " + json.dumps(passes + ["annotate", "calibrate", "insert_qdq"]))
            start = time.perf_counter()
            report = compile_model(MODEL, recipe, work / "q.onnx", calib=work / "calib.npz")
            seconds = time.perf_counter() - start
            quantized = session(work / "q.onnx").run(None, {"x": test_x})[0]
            noise = np.sum((reference - quantized).astype(np.float64) ** 2)
            rows.append({"row": label, "float_accuracy": float(np.mean(reference.argmax(1) == test_labels)),
                         "accuracy": float(np.mean(quantized.argmax(1) == test_labels)),
                         "agreement": float(np.mean(quantized.argmax(1) == reference.argmax(1))),
                         "sqnr_db": float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise)),
                         "shifted": len(report["notes"].get("hswish_shifted", [])), "seconds": seconds})
            print(f"  done: {label}", file=sys.stderr)

    print(f"PP-OCR cls (ch_ppocr_mobile_v2.0), rendered text lines (seed {args.seed}): calibration {args.calib}, "
          f"evaluation {args.eval}; onnxruntime QDQ")
    print(f"{'row':<34}{'float acc':>10}{'int8 acc':>10}{'agree':>8}{'SQNR dB':>9}{'shifted':>9}{'build s':>9}")
    for r in rows:
        print(f"{r['row']:<34}{100 * r['float_accuracy']:>10.2f}{100 * r['accuracy']:>10.2f}"
              f"{100 * r['agreement']:>8.2f}{r['sqnr_db']:>9.2f}{r['shifted']:>9}{r['seconds']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
