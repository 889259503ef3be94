"""A model's judgement of labelled cells as `Scored` rows (elcell.judging.intervals):
probabilities, the decisions at the model's own thresholds, and the truth
(NaN where a label is unknown). Torch-free: ONNX Runtime through elcell.infer.runtime.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from elcell.cells.labels import LabelTable
from elcell.infer.evaluate import known_labels, predict_table
from elcell.infer.runtime import Model, decide, open_model
from elcell.judging.intervals import Scored


def score_table(model: Model, table: LabelTable, tta: bool = False, progress: bool = True) -> Scored:
    """`model` on every readable cell of `table` (unreadable ones are reported and left out)."""
    predictions = predict_table(model, table, tta=tta, progress=progress)
    columns = [model.info.labels.index(label) for label in predictions.labels]
    decisions = decide(predictions.probs, [model.info.thresholds[c] for c in columns],
                       [model.info.review_thresholds[c] for c in columns])
    truth = np.where(known_labels(predictions), predictions.positives, np.nan).astype(np.float64)
    return Scored([str(p) for p in predictions.paths], predictions.labels, truth,
                  predictions.probs.astype(np.float64), np.asarray(decisions))


def score_model(source: str, table: LabelTable, tta: bool = False, progress: bool = True) -> Scored:
    """A model file or run folder scored on labelled cells (its groups set aside)."""
    return score_table(open_model(source), replace(table, groups=None), tta=tta, progress=progress)
