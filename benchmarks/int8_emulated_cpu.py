"""A model's int8 probabilities on a CPU without VNNI, measured on any CPU:
ONNX Runtime under QEMU's user-mode emulation of an AMD EPYC-Milan (Zen 3:
AVX2, no AVX-512, no VNNI), against the int8 graph run node by node in float.

    python benchmarks/int8_emulated_cpu.py RUN_OR_FLOAT.onnx --data CELLS.csv [--count 8] [--cpu EPYC-Milan] [--schemes s7,s8]

The float model is quantised here twice, calibrated on the same 100 cells of
--calibration (default: the run's val.csv): elcell's scheme (7-bit weights)
and 8-bit weights, the scheme that saturates ONNX Runtime's u8s8 kernels
without VNNI. For each, --count cells of --data (the first ones: pass cells
the model did not train on) are scored three ways:

* reference: the QDQ graph with every optimisation off, each node in float;
  the definition of the int8 model, the same on every CPU;
* this CPU's fused int8 kernels;
* the same fused kernels under `qemu-x86_64 -cpu CPU`.

The fused kernels do not compute the reference exactly on any CPU (they
requantise between fused operations; about 0.02 of probability on the default
model), so the figure that matters is emulated against this CPU: where they
agree, a CPU of that kind decides as this one does on every cell, which `elcell
export --int8` measures here on all of them (on a CPU with VNNI, where the
kernels cannot saturate). Emulation is slow
(tens of seconds per 225 px cell), so --count stays small; it says nothing
of speed. Needs qemu-user (Debian: apt-get install qemu-user).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from elcell.cells.images import load_cell
from elcell.cells.labels import load_table
from elcell.infer.cpuinfo import cpu_flags, cpu_model, has_vnni
from elcell.infer.modelinfo import INPUT_NAME, read_info
from elcell.infer.quantize import calibration_cells, quantize
from elcell.infer.runtime import cut_graph, decide, resolve_model_path

# Runs in the emulated process: the CPU features it sees, then the model's probabilities.
SCORE = """
import sys, numpy as np, onnxruntime as ort
try:
    from numpy._core._multiarray_umath import __cpu_features__ as cpu
