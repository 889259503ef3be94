"""`elcell inspect --ray`: module photos read in Ray tasks, found, cut, scored and
graded by actors, handed back to elcell.pvmodules.inspect as its local path
yields them, so cells.csv, modules.csv, maps (or the Parquet file) and resume
are written by the same code.

Photos and results cross the object store pickled: photos differ in size and
depth, and a module's result is a small tree of arrays (with its grading rule,
a compiled expression: hence Ray's cloudpickle). Only what the writer
needs comes back: the cells cut from the photo are dropped, except the
flagged ones that their overlays are drawn on.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ray import cloudpickle

from elcell.cells.images import read_reduced
from elcell.cells.inputs import Unreadable, unreadable
from elcell.cluster.pipeline import ModelActor, Plan, echo_warnings, stream, warning_column
from elcell.errors import ImageError
from elcell.infer.runtime import Model
from elcell.pvmodules.inspect import Inspected, Inspector, Job, decode_size, inspect_photo
from elcell.pvmodules.judge import ModuleInspection

NO_CELL = np.zeros((0, 0), dtype=np.uint8)


def read_photos(batch: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """A task: each photo's pixels decoded no larger than `size` needs (as the
    local path's read_photo), with the factor back to the photo's own pixels;
    or why it cannot be read."""
    photos, scales, errors = [], [], []
    for path in batch["path"]:
        try:
            pixels, scale = read_reduced(Path(path), size, min_size=32)
            photos.append(pickle.dumps(pixels, protocol=5))
            scales.append(scale)
            errors.append("")
        except (ImageError, MemoryError) as err:
            photos.append(b"")
            scales.append(1.0)
            errors.append(unreadable(path, err).reason)
    return {"path": batch["path"], "name": batch["name"], "photo": np.array(photos, dtype=object),
            "scale": np.array(scales, dtype=np.float64), "error": np.array(errors, dtype=object)}


def _slim(found: ModuleInspection) -> ModuleInspection:
    keep = found.heatmaps.keys()
    found.cells = [[cell if (r, c) in keep else NO_CELL for c, cell in enumerate(row)]
                   for r, row in enumerate(found.cells)]
    return found


class ModuleActor(ModelActor):
    """Inspects one module after another with its own ONNX Runtime session."""

    def __init__(self, model_bytes: bytes, name: str, threads: int, job: Job):
        super().__init__(model_bytes, name, threads)
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results, errors = [], list(batch["error"])
        for i, (path, name, photo, scale) in enumerate(zip(batch["path"], batch["name"], batch["photo"],
                                                           batch["scale"], strict=True)):
            results.append(b"")
            if errors[i]:
                continue
            try:
                found = inspect_photo(self.model, pickle.loads(photo), str(name), self.job, float(scale))
                results[i] = cloudpickle.dumps(_slim(found), protocol=5)
            except (ImageError, MemoryError) as err:
                errors[i] = unreadable(path, err).reason
        return {"path": batch["path"], "name": batch["name"], "found": np.array(results, dtype=object),
                "error": np.array(errors, dtype=object), "warning": warning_column(len(results))}


def ray_inspector(plan: Plan) -> Inspector:
    """An `inspect` inspector that runs on the Ray cluster already connected to;
    one photo per batch (a photo is megabytes, and a module many cells)."""
    def inspector(model: Model, todo: list[tuple[Path, str]], job: Job) -> Iterator[Inspected]:
        items = [{"path": str(path), "name": name} for path, name in todo]
        for batch in stream(model, items, read_photos, {"size": decode_size(model, job.rows, job.cols)}, ModuleActor, {"job": job}, 1, plan):
            echo_warnings(batch)
            for path, name, found, error in zip(batch["path"], batch["name"], batch["found"], batch["error"],
                                                strict=True):
                yield (Path(str(path)), str(name),
                       Unreadable(str(path), str(error)) if error else pickle.loads(found))
    return inspector
