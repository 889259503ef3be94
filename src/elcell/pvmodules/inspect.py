"""`elcell inspect`: module photos in; per batch a folder with cells.csv,
modules.csv, a map per module, the flagged cells' overlays and report.html.
Torch-free.

Rows are written module by module (cells first, then the module's row, each
flushed and synced), so an interrupted run keeps every module it finished and
`--resume` continues it: a module whose cells were written but not its row is
done again. A photo that cannot be used gets a modules.csv row with the
reason, the others go on, and the command exits with status 1.
"""

from __future__ import annotations

import csv
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elcell.cells.images import read_reduced, to_uint8
from elcell.cells.inputs import (
    Unreadable,
    check_resumed_paths,
    collect_inputs,
    report_unreadable,
    unreadable,
)
from elcell.cells.labels import file_key
from elcell.errors import DataError, ImageError
from elcell.infer.explain import explain_cell
from elcell.infer.predict import CSV_SEPARATOR, RowWriter, model_column, thresholds_column
from elcell.infer.runtime import OK, Model, chosen_thresholds, open_model
from elcell.infer.tables import ParquetRows, is_parquet
from elcell.io import atomic_path, output_mode, unique_names
from elcell.options import MAP_DETAIL, MAP_VIEWS
from elcell.pvmodules.geometry import parse_grid
from elcell.pvmodules.grading import Rule, check_names, load_rules
from elcell.pvmodules.judge import ModuleInspection, inspect_module
from elcell.pvmodules.module_report import write_module_report
from elcell.pvmodules.modulemap import encode_png
from elcell.pvmodules.resumed import check_grid, check_maps, drop_pictures

OUTPUTS = ("cells.csv", "modules.csv", "maps", "flagged", "report.html")
CORNERS = ["x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3"]  # TL, TR, BR, BL in the photo's pixels
# A JPEG photo is decoded smaller (by 2, 4 or 8, in its DCT) while a cell, were the module
# as wide as the photo, keeps 1.5x the model's input: an 8000 px photo's 800 px cells are
# shrunk to the model's 129-300 px anyway, and decoding, finding and warping 4x fewer
# pixels saves seconds. Photos whose cells are near the model's size are read whole.
DECODE_CELLS = 1.5
OVERLAY_THREADS = 2  # flagged cells' overlays drawn at once (_save_pictures)


def cell_header(labels: Sequence[str]) -> list[str]:
    return (["module", "row", "col", *CORNERS, *(f"prob_{label}" for label in labels),
             *(f"decision_{label}" for label in labels), "dark_area", "error", "model", "thresholds"])


def module_header(labels: Sequence[str]) -> list[str]:
    return (["module", "path", "grid", *(f"defect_{label}" for label in labels),
             *(f"review_{label}" for label in labels), "defect_cells", "review_cells", "dark_area", "grade",
             "rule", "seconds", "error", "model"])


def as_gray(pixels: np.ndarray) -> np.ndarray:
    """A photo as geometry takes it: uint8 or uint16 (float images scaled to 16 bits)."""
    return np.round(pixels * 65535).astype(np.uint16) if pixels.dtype.kind == "f" else pixels


@dataclass
class Batch:
    """The output folder of one `elcell inspect` run."""

    out: Path
    model: Model
    labels: list[str]
    thresholds: list[float]
    review: list[float]
    done: dict[str, str] = field(default_factory=dict)  # resumed: module name -> its photo's path

    def cell_rows(self, name: str, found: ModuleInspection) -> list[list[str]]:
        rows, cols = found.decisions.shape[:2]
        tail = ["", model_column(self.model), thresholds_column(self.labels, self.thresholds, self.review)]
        return [[name, str(r + 1), str(c + 1), *(f"{v:.1f}" for v in found.corners[r, c].ravel()),
                 *(f"{p:.6f}" for p in found.probs[r, c]), *found.decisions[r, c], f"{found.dark_area[r, c]:.4f}",
                 *tail] for r in range(rows) for c in range(cols)]

    def module_row(self, name: str, path: Path, grid: str, found: ModuleInspection | None,
                   error: str = "") -> list[str]:
        n = len(self.labels)
        if found is None:
            return [name, str(path), grid, *[""] * (2 * n + 6), error.replace("\n", " "), model_column(self.model)]
        counts = found.counts
        return [name, str(path), grid, *(str(counts[f"defect_{label}"]) for label in self.labels),
                *(str(counts[f"review_{label}"]) for label in self.labels), str(counts["defect_cells"]),
                str(counts["review_cells"]), f"{counts['dark_area']:.4f}", found.grade, found.rule_text,
                f"{found.seconds:.3f}", "", model_column(self.model)]


