"""`elcell explain`: where the model looked, per image and label: an overlay PNG,
the raw heatmap (.npy) and a JSON record with probabilities, decisions and a
box around the hot region. Torch-free.

`explain_cell` is the unit that `elcell explain` and `elcell predict
--heatmaps` share.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elcell.cells.images import read_gray, to_cell
from elcell.cells.inputs import Unreadable, collect_inputs, report_unreadable, unreadable
from elcell.errors import DataError
from elcell.infer.heatmaps import BOX_THRESHOLD, heatmap_box, heatmap_note, overlay_png
from elcell.infer.runtime import Model, open_model, score_cells
from elcell.io import (
    atomic_path,
    atomic_write_json,
    check_out_folder,
    counted,
    safe_name,
    unique_names,
)


def explain_cell(out_dir: str | Path, name: str, cell: np.ndarray, heatmaps: np.ndarray,
                 probs: np.ndarray, labels: Sequence[str], which: Iterable[int] | None = None,
                 decisions: Sequence[str] | None = None, raw: bool = True,
                 threshold: float = BOX_THRESHOLD) -> dict:
    """Write `{name}_{label}.png` overlays (and `{name}_{label}.npy` raw heatmaps
    when `raw`) for one cell and return a JSON-ready record of them.

    cell: uint8 [H, W] at its own resolution (boxes are in its pixels);
    heatmaps: [N, h, w] and probs: [N] from the model, for all its `labels`;
    `which`: label indices to explain (default all); decisions: the cell's
    `defect`/`review`/`ok` per label, if known.
    """
    out_dir = Path(out_dir)
    record: dict[str, Any] = {}
    for index in range(len(labels)) if which is None else which:
        label = labels[index]
        stem = f"{name}_{safe_name(label)}"
        entry: dict[str, Any] = {"probability": round(float(probs[index]), 6)}
        if decisions is not None:
            entry["decision"] = str(decisions[index])
        entry["box"] = heatmap_box(heatmaps[index], cell.shape, threshold)
        decision = "" if decisions is None else str(decisions[index])
        with atomic_path(out_dir / f"{stem}.png") as tmp:
            tmp.write_bytes(overlay_png(cell, heatmaps[index], probs[index], label, decision, entry["box"]))
        entry["overlay"] = f"{stem}.png"
        if raw:
            with atomic_path(out_dir / f"{stem}.npy") as tmp, open(tmp, "wb") as handle:
                np.save(handle, np.asarray(heatmaps[index], dtype=np.float32))
            entry["heatmap"] = f"{stem}.npy"
        record[label] = entry
    return record


@dataclass
class ExplainResult:
    """What `write_explanations` did: one record per explained image, and the
    images it skipped."""

    records: list[dict] = field(default_factory=list)
    skipped: list[Unreadable] = field(default_factory=list)


def label_indices(model_labels: Sequence[str], wanted: Sequence[str] | None) -> list[int]:
    """Indices of the `wanted` labels in the model; DataError naming the model's
    labels for one it does not have."""
    if not wanted:
        return list(range(len(model_labels)))
    unknown = [w for w in wanted if w not in model_labels]
    if unknown:
        raise DataError(f"--label {unknown[0]}: the model's labels are {', '.join(model_labels)}")
    return [model_labels.index(w) for w in dict.fromkeys(wanted)]


def _read_both(path: Path, model: Model) -> tuple[np.ndarray, np.ndarray] | Unreadable:
    """The cell as the model sees it, and at its own resolution (for the overlay)."""
    try:
        original = read_gray(path, model.decoding.bit_depth)
        return to_cell(original, model.decoding), original
    except Exception as err:  # ImageError, and whatever else a broken file provokes
        return unreadable(path, err)


def write_explanations(model: Model, paths: Sequence[str | Path], out_dir: str | Path,
                       labels: Sequence[str] | None = None, batch_size: int = 16,
                       threshold: float = BOX_THRESHOLD,
                       on_skip: Callable[[Unreadable], None] | None = None) -> ExplainResult:
    """`elcell explain`: for every image and label an overlay PNG and the raw
    heatmap (.npy), and per image `{name}.json` with probabilities, decisions
    and boxes (in the original image's pixels). Unreadable images are skipped,
    reported through `on_skip` and listed in the result."""
    out_dir = check_out_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    which = label_indices(model.info.labels, labels)
    names = unique_names(paths)
    result = ExplainResult()
    for start in range(0, len(paths), batch_size):
        kept = []
        for i in range(start, min(start + batch_size, len(paths))):
            read = _read_both(Path(paths[i]), model)
            if isinstance(read, Unreadable):
                result.skipped.append(read)
                if on_skip:
                    on_skip(read)
            else:
                kept.append((i, *read))
        if kept:
            scores = score_cells(model, np.stack([cell for _, cell, _ in kept]), heatmaps=True)
            for k, (i, _, original) in enumerate(kept):
                result.records.append(_explain_one(model, paths[i], names[i], out_dir, original, scores,
                                                   k, which, threshold))
    return result


def _explain_one(model: Model, path: str | Path, name: str, out_dir: Path, original: np.ndarray,
                 scores, k: int, which: list[int], threshold: float) -> dict:
    heat = scores.heatmaps[k]
    explained = explain_cell(out_dir, name, original, heat, scores.probs[k], model.info.labels, which,
                             scores.decisions[k], raw=True, threshold=threshold)
    record = {
        "image": str(path),
        "image_size": {"height": original.shape[0], "width": original.shape[1]},
        "model": str(model.path),
        "box_threshold": threshold,
        "heatmap_shape": list(heat.shape[1:]),
        "heatmap_note": heatmap_note(model.info.extra.get("heatmap")),
        "labels": explained,
    }
    atomic_write_json(out_dir / f"{name}.json", record)
    return record


def main(args) -> int:
    """`elcell explain` (options: elcell.cli)."""
    model = open_model(args.model, threads=args.threads)
    labels = [model.info.labels[i] for i in label_indices(model.info.labels, args.label)]
    paths = collect_inputs(args.inputs, outputs=[args.out])
    print(f"elcell: {model.path.name} on {model.provider}; {counted(len(paths), 'image')}; labels {labels}",
          file=sys.stderr)
    result = write_explanations(model, paths, args.out, labels, batch_size=args.batch_size,
                                threshold=args.box_threshold,
                                on_skip=lambda item: report_unreadable(item, "skipped"))
    print(f"elcell: explained {counted(len(result.records), 'image')} x {counted(len(labels), 'label')} in {args.out}",
          file=sys.stderr)
    if result.skipped:
        print(f"elcell: {len(result.skipped)} of {len(paths)} images could not be read (listed above)",
              file=sys.stderr)
        return 1
    return 0
