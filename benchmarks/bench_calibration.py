"""Calibration methods on EfficientNet-Lite0: qcompile calibrators vs onnxruntime quantize_static (one run, one table).

    python benchmarks/bench_calibration.py [--sizes 100,400] [--methods max,entropy,...] [--json OUT] [--quick]
                                           [--per-tensor-methods all] [--cap-gib 16] [--timeout 900]

Model ../shared/models/efficientnet_lite0_fused.onnx (batch fixed at 1), data
../shared/data/imagenet_sample_dev.npz (500 uint8 images, x = (u8 - 127) / 128, NHWC -> NCHW).
Calibration on images[:N] for each N in --sizes; evaluation always on images[100:500].

Every quantization runs in its own child process, so peak RSS (os.wait4's ru_maxrss of that child:
interpreter + imports + model + calibration) is per run; each child has an address-space cap
(RLIMIT_AS, --cap-gib) and a timeout, reported as "OOM" / "timeout" instead of failing the run.
The time column is the wall time of compile_model / quantize_static alone, measured in the child.

qcompile: activations int8 symmetric per tensor (uint8 zero point 0 where provably non-negative,
as recipes/int8_sym.yaml), weights int8 symmetric max, per channel and (by default for max, entropy and
percentile only; --per-tensor-methods all for every calibrator) per tensor; the calibration
images are a uint8 .npy (memory-mapped by qcompile), calibration batch 1.
onnxruntime: QDQ, per_channel, QInt8 activations (ActivationSymmetric) and weights (WeightSymmetric),
MinMax / Entropy / Percentile with onnxruntime's default options; its data reader preprocesses one
image at a time from the same memory-mapped .npy.
Not a test: prints a table (and --json writes the rows).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DEV_DATA, ROOT, image_reader, model, top1

MODEL = model("efficientnet_lite0_fused.onnx")
DATA = DEV_DATA
EVAL_START, EVAL_STOP = 100, 500
HELD_OUT_START = 400            # images[400:500]: outside every calibration set up to 400 images

QC_METHODS = ("max", "entropy", "percentile", "mse", "aciq", "ema_max")
QC_OPTIONS = {"percentile": {"percentile": 99.99}}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
ORT_FOR = {"max": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
PER_TENSOR_REDUCED = ("max", "entropy", "percentile")

RECIPE = """
version: 1
target: qdq
quantization:
  weights: {{bits: 8, symmetric: true, granularity: {granularity}, calibrator: max}}
  activations:
    bits: 8
    symmetric: true
    signed: true
    unsigned_when_nonnegative: true
    calibrator: {method}
    calibrator_options: {options}
calibration: {{batch_size: 1}}
evaluation: {{layer_samples: 0}}   # no per-layer SQNR report: time and memory of the quantization alone
preprocessing: {{mean: [127.0], std: [128.0], layout: NCHW}}
passes: [annotate, calibrate, insert_qdq]
"""

OOM_MARKERS = ("MemoryError", "bad_alloc", "Failed to allocate", "Unable to allocate", "Cannot allocate memory",
               "out of memory")


# ----------------------------------------------------------------------------------------------- child

def child(spec: dict) -> int:
    """One quantization; prints one JSON line with the seconds and this process's peak RSS."""
    if spec["tool"] == "qcompile":
        from qcompile.compiler import compile_model

        start = time.perf_counter()
        compile_model(MODEL, spec["recipe"], spec["out"], calib=spec["calib"])
        seconds = time.perf_counter() - start
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        images = np.load(spec["calib"], mmap_mode="r")
        start = time.perf_counter()
        quantize_static(MODEL, spec["out"], image_reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, spec["method"]),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "self_rss_bytes": rss}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- parent