except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_features__ as cpu
print("emulated CPU sees: " + " ".join(k for k in ("AVX2", "AVX512F", "AVX512VNNI") if cpu[k]), flush=True)
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(["probs"], {sys.argv[4]: np.load(sys.argv[2])})[0])
"""


def probs_only(path: Path, out: Path) -> Path:
    """The graph cut down to `probs` (as elcell's runtime scores cells): ONNX Runtime
    computes every output of a graph, and the heatmap's backward pass would
    multiply the time under emulation."""
    onnx.save(cut_graph(onnx.load(str(path)), ["probs"]), out)
    return out


def session(path: Path, optimised: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def emulated(qemu: str, cpu: str, model: Path, x: np.ndarray, folder: Path) -> tuple[np.ndarray, float]:
    x_path, y_path = folder / "x.npy", folder / f"{model.stem}-emulated.npy"
    np.save(x_path, x)
    start = time.perf_counter()
    done = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", SCORE, str(model), str(x_path), str(y_path),
                           INPUT_NAME], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"emulated run failed:\n{done.stderr[-3000:]}")
    print("  " + done.stdout.strip().splitlines()[-1])
    return np.load(y_path), time.perf_counter() - start


def report(name: str, probs: dict[str, np.ndarray], info) -> None:
    """Pairs of ways: largest probability difference, decisions that differ."""
    for a, b in (("this CPU", "reference"), ("emulated", "reference"), ("emulated", "this CPU"),
                 ("emulated", "float")):
        differ = (decide(probs[a], info.thresholds, info.review_thresholds)
                  != decide(probs[b], info.thresholds, info.review_thresholds)).sum()
        print(f"  {name}, {a} - {b}: largest |probability difference| "
              f"{np.abs(probs[a] - probs[b]).max():.2e}, decisions differing {differ} of {probs[a].size}")


def f1_at(probs: np.ndarray, truth: np.ndarray, thresholds) -> list[float]:
    """F1 per label, a cell positive where its label is >= 0.5 and flagged at >= threshold."""
    scores = []
    for j, threshold in enumerate(thresholds):
        known = ~np.isnan(truth[:, j])
        positive, flagged = truth[known, j] >= 0.5, probs[known, j] >= threshold
        hits = int((positive & flagged).sum())
        scores.append(2 * hits / max(int(positive.sum()) + int(flagged.sum()), 1))
    return scores


def report_f1(probs: dict[str, np.ndarray], truth: np.ndarray, info) -> None:
    """F1 per label at 0.5 and at the model's thresholds, each way, with the labels' mean at 0.5."""
    for way, p in probs.items():
        at_half, own = f1_at(p, truth, [0.5] * len(info.labels)), f1_at(p, truth, info.thresholds)
        labels = ", ".join(f"{label} {a:.3f} / {o:.3f}" for label, a, o in zip(info.labels, at_half, own,
                                                                                strict=True))
        print(f"    {way:9s}: F1 at 0.5 / at its thresholds: {labels}; mean at 0.5 {np.mean(at_half):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="float elcell ONNX file or run folder")
    parser.add_argument("--data", required=True, help="labels CSV of cells the model did not train on")
    parser.add_argument("--calibration", help="labels CSV to calibrate on (default: the run's val.csv)")
    parser.add_argument("--count", type=int, default=8, help="cells scored under emulation")
    parser.add_argument("--cpu", default="EPYC-Milan", help="QEMU CPU model (qemu-x86_64 -cpu help)")
    parser.add_argument("--group", help="a CSV column that is not a label (e.g. type)")
    parser.add_argument("--schemes", default="s7,s8",
                        help="s7: elcell's 7-bit weights; s8: 8-bit weights (several times slower to emulate)")
    args = parser.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("qemu-x86_64 not found: apt-get install qemu-user")
    float_path = resolve_model_path(args.model)
    calibration = args.calibration or str(float_path.parent / "val.csv")
    cpu = cpu_model() or platform.processor()
    print(" ".join(sys.argv), "|", cpu, "| VNNI" if has_vnni() else "| no VNNI",
          "| bf16" if cpu_flags() and "avx512_bf16" in cpu_flags() else "| no bf16", "| onnxruntime", ort.__version__)
    info = read_info(float_path)
    if "quantization" in info.extra:
        sys.exit(f"{float_path} is an int8 model; give the float model it came from")
    decoding = info.decoding
    table = load_table(args.data, group=args.group)
    cells, _ = calibration_cells(load_table(calibration, group=args.group), decoding, 100)
    x = np.stack([load_cell(path, decoding) for path in table.paths[:args.count]])[:, None]  # uint8 [B, 1, S, S]
    truth = table.targets[:len(x)]
    print(f"{float_path.name}: the first {len(x)} cells of {args.data} under emulated {args.cpu}")
    with tempfile.TemporaryDirectory(prefix="elcell-emulated-") as tmp:
        folder = Path(tmp)
        float_probs = session(probs_only(float_path, folder / "float.probs.onnx"), True).run(
            ["probs"], {INPUT_NAME: x})[0]
        for scheme in args.schemes.split(","):
            name, reduce_range = {"s7": ("7-bit weights (elcell)", True), "s8": ("8-bit weights", False)}[scheme]
            path = probs_only(quantize(float_path, folder / f"{scheme}.int8.onnx", cells, source=calibration,
                                       reduce_range=reduce_range), folder / f"{scheme}.probs.onnx")
            probs = {"reference": session(path, False).run(["probs"], {INPUT_NAME: x})[0],
                     "this CPU": session(path, True).run(["probs"], {INPUT_NAME: x})[0]}
            probs["emulated"], seconds = emulated(qemu, args.cpu, path, x, folder)
            probs["float"] = float_probs  # this CPU
            print(f"  ({seconds:.0f} s emulated)")
            report(name, probs, info)
            report_f1({"float": float_probs, "this CPU": probs["this CPU"], "emulated": probs["emulated"]},
                      truth, info)


if __name__ == "__main__":
    main()
