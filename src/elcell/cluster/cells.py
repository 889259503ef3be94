"""`elcell predict --ray`: cell files decoded in Ray tasks, scored by actors,
handed back to elcell.infer.predict as the batches its local path makes, so the
output (CSV or Parquet, resume, the error column) is written by the same code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from elcell.cells.images import Decoding, hand_back_warnings
from elcell.cells.inputs import Unreadable, read_cell
from elcell.cluster.pipeline import ModelActor, Plan, echo_warnings, stream, warning_column
from elcell.infer.predict import Scorer
from elcell.infer.runtime import CellScores, Model, ScoredBatch, score_cells


def decode_cells(batch: dict[str, np.ndarray], decoding: Decoding) -> dict[str, np.ndarray]:
    """A task: the files of a batch as the model's input; a file that cannot be
    used gets a blank cell and its reason in `error` (empty when fine)."""
    hand_back_warnings()
    blank = np.zeros((decoding.size, decoding.size), dtype=np.uint8)
    cells = [read_cell(Path(path), decoding) for path in batch["path"]]
    return {"path": batch["path"],
            "image": np.stack([blank if isinstance(c, Unreadable) else c for c in cells]),
            "error": np.array([c.reason if isinstance(c, Unreadable) else "" for c in cells], dtype=object),
            "warning": warning_column(len(cells))}


class CellActor(ModelActor):
    """Scores the readable cells of a batch: probabilities, NaN rows for the rest.
    Decisions are made by the driver, with the thresholds it writes beside them."""

    def __init__(self, model_bytes: bytes, name: str, threads: int, tta: bool):
        super().__init__(model_bytes, name, threads)
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        scores = score_cells(self.model, batch["image"][ok], tta=self.tta)
        probs = np.full((len(ok), len(self.model.info.labels)), np.nan, dtype=np.float32)
        plain = probs.copy()
        probs[ok], plain[ok] = scores.probs, scores.plain
        return {"path": batch["path"], "error": batch["error"], "probs": probs, "plain": plain,
                "warning": batch["warning"]}


def _scored(batch: dict[str, np.ndarray], model: Model, thresholds: list[float],
            review: list[float]) -> ScoredBatch:
    errors = [str(e) or None for e in batch["error"]]
    ok = np.array([e is None for e in errors], dtype=bool)
    probs, plain = batch["probs"].astype(np.float32), batch["plain"].astype(np.float32)
    scores = CellScores(probs[ok], plain[ok], model.decide(probs[ok], thresholds, review))
    return ScoredBatch([Path(str(p)) for p in batch["path"]], probs, plain, errors, scores)


def ray_scorer(plan: Plan) -> Scorer:
    """A `predict` scorer that runs on the Ray cluster already connected to."""
    def scorer(model: Model, todo: list[Path], batch_size: int, tta: bool, thresholds: list[float],
               review: list[float]) -> Iterator[ScoredBatch]:
        items = [{"path": str(path)} for path in todo]
        for batch in stream(model, items, decode_cells, {"decoding": model.decoding}, CellActor, {"tta": tta},
                            batch_size, plan):
            echo_warnings(batch)
            yield _scored(batch, model, thresholds, review)
    return scorer
