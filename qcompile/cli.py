"""The `qcompile` command. Exit codes: 0 ok, 2 usage or input error, 3 quality gate failed (model and
report written), 1 internal error (a bug)."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import QCompileError

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 4
EXIT_GATE = 3  # a gate check failed; the model and the report are still written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile", description="Post-training quantization of an ONNX model, as a recipe says.",
        epilog="exit codes: 0 ok; 2 usage or input error (message names the file/field); 3 quality gate failed "
               "(one line on stderr; model, report and --junit still written); 4 --verify found the "
               "integer model off by more than 1 LSB; 1 internal error. Also: qcompile verify MODEL --data DATA")
    parser.add_argument("model", help="float ONNX model (never modified)")
    parser.add_argument("--recipe", required=True, help="YAML recipe (see README: recipe reference)")
    parser.add_argument("-o", "--output", help="quantized model path (default: MODEL stem + .int8.onnx)")
    parser.add_argument("--calib", help="calibration data: .npy, .npz or a folder of images")
    parser.add_argument("--eval", dest="eval_data", help="evaluation data (labels optional): float vs quantized")
    parser.add_argument("--report", help="report JSON path (default: OUTPUT stem + .report.json)")
    parser.add_argument("--dump-ir", help="write the IR as text after each pass into this folder")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import a module that registers passes/calibrators (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="collect calibration statistics in N processes and merge them (default 1)")
    parser.add_argument("--metrics", help="comma-separated metric names to evaluate (default: the recipe's "
                        "evaluation.metrics, else top1/top5/agreement/sqnr/cosine/kl where they apply)")
    parser.add_argument("--max-drop", action="append", default=[], metavar="[METRIC=]N",
                        help="gate: fail (exit 3) if METRIC drops more than N (its unit: points for top1); "
                             "METRIC defaults to top1 with labels, else agreement (repeatable)")
    parser.add_argument("--min", dest="gate_min", action="append", default=[], metavar="METRIC=N",
                        help="gate: fail (exit 3) if the quantized METRIC is below N, e.g. sqnr=30 (repeatable)")
    parser.add_argument("--max", dest="gate_max", action="append", default=[], metavar="METRIC=N",
                        help="gate: fail (exit 3) if the quantized METRIC is above N, e.g. kl=0.05 (repeatable)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="rank layers by the damage their quantization does (recipe: sensitivity)")
    parser.add_argument("--junit", metavar="FILE", help="write the gate as JUnit XML (one testcase per check)")
    parser.add_argument("--html", metavar="FILE", help="HTML report (default: report stem + .html)")
    parser.add_argument("--markdown", metavar="FILE", help="Markdown summary (default: report stem + .md)")
    parser.add_argument("--verify", action="store_true",
                        help="after writing, run the integer reference executor against onnxruntime on the "
                             "--eval (or --calib) data; exit 4 if an op, given onnxruntime's inputs, is more than 1 LSB off")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    parser.add_argument("--version", action="version", version=f"qcompile {__version__}")
    return parser


def _progress(quiet: bool):
    if quiet:
        return lambda it, total, desc: it
    from tqdm import tqdm

    return lambda it, total, desc: tqdm(it, total=total, desc=desc, unit="batch", leave=False, file=sys.stderr,
                                        disable=None)


def _verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile verify",
        description="Run an integer model in the integer reference executor and in onnxruntime and compare them "
                    "tensor by tensor (QDQ models are lowered to QOperator first).",
        epilog="exit codes: 0 every op, given onnxruntime's inputs, within 1 LSB of onnxruntime; 4 some op differs by "
               "more; 2 usage or input error")
    parser.add_argument("model", help="quantized ONNX model (QOperator, or QDQ)")
    parser.add_argument("--data", required=True, help=".npy, .npz or image folder (see README: Data)")
    parser.add_argument("--float", dest="float_model", help="the float model, for SQNR per tensor and output")
    parser.add_argument("--mode", choices=["onnx", "fixed-point"], default="onnx",
                        help="requantization: onnx (float scale, ties to even) or fixed-point (gemmlowp)")
    parser.add_argument("--samples", type=int, default=50, help="samples to run (default 50)")
    parser.add_argument("--recipe", help="recipe whose preprocessing block applies to images / uint8 data")
    parser.add_argument("--json", help="write the comparison as JSON here")
    return parser


def verify_main(argv: list[str]) -> int:
    args = _verify_parser().parse_args(argv)
    from .recipe import load_recipe
    from .report import write_json
    from .verify import verify

    try:
        preprocessing = None
        if args.recipe:
            from .registry import load_builtins_and_entry_points

            load_builtins_and_entry_points()
            preprocessing = load_recipe(args.recipe).preprocessing
        result = verify(args.model, args.data, float_model=args.float_model, mode=args.mode, samples=args.samples,
                        preprocessing=preprocessing)
    except QCompileError as exc:
        print(f"qcompile verify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(result.table())
    if args.json:
        write_json(result.as_dict(), args.json)
    return EXIT_OK if result.passed else EXIT_VERIFY


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .compiler import compile_model
    from .gate import checks_from_cli
    from .report import summary

    try:
        gate = checks_from_cli(args.max_drop, args.gate_min, args.gate_max)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        report = compile_model(args.model, args.recipe, args.output, calib=args.calib, eval_data=args.eval_data,
                               report=args.report, dump_ir=args.dump_ir, plugins=args.plugin,
                               progress=_progress(args.quiet), jobs=args.jobs, verify=args.verify,
                               metrics=metrics, gate=gate, sensitivity=args.sensitivity,
                               html=args.html or True, markdown=args.markdown or True)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output written", file=sys.stderr)
        return 130
    if args.junit:
        from .junit import write_junit

        write_junit(report, args.junit)
    if not args.quiet:
        print(summary(report))
    gate_failed = report.get("gate") is not None and not report["gate"]["passed"]
    if gate_failed:
        failures = [c["message"] for c in report["gate"]["checks"] if not c["passed"]]
        print(f"qcompile: gate failed: {'; '.join(failures)}", file=sys.stderr)
    verification = report.get("verification")
    if verification is not None and not args.quiet:
        checks = verification["outputs"] + verification["layers"]
        print(f"  verify ({verification['mode']} mode, {verification['samples']} samples): "
              f"{'PASS' if verification['passed'] else 'FAIL'}; {len(checks)} tensors, "
              f"min identical {100 * min(c['identical'] for c in checks):.2f}%, "
              f"max {max(c['max_lsb'] for c in checks)} LSB vs onnxruntime per op, "
              f"{max(c['drift_lsb'] for c in checks)} end to end")
    if verification is not None and not verification["passed"]:
        worst = max(verification["outputs"] + verification["layers"], key=lambda c: c["max_lsb"])
        print(f"qcompile: verification failed: tensor '{worst['tensor']}' differs from onnxruntime by "
              f"{worst['max_lsb']} LSB, computed from the same inputs", file=sys.stderr)
        return EXIT_VERIFY
    return EXIT_GATE if gate_failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
