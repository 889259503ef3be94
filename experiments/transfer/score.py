"""Score finished transfer runs on their own val and test cells, as an
inspection PC runs the model: at its thresholds (0.5), with test-time
augmentation, and at thresholds tuned for F1 on the validation cells.

    python experiments/transfer/score.py runs/transfer/T01-lite0-225 [RUN ...]

A run whose ONNX export is missing (an interrupted run) is exported from its
best checkpoint first. Prints one line per run and setting (val and test F1 and
ROC-AUC per label, mean F1), the figures docs/accuracy.md quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from elcell.cells.labels import load_table
from elcell.infer.evaluate import evaluate, predict_table
from elcell.infer.metrics import fmt, summary, tune
from elcell.infer.runtime import open_model, resolve_model_path


def model_of(run: Path) -> Path:
    try:
        return resolve_model_path(run)
    except Exception:  # no finished export: make it from the best checkpoint
        best = max((run / "checkpoints").glob("best-*.ckpt"), key=lambda p: float(p.stem.split("f1")[-1]))
        subprocess.run([sys.executable, "-m", "elcell.cli", "export", str(best), "--out", f"{run}/"], check=True)
        return resolve_model_path(run)


def line(name: str, block: dict) -> str:
    labels = ", ".join(f"{label} {fmt(m['f1'])} (AUC {fmt(m['roc_auc'])})" for label, m in block["per_label"].items())
    return f"{name}: {labels}; mean F1 {fmt(block['mean_f1'])}"


def score(run: Path) -> dict:
    model = open_model(model_of(run))
    val, test = load_table(run / "val.csv"), load_table(run / "test.csv")
    result = {}
    for tta in (False, True):
        tag = "tta" if tta else "plain"
        for part, table in (("val", val), ("test", test)):
            metrics = evaluate(model, table, run / "eval" / f"{part}-{tag}", tta=tta, progress=False)
            result[f"{part} {tag}"] = metrics
            print(f"  {line(f'{part} {tag}', metrics)}", flush=True)
        # thresholds of maximum F1 on the validation cells, applied to the test cells
        on_val, on_test = predict_table(model, val, tta=tta, progress=False), predict_table(model, test, tta=tta,
                                                                                         progress=False)
        tuned, review, _ = tune(on_val.labels, on_val.positives, on_val.probs, [0.5] * len(on_val.labels),
                                [0.5] * len(on_val.labels), "f1", None)
        block = summary(on_test.positives, on_test.probs, on_test.labels, tuned, review)
        result[f"test {tag} tuned"] = {"thresholds": tuned, **block}
        print(f"  {line(f'test {tag}, thresholds tuned on val {[round(t, 3) for t in tuned]}', block)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        print(run.name, flush=True)
        scores = score(run)
        (run / "scores.json").write_text(json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk in ("mean_f1", "per_label", "thresholds")}
             for k, v in scores.items()}, indent=1))


if __name__ == "__main__":
    main()