def _prepare(out: Path, batch: Batch, grid: str, resume: bool, overwrite: bool, want_map: bool) -> None:
    """Refuse an earlier run's folder unless told; when resuming, check it was this
    model, grid, thresholds and map choice, and drop cell rows of modules not finished."""
    mode = output_mode(out, overwrite=overwrite, resume=resume)
    if mode == "overwrite":
        for name in OUTPUTS:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if mode != "resume" or not (out / "modules.csv").is_file():
        return
    modules = _read(out / "modules.csv", module_header(batch.labels), "modules.csv")
    ours = model_column(batch.model).rpartition("@")[2]
    for row in modules:
        if row["model"].rpartition("@")[2] != ours:
            raise DataError(f"--resume {out}: its modules were inspected by another model ({row['model']}, this "
                            f"is {model_column(batch.model)}); resume with that model, or write to a new --out")
    batch.done = {row["module"]: row["path"] for row in modules if not row["error"]}
    check_grid(out, [row["grid"] for row in modules if not row["error"]], grid)
    check_maps(out, batch.done, want_map)
    cells = _read(out / "cells.csv", cell_header(batch.labels), "cells.csv") if (out / "cells.csv").is_file() else []
    wanted = thresholds_column(batch.labels, batch.thresholds, batch.review)
    if any(row["thresholds"] != wanted for row in cells):
        raise DataError(f"--resume {out}: its cells were decided with other thresholds; resume with the same "
                        "--threshold/--review-threshold, or write to a new --out")
    _rewrite(out / "modules.csv", module_header(batch.labels), [r for r in modules if r["module"] in batch.done])
    _rewrite(out / "cells.csv", cell_header(batch.labels), [r for r in cells if r["module"] in batch.done])
    drop_pictures(out, batch.done)


def _read(path: Path, header: list[str], what: str) -> list[dict[str, str]]:
    """The complete rows of a CSV this command wrote (a half-written last line dropped)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()[: None if text.endswith("\n") else -1]
    rows = list(csv.reader(lines, delimiter=CSV_SEPARATOR))
    if not rows or rows[0] != header:
        raise DataError(f"--resume {path}: not the {what} of this model's `elcell inspect` (its columns differ); "
                        "write to a new --out")
    return [dict(zip(header, row, strict=True)) for row in rows[1:] if len(row) == len(header)]


def _rewrite(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=CSV_SEPARATOR, lineterminator="\n")
        writer.writerows([header, *([row[k] for k in header] for row in rows)])


def _save_pictures(out: Path, name: str, found: ModuleInspection, model: Model) -> None:
    """The module's map, and an overlay per flagged label of each flagged cell."""
    with atomic_path(out / "maps" / f"{name}.png") as tmp:
        tmp.write_bytes(encode_png(found.map))

    def overlays(place: tuple[int, int]) -> None:
        r, c = place
        which = [j for j, decision in enumerate(found.decisions[r, c]) if decision != OK]
        cell = to_uint8(found.cells[r][c], model.decoding.bit_depth, f"{name} cell {r + 1},{c + 1}")
        explain_cell(out / "flagged" / name, f"r{r + 1:02d}_c{c + 1:02d}", cell, found.heatmaps[place],
                     found.probs[r, c], found.labels, which, found.decisions[r, c], raw=False)

    # two threads: blending and PNG encoding let go of the GIL, and nothing else runs meanwhile
    with ThreadPoolExecutor(OVERLAY_THREADS) as pool:
        list(pool.map(overlays, found.heatmaps))


def decode_size(model: Model, rows: int, cols: int) -> tuple[int, int]:
    """The least (width, height) a module photo is decoded at (DECODE_CELLS)."""
    size = DECODE_CELLS * model.decoding.size
    return int(np.ceil(size * cols)), int(np.ceil(size * rows))


# A module judged, or why its photo could not be: what an inspector yields per photo
Inspected = tuple[Path, str, "ModuleInspection | Unreadable"]
# Inspects the (photo, module name) pairs it is given: `local_inspector` on this
# machine, or elcell.cluster on Ray (the command line passes it in)
Inspector = Callable[[Model, list[tuple[Path, str]], "Job"], Iterable[Inspected]]


@dataclass
class Job:
    """What every module of a run is inspected with."""

    rows: int
    cols: int
    rules: list[Rule]
    want_map: bool
    thresholds: list[float]
    review: list[float]
    map_views: int | None = MAP_VIEWS  # views the flagged cells' heatmaps average (None: the model's)
    map_detail: str = MAP_DETAIL  # their maps coarse (from the scoring pass) or fine (a backward pass)


def read_photo(path: Path, model: Model, job: Job) -> tuple[np.ndarray, float]:
    """A module photo's pixels, decoded no larger than its cells need (a JPEG in
    its DCT: decode_size), and the factor from them back to the photo's pixels."""
    return read_reduced(path, decode_size(model, job.rows, job.cols), min_size=32)