def run_child(spec: dict, work: Path, cap_bytes: int, timeout: float) -> dict:
    """Run one quantization in a child process; returns status, seconds, peak RSS."""
    tag = Path(spec["out"]).stem
    out_path, err_path = work / f"{tag}.stdout", work / f"{tag}.stderr"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=out, stderr=err, preexec_fn=limit, cwd=work)
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()                                   # this child only, by its pid
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    rss = usage.ru_maxrss * 1024
    cpu = usage.ru_utime + usage.ru_stime
    stderr = err_path.read_text(errors="replace")
    row = {"status": "ok", "seconds": None, "rss_bytes": rss, "cpu_seconds": cpu, "returncode": proc.returncode}
    if timed_out:
        row["status"] = "timeout"
        return row
    if proc.returncode != 0:
        if any(m in stderr for m in OOM_MARKERS) or rss > 0.9 * cap_bytes:   # a crash at the cap is an OOM too
            row["status"] = "oom"
        elif proc.returncode == -signal.SIGKILL:
            row["status"] = "killed"                          # e.g. the system OOM killer
        else:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            row["status"] = "error"
            row["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
        return row
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
    reported = json.loads(lines[-1])
    row["seconds"] = reported["seconds"]
    row["self_rss_bytes"] = reported["self_rss_bytes"]
    return row


def fingerprint(model_path: Path) -> str:
    """Hash of every initializer (weights, scales, zero points): equal hashes = the same quantized model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    digest = hashlib.sha1()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(init.name.encode())
        digest.update(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
    return digest.hexdigest()[:12]


def source_stamp() -> float:
    """Newest modification time of qcompile's sources: a change during the run means rows mix code versions."""
    return max((f.stat().st_mtime for d in ("qcompile", "passes", "calibrators") for f in (ROOT / d).rglob("*.py")),
               default=0.0)


def plan(args) -> list[dict]:
    """Each onnxruntime method runs next to its qcompile counterpart, so paired times see similar machine load."""
    runs = []
    counterpart = {v: k for k, v in ORT_FOR.items()}
    for size in args.sizes:
        groups = [([m], [counterpart[m]] if counterpart[m] in args.methods else []) for m in args.ort_methods]
        paired = {q for _, qs in groups for q in qs}
        groups += [([], [m]) for m in args.methods if m not in paired]
        for ort_methods, qc_methods in groups:
            for method in ort_methods:
                runs.append({"tool": "onnxruntime", "method": method, "granularity": "per_channel", "size": size})
            for method in qc_methods:
                for granularity in args.granularities:
                    if (granularity == "per_tensor" and args.per_tensor_methods
                            and method not in args.per_tensor_methods):
                        continue
                    runs.append({"tool": "qcompile", "method": method, "granularity": granularity, "size": size})
    return runs


def fmt_ratio(value: float | None, bound: str = "") -> str:
    return "" if value is None else f"{bound}{value:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,400", help="calibration sizes (first N images), comma-separated")
    parser.add_argument("--methods", default=",".join(QC_METHODS), help="qcompile activation calibrators")
    parser.add_argument("--ort-methods", default=",".join(ORT_METHODS),
                        help="onnxruntime calibrate methods (MinMax,Entropy,Percentile; 'none' for none)")
    parser.add_argument("--granularities", default="per_channel,per_tensor", help="qcompile weight granularities")
    parser.add_argument("--per-tensor-methods", default=",".join(PER_TENSOR_REDUCED),
                        help="per-tensor weight rows only for these calibrators (default max,entropy,percentile, "
                             "to keep the run short; 'all': every one of --methods)")
    parser.add_argument("--cap-gib", type=float, default=16.0, help="address-space cap of each child (GiB)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per-run timeout (s)")
    parser.add_argument("--quick", action="store_true", help="100 calibration images, per-channel weights only")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    args.sizes = [100] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    args.ort_methods = [] if args.ort_methods == "none" else [m for m in args.ort_methods.split(",") if m]
    args.granularities = ["per_channel"] if args.quick else [g for g in args.granularities.split(",") if g]
    args.per_tensor_methods = ([] if args.per_tensor_methods == "all"
                               else [m for m in args.per_tensor_methods.split(",") if m])
    for m in args.methods:
        if m not in QC_METHODS:
            parser.error(f"--methods: unknown calibrator {m!r} (choose from {', '.join(QC_METHODS)})")
    for m in args.ort_methods:
        if m not in ORT_METHODS:
            parser.error(f"--ort-methods: unknown method {m!r} (choose from {', '.join(ORT_METHODS)})")
    for g in args.granularities:
        if g not in ("per_channel", "per_tensor"):
            parser.error(f"--granularities: unknown granularity {g!r}")
    if any(s < 1 or s > 500 for s in args.sizes):
        parser.error("--sizes: each size must be in 1..500")
    cap_bytes = int(args.cap_gib * 2**30)

    data = np.load(DATA)
    images, labels = data["images"], data["labels"]
    eval_images, eval_labels = images[EVAL_START:EVAL_STOP], labels[EVAL_START:EVAL_STOP]
    held = slice(HELD_OUT_START - EVAL_START, EVAL_STOP - EVAL_START)

    rows: list[dict] = []
    stamp = source_stamp()
    wall_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_calib_") as tmp:
        work = Path(tmp)
        calib_files = {}
        for size in args.sizes:
            calib_files[size] = work / f"calib_{size}.npy"
            np.save(calib_files[size], np.ascontiguousarray(images[:size]))
        float_pred = top1(MODEL, eval_images)
        float_row = {"tool": "float", "method": "fp32", "granularity": "", "size": 0, "status": "ok",
                     "top1": float(np.mean(float_pred == eval_labels)),
                     "top1_heldout": float(np.mean(float_pred[held] == eval_labels[held])), "agreement": 1.0}
        runs = plan(args)
        for index, run in enumerate(runs, 1):
            tag = f"{run['tool'][:3]}_{run['method']}_{run['granularity']}_{run['size']}"
            spec = {"tool": run["tool"], "method": run["method"], "calib": str(calib_files[run["size"]]),
                    "out": str(work / f"{tag}.onnx")}
            if run["tool"] == "qcompile":
                recipe = work / f"{tag}.yaml"
                recipe.write_text(RECIPE.format(granularity=run["granularity"], method=run["method"],
                                                options=json.dumps(QC_OPTIONS.get(run["method"], {}))))
                spec["recipe"] = str(recipe)
            print(f"  [{index}/{len(runs)}] {run['tool']} {run['method']} {run['granularity']} "
                  f"calib {run['size']} ...", file=sys.stderr, flush=True)
            result = run_child(spec, work, cap_bytes, args.timeout)
            row = {**run, **result}
            if result["status"] == "ok":
                pred = top1(Path(spec["out"]), eval_images)
                row["top1"] = float(np.mean(pred == eval_labels))
                row["top1_heldout"] = float(np.mean(pred[held] == eval_labels[held]))
                row["agreement"] = float(np.mean(pred == float_pred))
                row["fingerprint"] = fingerprint(Path(spec["out"]))
            rows.append(row)
            took = "" if result["seconds"] is None else f"{result['seconds']:.1f} s, "
            print(f"      {result['status']}, {result['rss_bytes'] / 2**30:.2f} GiB, {took}"
                  f"elapsed {time.perf_counter() - wall_start:.0f} s", file=sys.stderr, flush=True)

    # ratios against onnxruntime's corresponding method, same calibration size (per-channel rows only:
    # onnxruntime runs per-channel weights only)
    ort = {(r["method"], r["size"]): r for r in rows if r["tool"] == "onnxruntime"}
    for r in rows:
        r["rss_vs_ort"] = r["time_vs_ort"] = None
        r["ratio_bound"] = ""
        o = ort.get((ORT_FOR.get(r["method"]), r["size"]))
        if r["tool"] != "qcompile" or r["granularity"] != "per_channel" or o is None or r["status"] != "ok":
            continue
        if o["status"] == "ok":
            r["rss_vs_ort"] = r["rss_bytes"] / o["rss_bytes"]
            r["time_vs_ort"] = r["seconds"] / o["seconds"]
        elif o["status"] in ("oom", "killed"):
            r["rss_vs_ort"] = r["rss_bytes"] / max(o["rss_bytes"], cap_bytes)   # ORT needed more than this
            r["ratio_bound"] = "<"
        elif o["status"] == "timeout":
            r["time_vs_ort"] = r["seconds"] / args.timeout
            r["ratio_bound"] = "<"

    # identical quantized models (same initializers) within one tool, size and granularity
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("fingerprint"):
            groups.setdefault((r["tool"], r["size"], r["granularity"], r["fingerprint"]), []).append(r["method"])
    for r in rows:
        if r.get("fingerprint"):
            same = [m for m in groups[(r["tool"], r["size"], r["granularity"], r["fingerprint"])] if m != r["method"]]
            r["same_model_as"] = same

    cap = f"{args.cap_gib:g}"
    status_text = {"oom": f"OOM (>{cap} GiB cap)", "killed": "killed (SIGKILL; system OOM?)",
                   "timeout": f"timeout (>{args.timeout:g} s)"}
    n_eval = EVAL_STOP - EVAL_START
    print("EfficientNet-Lite0 fused (batch 1), imagenet_sample_dev.npz; x = (u8 - 127) / 128, NCHW; QDQ int8")
    print(f"calibration: images[:N] for N in {args.sizes}; evaluation: images[{EVAL_START}:{EVAL_STOP}] "
          f"({n_eval} images) for every row.")
    if any(s > EVAL_START for s in args.sizes):
        print(f"  NOTE: for N > {EVAL_START} the evaluation images overlap the calibration images "
              f"(N=400: images[100:400], 300 of the {n_eval}, were also calibration images). Column "
              f"'top1 unseen' is top-1 on images[{HELD_OUT_START}:{EVAL_STOP}] only ({EVAL_STOP - HELD_OUT_START} "
              f"images, outside every calibration set; 1 image = 1 point).")
    print("qcompile: activations int8 symmetric per tensor (uint8 zp 0 where provably >= 0), weights int8 symmetric "
          "max per channel (pc) / per tensor (pt); percentile = 99.99; per-layer SQNR report off.")
    pt = [m for m in args.methods if not args.per_tensor_methods or m in args.per_tensor_methods]
    if "per_tensor" in args.granularities and pt != args.methods:
        print(f"  per-tensor weight rows only for: {', '.join(pt)} (--per-tensor-methods all for the full grid)")
    print("onnxruntime quantize_static: QDQ, per_channel, QInt8 activations ActivationSymmetric, QInt8 weights "
          "WeightSymmetric, default method options (Percentile 99.999, Entropy 128 bins).")
    print(f"peak RSS = ru_maxrss of the child process that ran one quantization (incl. Python + imports); "
          f"quant s = wall time of the quantization call only; CPU s = user+sys CPU of the whole child; "
          f"each child capped at {cap} GiB address space, {args.timeout:g} s.")
    print("xORT = qcompile / onnxruntime for the same calibration size, max~MinMax, entropy~Entropy, "
          "percentile~Percentile (per-channel rows; '<' = ORT failed, bound from the cap/timeout).")
    print("Other processes may have been running on this 2-core machine: times are indicative.")
    if source_stamp() != stamp:
        print(f"WARNING: qcompile's sources changed during this run (newest now {time.ctime(source_stamp())}): "
              f"rows may come from different code versions.")
    print()
    header = (f"{'N':>4}  {'tool':<12}{'method':<11}{'wts':<4}{'peak GiB':>9}{'quant s':>9}{'CPU s':>7}{'top1 %':>8}"
              f"{'agree %':>9}{'top1 unseen':>12}{'RSS xORT':>10}{'time xORT':>10}  notes")
    print(header)
    print("-" * len(header))
    print(f"{'':>4}  {'float':<12}{'fp32':<11}{'':<4}{'':>9}{'':>9}{'':>7}{100 * float_row['top1']:>8.2f}"
          f"{100.0:>9.2f}{100 * float_row['top1_heldout']:>12.2f}")
    for size in args.sizes:
        for r in (r for r in rows if r["size"] == size):
            wts = {"per_channel": "pc", "per_tensor": "pt"}[r["granularity"]]
            gib = f"{r['rss_bytes'] / 2**30:.2f}"
            if r["status"] == "ok":
                notes = f"same model as {', '.join(r['same_model_as'])}" if r.get("same_model_as") else ""
                print(f"{size:>4}  {r['tool']:<12}{r['method']:<11}{wts:<4}{gib:>9}{r['seconds']:>9.1f}{r['cpu_seconds']:>7.0f}"
                      f"{100 * r['top1']:>8.2f}{100 * r['agreement']:>9.2f}{100 * r['top1_heldout']:>12.2f}"
                      f"{fmt_ratio(r['rss_vs_ort'], r['ratio_bound']):>10}"
                      f"{fmt_ratio(r['time_vs_ort'], r['ratio_bound']):>10}  {notes}")
            else:
                notes = status_text.get(r["status"], f"error: {r.get('error', '')}"[:80])
                print(f"{size:>4}  {r['tool']:<12}{r['method']:<11}{wts:<4}{gib:>9}{'-':>9}{r['cpu_seconds']:>7.0f}{'-':>8}{'-':>9}"
                      f"{'-':>12}{'':>10}{'':>10}  {notes}")
    print(f"total wall time {time.perf_counter() - wall_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"float": float_row, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
