"""Static int8 quantisation of an elcell ONNX model with ONNX Runtime's tools.

Torch-free: it starts from the float ONNX file, so a model can be quantised
on the inspection PC. Activations are calibrated on real cells decoded exactly
as `predict` decodes them; weights are quantised per output channel to 7 bits
(QDQ format, uint8 activations, int8 weights in [-64, 63]): one file that
holds on every x86 CPU, since full 8-bit weights saturate ONNX Runtime's
kernels on CPUs without VNNI (elcell.infer.cpuinfo). The int8 file is only written
when recall, the figure a plant cares about, holds up against the float model
beyond chance.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from scipy.stats import binomtest

from elcell.cells.images import Decoding
from elcell.cells.inputs import Unreadable, decode_batches
from elcell.cells.labels import LabelTable, load_table
from elcell.errors import DataError, ExportError
from elcell.infer.evaluate import known_labels, predict_table
from elcell.infer.metrics import fmt, summary
from elcell.infer.modelinfo import INPUT_NAME, read_info, write_info
from elcell.infer.runtime import Model, decide, default_workers, open_model
from elcell.io import atomic_path, output_mode
from elcell.options import show_progress

# The backbone is where the time goes. The head's weights are shared by its
# Gemm layers and by the in-graph Grad-CAM MatMuls, which ONNX Runtime's
# per-channel quantiser cannot give two channel axes; the head is well under 1%
# of the work, so it stays float. Clip is EfficientNet-Lite's ReLU6; quantised,
# it folds into the Conv's output range as Relu does. ConvTranspose is the
# heatmap's backward pass through the last stages (elcell.training.nets.vjp): left float, its
# weights would be a float copy of those stages, and the int8 file larger than
# the float one (on Lite0: 20.2 MB vs 17.3 MB; quantised, 10.5 MB, with the
# heatmaps 1.3% of their peak from the float model's instead of 1.0%).
QUANTIZED_OPS = ["Conv", "Add", "MaxPool", "Relu", "Clip", "ConvTranspose"]
MAX_RECALL_DROP = 0.02
# A drop counts only when the cells int8 misses and float catches are too many
# to be chance against those it catches and float misses (one-sided exact
# McNemar test): one lost cell of 16 positives is not evidence.
EVIDENCE = 0.05
SCHEME = "qdq-u8-s7"  # uint8 activations, int8 weights in 7 bits (reduce_range)
SCHEME_8BIT = "qdq-u8-s8"  # full 8-bit weights: saturates without VNNI; for measuring that only


class CellReader(CalibrationDataReader):
    """Feeds decoded uint8 cells to ONNX Runtime's calibrator, a batch at a time.

    Small batches: the calibration graph keeps every activation of a batch alive
    (ResNet-50 at 300 px: 3.9 GB peak with 8 cells, 1.5 GB with 2); MinMax
    ranges do not depend on the batch size."""

    def __init__(self, images: np.ndarray, batch_size: int = 2):
        self.images, self.batch_size, self.position = images, batch_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {INPUT_NAME: np.ascontiguousarray(batch)[:, None]}

    def rewind(self) -> None:
        self.position = 0


def calibration_cells(table: LabelTable, decoding: Decoding, count: int = 200, seed: int = 0,
                      workers: int | None = None) -> tuple[np.ndarray, list[Unreadable]]:
    """`count` cells drawn at random (seeded) from `table`, decoded as predict does;
    unreadable ones are skipped and returned with their reason."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(table))[:count])
    images, failed = [], []
    workers = default_workers() if workers is None else workers
    for batch in decode_batches([table.paths[i] for i in rows], decoding, 32, workers):
        images.append(batch.images)
        failed += batch.unreadable()
    cells = np.concatenate(images)
    if len(cells) == 0:
        raise DataError(f"{table.source}: none of the calibration images could be read")
    return cells, failed