def inspect_photo(model: Model, image: np.ndarray, name: str, job: Job, scale: float = 1.0) -> ModuleInspection:
    """One photo's pixels (as read_photo gives them) inspected as the job says;
    corners given in the photo's own pixels."""
    found = inspect_module(model, as_gray(image), job.rows, job.cols, job.rules, name, want_map=job.want_map,
                           thresholds=job.thresholds, review_thresholds=job.review, map_views=job.map_views,
                           map_detail=job.map_detail)
    return in_photo_pixels(found, scale)


def in_photo_pixels(found: ModuleInspection, scale: float) -> ModuleInspection:
    """Corners found on a photo decoded `scale` times smaller, in the photo's own
    pixels (pixel centres at +0.5), as cells.csv and the service report them."""
    found.corners = (found.corners + 0.5) * scale - 0.5
    return found


def local_inspector(model: Model, todo: list[tuple[Path, str]], job: Job) -> Iterator[Inspected]:
    """Module after module in this process."""
    for path, name in todo:
        try:
            pixels, scale = read_photo(path, model, job)
            yield path, name, inspect_photo(model, pixels, name, job, scale)
        except (ImageError, MemoryError) as err:
            yield path, name, unreadable(path, err)


class FolderOut:
    """cells.csv and modules.csv, module by module, with the maps and overlays."""

    def __init__(self, batch: Batch, grid: str, resume: bool, overwrite: bool, want_map: bool):
        self.batch, self.grid, self.want_map, out = batch, grid, want_map, batch.out
        _prepare(out, batch, grid, resume, overwrite, want_map)
        out.mkdir(parents=True, exist_ok=True)
        self.cells = RowWriter(out / "cells.csv", cell_header(batch.labels), not (out / "cells.csv").is_file())
        self.modules = RowWriter(out / "modules.csv", module_header(batch.labels),
                                 not (out / "modules.csv").is_file())

    def add(self, path: Path, name: str, found: ModuleInspection) -> None:
        if self.want_map:
            _save_pictures(self.batch.out, name, found, self.batch.model)
        self.cells.write(self.batch.cell_rows(name, found))
        self.modules.write([self.batch.module_row(name, path, self.grid, found)])

    def fail(self, path: Path, name: str, reason: str) -> None:
        self.modules.write([self.batch.module_row(name, path, self.grid, None, reason)])

    def close(self) -> None:
        self.cells.close()
        self.modules.close()


def parquet_header(labels: Sequence[str]) -> list[str]:
    """One row per cell, with its module's photo, grid, grade and rule."""
    return ["module", "path", "grid", "grade", "rule", *cell_header(labels)[1:]]


class ParquetOut:
    """`--out FILE.parquet`: one row per cell, each with its module's grade; a photo
    that could not be used gets one row with the reason in `error`."""

    def __init__(self, batch: Batch, grid: str, resume: bool, overwrite: bool):
        self.batch, self.grid = batch, grid
        self.sink = ParquetRows(batch.out, parquet_header(batch.labels), key="module")
        if self.sink.exists():
            target = batch.out if batch.out.is_file() else self.sink.parts
            if output_mode(target, overwrite=overwrite, resume=resume) == "resume":
                self._check(self.sink.previous(["module", "path", "grid", "model", "thresholds"]).to_pydict())
            else:
                self.sink.clear()
        batch.out.parent.mkdir(parents=True, exist_ok=True)

    def _check(self, previous: dict[str, list]) -> None:
        batch = self.batch
        ours, wanted = model_column(batch.model), thresholds_column(batch.labels, batch.thresholds, batch.review)
        if any(m.rpartition("@")[2] != ours.rpartition("@")[2] for m in previous["model"]):
            raise DataError(f"--resume {batch.out}: its modules were inspected by another model (this is {ours}); "
                            "resume with that model, or write to a new --out")
        if any(t != wanted for t in previous["thresholds"]):
            raise DataError(f"--resume {batch.out}: its cells were decided with other thresholds; resume with the "
                            "same --threshold/--review-threshold, or write to a new --out")
        check_grid(batch.out, previous["grid"], self.grid)
        batch.done = dict(zip(previous["module"], previous["path"], strict=True))

    def add(self, path: Path, name: str, found: ModuleInspection) -> None:
        head = [name, str(path), self.grid, found.grade, found.rule_text]
        self.sink.write([head + row[1:] for row in self.batch.cell_rows(name, found)])

    def fail(self, path: Path, name: str, reason: str) -> None:
        header = parquet_header(self.batch.labels)
        row = [name, str(path), self.grid] + [""] * (len(header) - 6)
        self.sink.write([row + [reason.replace("\n", " "), model_column(self.batch.model),
                               thresholds_column(self.batch.labels, self.batch.thresholds, self.batch.review)]])

    def close(self) -> None:
        self.sink.close()


