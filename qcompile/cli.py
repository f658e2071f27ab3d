"""The `qcompile` command. Exit codes: 0 ok, 2 usage or input error, 1 internal error (a bug)."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import QCompileError

EXIT_OK, EXIT_BUG, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile", description="Post-training quantization of an ONNX model, as a recipe says.",
        epilog="exit codes: 0 ok; 2 usage or input error (message names the file/field); 1 internal error")
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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .compiler import compile_model
    from .report import summary

    try:
        report = compile_model(args.model, args.recipe, args.output, calib=args.calib, eval_data=args.eval_data,
                               report=args.report, dump_ir=args.dump_ir, plugins=args.plugin,
                               progress=_progress(args.quiet), jobs=args.jobs)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(summary(report))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