def float_clips(model_path: str | Path) -> list[str]:
    """Clip nodes that do not follow a Conv: --input-norm cell's floor on the
    standard deviation (clamp_min), which int8 would round to 0. Every ReLU6
    follows a Conv once quant_pre_process has folded the BatchNorms."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    return [node.name for node in graph.node if node.op_type == "Clip" and producer.get(node.input[0]) != "Conv"]


def quantize(float_path: str | Path, out: str | Path, calibration: np.ndarray,
             source: str = "", reduce_range: bool = True) -> Path:
    """Write a statically quantised (QDQ, per-channel int8) copy of `float_path`,
    with the float model's metadata plus how it was quantised. `reduce_range`
    False gives 8-bit weights, the scheme that saturates on CPUs without VNNI
    (benchmarks/int8_emulated_cpu.py measures it; nothing ships it)."""
    float_path, out = Path(float_path), Path(out)
    info = read_info(float_path)
    with tempfile.TemporaryDirectory(prefix="elcell-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # the quantiser logs every skipped tensor
        try:
            # symbolic shape inference needs sympy, which an inspection PC without
            # PyTorch lacks; ONNX's own shape inference gives this CNN the same int8 model
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(quantized), CellReader(calibration),
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=float_clips(prepared),
            )  # MinMax calibration keeps only per-batch minima and maxima: memory stays small
        finally:
            logger.setLevel(level)
        quantization = {"format": "QDQ", "scheme": SCHEME if reduce_range else SCHEME_8BIT,
                        "reduce_range": reduce_range,
                        "weights": f"int8 per channel, {7 if reduce_range else 8}-bit range", "activations": "uint8",
                        "ops": QUANTIZED_OPS, "calibration": source, "calibration_cells": len(calibration),
                        "float_model": float_path.name}
        write_info(quantized, out, replace(info, extra={**info.extra, "quantization": quantization}))
    return out


def compare(float_model: Model, int8_model: Model, table: LabelTable, batch_size: int = 16,
            workers: int | None = None, progress: bool = True) -> dict:
    """F1, precision and recall per label of both models at the float model's
    thresholds, how often their decisions agree, and how far the probabilities differ."""
    # both read the same cells, so unreadable ones are named once, by the first
    runs = {name: predict_table(model, table, batch_size, workers, progress=progress, print_failed=first)
            for name, model, first in (("float", float_model, True), ("int8", int8_model, False))}
    a, b = runs["float"], runs["int8"]
    if [str(p) for p in a.paths] != [str(p) for p in b.paths]:
        raise ExportError("float and int8 models read different cells")  # decoding is deterministic
    info = float_model.info
    columns = [info.labels.index(label) for label in a.labels]
    high = [info.thresholds[c] for c in columns]
    low = [info.review_thresholds[c] for c in columns]
    # recall and F1 on the cells whose label is known; agreement and max|dp| need no labels: all cells
    scores = {name: summary(run.positives, run.probs, run.labels, high, low, known_labels(run))
              for name, run in runs.items()}
    agree = decide(a.probs, high, low) == decide(b.probs, high, low)
    per_label = {}
    for j, label in enumerate(a.labels):
        f, q = scores["float"]["per_label"][label], scores["int8"]["per_label"][label]
        per_label[label] = {
            "positives": f["positives"], "unknown": f["unknown"],
            **{f"{metric}_{name}": m[metric] for name, m in (("float", f), ("int8", q))
               for metric in ("precision", "recall", "f1")},
            # no positives known: no recall to lose
            "recall_drop": 0.0 if f["recall"] is None else f["recall"] - q["recall"],
            **lost_and_gained(a, b, j, high[j]),
            "decision_agreement": float(agree[:, j].mean()),
            "max_prob_diff": float(np.abs(a.probs[:, j] - b.probs[:, j]).max()),
        }
    return {
        "cells": len(a.paths), "data": table.source, "failed": [u.path for u in a.failed],
        "mean_f1_float": scores["float"]["mean_f1"], "mean_f1_int8": scores["int8"]["mean_f1"],
        "weighted_f1_float": scores["float"]["weighted_f1"],
        "weighted_f1_int8": scores["int8"]["weighted_f1"],
        "decision_agreement": float(agree.mean()), "per_label": per_label,
    }


def lost_and_gained(a, b, j: int, threshold: float) -> dict:
    """Known positives of label j that float catches and int8 misses (lost) and
    the reverse (gained), and how likely that many losses are by chance."""
    positive = (a.positives[:, j] == 1) & known_labels(a)[:, j]
    caught_float, caught_int8 = a.probs[:, j] >= threshold, b.probs[:, j] >= threshold
    lost = int((positive & caught_float & ~caught_int8).sum())
    gained = int((positive & ~caught_float & caught_int8).sum())
    chance = float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue) if lost else 1.0
    return {"positives_lost": lost, "positives_gained": gained, "drop_p_value": chance}


def unguarded(comparison: dict) -> list[str]:
    """Labels with too few known positives for the guard to refuse anything: even
    int8 losing every one of them would be within chance (p >= EVIDENCE)."""
    needed = math.ceil(math.log(EVIDENCE) / math.log(0.5))  # every positive lost, none gained
    return [label for label, m in comparison["per_label"].items() if m["positives"] < needed]


def recall_drops(comparison: dict, limit: float = MAX_RECALL_DROP) -> dict[str, float]:
    """Labels whose int8 recall is more than `limit` below float's, with more
    lost positives than chance explains (p < EVIDENCE)."""
    return {label: m["recall_drop"] for label, m in comparison["per_label"].items()
            if m["positives"] and m["recall_drop"] > limit + 1e-12 and m["drop_p_value"] < EVIDENCE}


def quantize_checked(float_path: str | Path, out: str | Path, calibration: str,
                     eval_data: str | None = None, count: int = 200, allow_recall_drop: bool = False,
                     batch_size: int = 16, workers: int | None = None, progress: bool = True,
                     seed: int = 0, group: str | None = None) -> dict:
    """Quantise `float_path` calibrated on `count` cells of `calibration`, compare it
    with the float model on `eval_data` (default: all of `calibration`), and write
    it to `out` unless some label's recall drops by more than 0.02 (then
    ExportError, unless allow_recall_drop). Returns the comparison."""
    float_path, out = Path(float_path), Path(out)
    if count < 1:
        raise DataError(f"--calibration-count {count}: need at least 1 cell")
    float_model = open_model(float_path, providers=["CPUExecutionProvider"])
    if "quantization" in float_model.info.extra:
        raise DataError(f"{float_path} is already an int8 model; quantise the float model it came from")
    table = load_table(calibration, group=group)  # `group` names a column that is not a label
    info = float_model.info
    cells, failed = calibration_cells(table, info.decoding, count, seed, workers)
    evaluation = table if eval_data is None else load_table(eval_data, group=group)
    with tempfile.TemporaryDirectory(prefix="elcell-int8-") as tmp:
        candidate = quantize(float_path, Path(tmp) / out.name, cells, source=str(calibration))
        int8_model = open_model(candidate, providers=["CPUExecutionProvider"])
        comparison = compare(float_model, int8_model, evaluation, batch_size, workers, progress)
        comparison.update(calibration=str(calibration), calibration_cells=len(cells),
                          calibration_failed=[u.path for u in failed], out=str(out))
        drops = recall_drops(comparison)
        comparison["unguarded"] = unguarded(comparison)
        comparison["refused"] = bool(drops) and not allow_recall_drop
        if drops and not allow_recall_drop:
            detail = ", ".join(f"{label} -{drop:.3f}" for label, drop in drops.items())
            comparison["refusal"] = (
                f"int8 recall drops by more than {MAX_RECALL_DROP}, beyond chance ({detail}) on {comparison['cells']} "
                f"cells of {evaluation.source}; {out} not written. Calibrate on more or other cells, "
                "or pass --allow-recall-drop to write it anyway"
            )
            return comparison
        del int8_model
        with atomic_path(out) as target:
            shutil.copyfile(candidate, target)
    return comparison


def format_comparison(comparison: dict) -> str:
    lines = [f"float vs int8 on {comparison['cells']} cells of {comparison['data']} "
             f"(calibrated on {comparison['calibration_cells']} cells of {comparison['calibration']}):",
             f"  {'label':<14}{'pos':>6}{'unk':>6}{'F1 fp32':>9}{'F1 int8':>9}{'rec fp32':>10}{'rec int8':>10}"
             f"{'lost':>6}{'gained':>7}{'agree':>8}{'max|dp|':>9}"]
    for label, m in comparison["per_label"].items():
        lines.append(f"  {label:<14}{m['positives']:>6}{m['unknown']:>6}{fmt(m['f1_float']):>9}{fmt(m['f1_int8']):>9}"
                     f"{fmt(m['recall_float']):>10}{fmt(m['recall_int8']):>10}"
                     f"{m['positives_lost']:>6}{m['positives_gained']:>7}"
                     f"{m['decision_agreement']:>8.3f}{m['max_prob_diff']:>9.4f}")
    lines.append("  lost/gained: positives float catches and int8 misses, and the reverse; a recall drop "
                 f"refuses the model only when the losses are beyond chance (p < {EVIDENCE})")
    lines.append(f"  mean F1 {fmt(comparison['mean_f1_float'], '.4f')} (fp32) vs {fmt(comparison['mean_f1_int8'], '.4f')} "
                 f"(int8); decisions agree on {100 * comparison['decision_agreement']:.1f}% of cell labels")
    for label in comparison.get("unguarded", []):
        lines.append(f"  warning: {comparison['per_label'][label]['positives']} known {label} positive(s) among these "
                     "cells: too few for a recall drop to show beyond chance, so the guard could not refuse; "
                     "compare on cells with more of them (--eval-data LABELS.csv)")
    # those also compared on were named on stderr already
    unnamed = [p for p in comparison["calibration_failed"] if p not in comparison["failed"]]
    if unnamed:
        lines.append(f"  {len(unnamed)} calibration image(s) could not be read and were left out: "
                     + ", ".join(unnamed[:5]) + (", ..." if len(unnamed) > 5 else ""))
    return "\n".join(lines)


def main(args, float_path: Path) -> int:
    """`elcell export --int8` once the float model exists (options: elcell.cli)."""
    int8_out = Path(args.int8_out) if args.int8_out else float_path.with_name(f"{float_path.stem}.int8.onnx")
    output_mode(int8_out, "--int8-out", overwrite=args.overwrite, file=True)
    comparison = quantize_checked(
        float_path, int8_out, args.calibration, eval_data=args.eval_data, count=args.calibration_count,
        allow_recall_drop=args.allow_recall_drop, batch_size=args.batch_size,
        progress=show_progress(args.progress), group=args.group)
    print(format_comparison(comparison))
    if comparison["refused"]:
        raise ExportError(comparison["refusal"])
    print(f"wrote {int8_out}")
    # as predict and evaluate: written from the cells that could be read, and said so in the status
    return 1 if comparison["calibration_failed"] or comparison["failed"] else 0