def inspect_paths(model: Model, paths: list[Path], grid: str, out: Path, rules: list[Rule], *,
                  want_map: bool = True, resume: bool = False, overwrite: bool = False,
                  thresholds: list[float] | None = None, review: list[float] | None = None,
                  inspector: Inspector | None = None, map_views: int | None = MAP_VIEWS,
                  map_detail: str = MAP_DETAIL) -> list[Unreadable]:
    """Inspect every module photo into the folder `out`, or the Parquet file `out`
    (no maps); returns the photos that failed."""
    rows, cols = parse_grid(grid)
    info = model.info
    batch = Batch(out, model, info.labels, thresholds or info.thresholds, review or info.review_thresholds)
    parquet = is_parquet(out)
    writer = ParquetOut(batch, grid, resume, overwrite) if parquet else \
        FolderOut(batch, grid, resume, overwrite, want_map)
    job = Job(rows, cols, rules, want_map and not parquet, batch.thresholds, batch.review, map_views, map_detail)
    todo, failed = _not_done(paths, batch)
    try:
        for path, name, found in (inspector or local_inspector)(model, todo, job):
            if isinstance(found, Unreadable):
                failed.append(found)
                report_unreadable(found, "skipped")
                writer.fail(path, name, found.reason)
                continue
            writer.add(path, name, found)
            graded = f"grade {found.grade} ({found.rule_text})" if found.grade else \
                "warning: no rule matched, no grade (end the rules with one whose when is \"true\")"
            print(f"elcell: {name}: {graded}, {found.seconds:.2f} s", file=sys.stderr)
    finally:
        writer.close()
    return failed


def _not_done(paths: list[Path], batch: Batch) -> tuple[list[tuple[Path, str]], list[Unreadable]]:
    """The photos (with their module names) a resumed folder does not hold yet,
    and those whose name it holds from another photo (a camera's counter
    restarted): reported and skipped, as their rows would mix with the other's."""
    check_resumed_paths(batch.done.values(), batch.out)
    todo, clashes = [], []
    for path, name in zip(paths, unique_names(paths), strict=True):
        earlier = batch.done.get(name)
        if earlier is None:
            todo.append((path, name))
        elif file_key(earlier) != file_key(path):
            clashes.append(Unreadable(str(path), f"{batch.out} already holds a module named {name!r}, from "
                                                 f"{earlier}: inspect this photo into another --out, or rename it"))
            report_unreadable(clashes[-1], "skipped")
    return todo, clashes


def main(args, inspector: Inspector | None = None) -> int:
    """`elcell inspect` (options: elcell.cli); `inspector`: see `inspect_paths`."""
    model = open_model(args.model, threads=args.threads)
    info = model.info
    thresholds, review = chosen_thresholds(info, args.threshold, args.review_threshold)
    rules = load_rules(args.rules)
    parse_grid(args.grid)
    paths = collect_inputs(args.inputs, outputs=[args.out])
    missing = check_names(rules, info.labels, typos=bool(args.rules))
    if missing and args.rules:
        print(f"elcell: note: the rules name {', '.join(missing)}, which this model does not give: counted as 0",
              file=sys.stderr)
    print(f"elcell: {model.path.name} on {model.provider}; {len(paths)} module images, grid {args.grid}",
          file=sys.stderr)
    out = Path(args.out)
    failed = inspect_paths(model, paths, args.grid, out, rules, want_map=args.map, resume=args.resume,
                           overwrite=args.overwrite, thresholds=thresholds, review=review, inspector=inspector,
                           map_views=args.map_views, map_detail=args.map_detail)
    if is_parquet(out):
        print(f"elcell: wrote {out} (one row per cell, with its module's grade)", file=sys.stderr)
    else:
        if args.report:
            write_module_report(out, _read(out / "modules.csv", module_header(info.labels), "modules.csv"),
                                info.labels, model)
        written = [str(out / "cells.csv"), str(out / "modules.csv")]
        written += ["maps/"] if any((out / "maps").glob("*")) else []  # --map, and a module to draw
        written += [str(out / "report.html")] if args.report else []
        print(f"elcell: wrote {', '.join(written[:-1])} and {written[-1]}", file=sys.stderr)
    if failed:
        where = f"{out}'s error column" if is_parquet(out) else "modules.csv"
        print(f"elcell: {len(failed)} of {len(paths)} module images could not be inspected (listed above and "
              f"in {where})", file=sys.stderr)
        return 1
    return 0
