"""ONNX Runtime inference on elcell models. Never imports torch.

The core every torch-free command shares: open a model with its metadata,
run uint8 cells through it, and turn probabilities into decisions. On top of
it, `predict` streams any number of images through a model into a CSV that
survives a crash: rows are appended and fsync'ed batch by batch, and
`resume=True` continues where the file ends.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from elcell.errors import DataError
from elcell.images import IMAGE_SUFFIXES, find_images, load_cell
from elcell.io import atomic_path
from elcell.labels import file_key, guess_separator
from elcell.modelinfo import INPUT_NAME, ModelInfo, read_info

DEFECT, REVIEW, OK = "defect", "review", "ok"
CSV_SEPARATOR = ";"  # as the seed's labels CSV and split.csv


@dataclass
class Model:
    """An open ONNX Runtime session with the model's metadata."""

    session: ort.InferenceSession
    info: ModelInfo
    path: Path

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, images: np.ndarray, heatmaps: bool = False):
        """Probabilities [B, N] for uint8 cells [B, H, W] (H = W = info.image_size);
        with heatmaps=True also the Grad-CAM maps [B, N, h, w]."""
        batch = np.ascontiguousarray(images, dtype=np.uint8)[:, None]
        outputs = ["probs", "heatmap"] if heatmaps else ["probs"]
        result = self.session.run(outputs, {INPUT_NAME: batch})
        return (result[0], result[1]) if heatmaps else result[0]

    def run_views(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of the other views of the cells that training showed the
        model, [V, B, N]: flipped left-right, up-down and both; with a model trained
        with 90-degree rotations also the four transposed views (all eight
        symmetries of a square). With the plain run they make the TTA mean."""
        views = [images[:, :, ::-1], images[:, ::-1, :], images[:, ::-1, ::-1]]
        if self.info.extra.get("rotate90"):
            turned = images.transpose(0, 2, 1)
            views += [turned, turned[:, :, ::-1], turned[:, ::-1, :], turned[:, ::-1, ::-1]]
        return np.stack([self.run(view) for view in views])


def open_model(path: str | Path, providers: list[str] | None = None, threads: int = 0,
               spin: bool = True) -> Model:
    """Open an elcell ONNX file; the fastest available provider (CUDA, then CPU) by default.

    spin=False stops idle worker threads from spin-waiting: slightly slower on a
    machine of one's own, much faster when other processes share the cores."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    try:
        info = read_info(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # onnx raises protobuf DecodeError and others for a bad file
        hint = f"; export it first: elcell export {path}" if path.suffix == ".ckpt" else ""
        raise DataError(f"{path}: not an ONNX model ({type(err).__name__}){hint}") from None
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    return Model(session=session, info=info, path=path)


def decide(probs: np.ndarray, info: ModelInfo, thresholds: list[float] | None = None,
           review_thresholds: list[float] | None = None) -> np.ndarray:
    """`defect` / `review` / `ok` per cell and label, from the model's thresholds
    (or the ones given). [B, N] array of strings."""
    high = np.asarray(thresholds if thresholds is not None else info.thresholds, dtype=np.float64)
    low = np.asarray(review_thresholds if review_thresholds is not None else info.review_thresholds,
                     dtype=np.float64)
    low = np.minimum(low, high)
    return np.where(probs >= high, DEFECT, np.where(probs >= low, REVIEW, OK))


def parse_thresholds(values: list[str] | None, labels: list[str], current: list[float],
                     option: str = "--threshold") -> list[float]:
    """Thresholds from `0.3` (every label) and/or `crack=0.3` (one label); labels not
    named keep `current`."""
    result = list(current)
    for value in values or []:
        name, sep, number = value.rpartition("=")
        try:
            threshold = float(number)
        except ValueError:
            threshold = float("nan")
        if not 0 <= threshold <= 1:
            raise DataError(f"{option} {value}: need a probability in [0, 1], as 0.3 or LABEL=0.3")
        if not sep:
            result = [threshold] * len(labels)
        elif name in labels:
            result[labels.index(name)] = threshold
        else:
            raise DataError(f"{option} {value}: the model has no label {name!r}; its labels are {labels}")
    return result


# --------------------------------------------------------------------------- inputs
def paths_from_csv(csv_path: Path) -> list[Path]:
    """Image paths from the first column of a CSV (labels or predictions): relative
    to the CSV's folder unless absolute. The first line is a header unless its
    first field names an image file."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{csv_path}: cannot read ({err})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{csv_path}: the CSV is empty")
    sep = guess_separator(lines[0]) or ";"  # one column: any separator reads it whole
    rows = list(csv.reader(lines, delimiter=sep))
    if Path(rows[0][0].strip()).suffix.lower() not in IMAGE_SUFFIXES:
        rows = rows[1:]
    base = csv_path.resolve().parent
    paths = []
    for row in rows:
        if row and row[0].strip():
            path = Path(row[0].strip())
            paths.append(path if path.is_absolute() else base / path)
    if not paths:
        raise DataError(f"{csv_path}: no image paths in the first column")
    return paths


def _expand_patterns(inputs: Iterable[str | Path]) -> Iterator[str | Path]:
    for item in inputs:
        if Path(item).exists() or not glob.has_magic(str(item)):
            yield item
        else:  # a pattern that matches nothing is named as it is
            yield from sorted(glob.glob(str(item), recursive=True)) or [item]


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files, folders (searched recursively) and CSVs (first column) -> image
    paths, in order, each once. A named input that does not exist is an error; an
    image listed in a CSV that does not exist is reported per image later. A
    pattern such as cells/*.png is expanded here where no shell did (Windows)."""
    found: list[Path] = []
    for item in map(Path, _expand_patterns(inputs)):
        if item.is_dir():
            images = find_images([item])
            if not images:
                raise DataError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.extend(images)
        elif item.suffix.lower() == ".csv" and item.is_file():
            found.extend(paths_from_csv(item))
        elif item.exists():
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    # each file once, however it was named (a CSV's paths are absolute, a folder's as given)
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(file_key(path), path)
    return list(unique.values())


# --------------------------------------------------------------------------- decoding
def _read(path: Path, size: int, shrink: str, bit_depth: int) -> tuple[np.ndarray | None, str | None]:
    """One cell, or the reason it cannot be used. Never raises: a batch job must
    outlive any one file."""
    try:
        return load_cell(path, size, shrink, bit_depth), None
    except Exception as err:  # ImageError, and whatever else a broken file provokes
        message = str(err) if str(err) else type(err).__name__
        return None, message.removeprefix(f"{path}: ")


@dataclass
class Batch:
    """Decoded cells of one batch of paths; `images` holds the readable ones, in order."""

    paths: list[Path]
    images: np.ndarray  # uint8 [k, H, W], k = number of None entries in errors
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def decode_batches(paths: Iterable[Path], size: int, batch_size: int = 16,
                   workers: int = 2, shrink: str = "bilinear", bit_depth: int = 16) -> Iterator[Batch]:
    """Decode images (`load_cell`) in `workers` threads, `batch_size` at a time, in order.

    At most workers + 2 batches are decoded ahead of the consumer, so memory
    stays flat however many paths there are. Threads, not processes: Pillow
    releases the GIL while decoding and resizing, ONNX Runtime while running,
    so decoding the next batches overlaps inference, and no arrays are pickled.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: need at least 1")
    blank = np.zeros((0, size, size), dtype=np.uint8)

    def collect(chunk: list[Path], results: list) -> Batch:
        images = [image for image, _ in results if image is not None]
        return Batch(chunk, np.stack(images) if images else blank, [error for _, error in results])

    chunks = _chunks(paths, batch_size)
    if workers <= 0:
        for chunk in chunks:
            yield collect(chunk, [_read(p, size, shrink, bit_depth) for p in chunk])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="elcell-decode") as pool:
        pending: deque = deque()
        ahead = workers + 2
        for chunk in chunks:
            pending.append((chunk, [pool.submit(_read, p, size, shrink, bit_depth) for p in chunk]))
            if len(pending) >= ahead:
                done, futures = pending.popleft()
                yield collect(done, [f.result() for f in futures])
        while pending:
            done, futures = pending.popleft()
            yield collect(done, [f.result() for f in futures])


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Scored:
    """One batch scored: probabilities per path (NaN rows where the image failed).

    With heatmaps: `cells` and `heatmaps` hold the readable cells only, in
    order (row k belongs to the k-th path whose error is None)."""

    paths: list[Path]
    probs: np.ndarray  # float32 [B, N], the TTA mean when tta
    plain: np.ndarray  # float32 [B, N] without TTA (same as probs when not tta)
    errors: list[str | None]
    cells: np.ndarray | None = None  # uint8 [k, H, W]
    heatmaps: np.ndarray | None = None  # float32 [k, N, h, w], of the unflipped cells


def score(model: Model, paths: Iterable[Path], batch_size: int = 16, workers: int = 2,
          tta: bool = False, heatmaps: bool = False) -> Iterator[Scored]:
    """Stream paths through the model batch by batch; failed images get NaN rows.

    Heatmaps come from the same ONNX Runtime call as the probabilities."""
    info = model.info
    n = len(info.labels)
    for batch in decode_batches(paths, info.image_size, batch_size, workers, info.shrink, info.bit_depth):
        probs = np.full((len(batch.paths), n), np.nan, dtype=np.float32)
        plain = probs.copy()
        maps = None
        if len(batch.images):
            if heatmaps:
                first, maps = model.run(batch.images, heatmaps=True)
            else:
                first = model.run(batch.images)
            plain[batch.ok] = first
            probs[batch.ok] = np.concatenate([first[None], model.run_views(batch.images)]).mean(0) if tta else first
        yield Scored(batch.paths, probs, plain, batch.errors,
                     batch.images if heatmaps else None, maps)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------- predict
def csv_header(labels: list[str], tta: bool = False) -> list[str]:
    header = ["path", *(f"prob_{label}" for label in labels)]
    if tta:
        header += [f"prob_{label}_no_tta" for label in labels]
    return header + [f"decision_{label}" for label in labels] + ["error"]


@dataclass
class PredictResult:
    """What a predict run did; `failed` lists (path, reason) of this run's bad images."""

    total: int = 0
    skipped: int = 0  # already in the output CSV (resume)
    predicted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    defect: dict[str, int] = field(default_factory=dict)
    review: dict[str, int] = field(default_factory=dict)
    cells_in_review: int = 0
    seconds: float = 0.0
    dropped_partial_line: bool = False
    overlays: int = 0  # heatmap overlays written (--heatmaps)


class _RowWriter:
    """Appends CSV rows batch by batch; each batch is flushed and fsync'ed, so a
    crash loses at most the batch being written (and resume drops its half line)."""

    def __init__(self, out: Path | None, header: list[str], fresh: bool):
        self.handle = sys.stdout if out is None else open(out, "w" if fresh else "a", newline="",
                                                            encoding="utf-8")
        self.fsync = out is not None and out.is_file()  # not /dev/null or a pipe: they cannot sync
        if fresh:
            self.write([header])

    def write(self, rows: list[list[str]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=CSV_SEPARATOR, lineterminator="\n").writerows(rows)
        self.handle.write(buffer.getvalue())
        self.handle.flush()
        if self.fsync:
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not sys.stdout:
            self.handle.close()


def read_previous(out: Path, header: list[str]) -> tuple[list[list[str]], list[str] | None, bool]:
    """Rows already predicted in `out` (resume), and the file's lines repaired.

    A crash can leave a partially written last line: it is cut off. Rows whose
    image failed are left out too, so those images are tried again. Returns the
    finished rows, the lines to keep (None: keep the file as it is) and whether
    a partial line was dropped.
    """
    data = out.read_bytes()
    dropped = bool(data) and not data.endswith(b"\n")
    if dropped:
        data = data[: data.rfind(b"\n") + 1]
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"--resume {out}: not a predictions CSV (not UTF-8 text)") from None
    rows = [next(csv.reader([line], delimiter=CSV_SEPARATOR)) for line in lines]
    if rows and rows[0] != header:
        raise DataError(
            f"--resume {out}: its columns {rows[0]} differ from this run's {header} "
            "(another model, or --tta changed); write to a new --out"
        )
    finished: list[list[str]] = []
    keep = lines[:1]
    retry = 0
    probability_columns = [i for i, name in enumerate(header) if name.startswith("prob_")]
    for line_no, (line, row) in enumerate(zip(lines[1:], rows[1:], strict=True), start=2):
        if len(row) != len(header):
            raise DataError(f"--resume {out} line {line_no}: {len(row)} fields, expected {len(header)}; "
                            "the file was edited or is not from elcell predict")
        if row[-1]:
            retry += 1
            continue
        try:
            [float(row[i]) for i in probability_columns]
        except ValueError:
            raise DataError(f"--resume {out} line {line_no}: a probability is not a number; the file was "
                            "edited or is not from elcell predict") from None
        finished.append(row)
        keep.append(line)
    return finished, keep if dropped or retry else None, dropped


def check_same_model(model: Model, rows: list[list[str]], out: Path, tta: bool,
                     thresholds: list[float] | None, review_thresholds: list[float] | None,
                     sample: int = 4) -> None:
    """Refuse to append to rows that another model or other thresholds wrote:
    one CSV must hold one model's decisions. The decisions are recomputed from
    the written probabilities, and a few of the cells scored again."""
    n = len(model.info.labels)
    probs = np.array([[float(v) for v in row[1 : 1 + n]] for row in rows], dtype=np.float64).reshape(-1, n)
    written = np.array([row[-1 - n : -1] for row in rows], dtype=str).reshape(-1, n)
    # a probability printed with 6 decimals may have rounded across a threshold
    below, above = (decide(probs + shift, model.info, thresholds, review_thresholds) for shift in (-1e-6, 1e-6))
    changed = np.argwhere((written != below) & (written != above))
    if len(changed):
        i, j = changed[0]
        raise DataError(f"--resume {out}: its decisions were made with other thresholds ({rows[i][0]}: "
                        f"{model.info.labels[j]} {written[i, j]} at {probs[i, j]:.6f}, {below[i, j]} now): "
                        "resume with the same model and --threshold/--review-threshold, or write to a new --out")
    picks = np.unique(np.linspace(0, len(rows) - 1, min(sample, len(rows))).round().astype(int))
    again = next(score(model, [Path(rows[i][0]) for i in picks], batch_size=len(picks), workers=0, tta=tta),
                 None)
    if again is None:
        return
    # the same model gives the same probabilities up to float noise (another
    # batch size, or a GPU's TF32), another model far more than 1e-2
    differs = np.abs(again.probs - probs[picks]).max(axis=1) > 1e-2  # NaN (unreadable now): no verdict
    if differs.any():
        k = int(np.argmax(differs))
        raise DataError(f"--resume {out}: its rows were written by another model ({rows[picks[k]][0]}: "
                        f"{' '.join(rows[picks[k]][1 : 1 + n])} there, "
                        f"{' '.join(f'{p:.6f}' for p in again.probs[k])} now); resume with that model, or "
                        "write to a new --out")


def _write_overlays(folder: str | Path, scored: Scored, decisions: np.ndarray, ok: np.ndarray,
                    names: dict[Path, str], labels: list[str]) -> int:
    """Overlays for the labels each readable cell is not `ok` for; returns how many."""
    from elcell.explain import explain_cell

    written = 0
    for k, i in enumerate(np.flatnonzero(ok)):
        flagged = [j for j, decision in enumerate(decisions[i]) if decision != OK]
        if flagged:
            explain_cell(folder, names[scored.paths[i]], scored.cells[k], scored.heatmaps[k],
                         scored.probs[i], labels, which=flagged, decisions=decisions[i], raw=False)
            written += len(flagged)
    return written


def predict(model: Model, paths: list[Path], out: str | Path | None = None, *,
            batch_size: int = 16, workers: int | None = None, tta: bool = False,
            thresholds: list[float] | None = None, review_thresholds: list[float] | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = True,
            heatmaps_dir: str | Path | None = None) -> PredictResult:
    """Predict every image in `paths` into a CSV (stdout when `out` is None).

    With heatmaps_dir, cells judged `defect` or `review` for a label get an
    overlay of that label's heatmap there (`<name>_<label>.png`).

    Columns: path, prob_<label> (the TTA mean with tta, plus prob_<label>_no_tta),
    decision_<label> (defect / review / ok), error. Bad images get an empty
    probability, no decision and the reason in `error`; they are also printed
    on stderr, and the run goes on.
    """
    from tqdm import tqdm

    info = model.info
    header = csv_header(info.labels, tta)
    out = Path(out) if out is not None and str(out) != "-" else None
    if batch_size < 1:  # before the output file is made
        raise DataError(f"--batch-size {batch_size}: need at least 1")
    if out is not None and out.is_dir():
        raise DataError(f"--out {out} is a folder: give the CSV file to write, e.g. {out / 'predictions.csv'}")
    result = PredictResult(total=len(paths))
    done: set[str] = set()
    fresh = True
    if out is not None and out.exists() and out.stat().st_size > 0:
        if resume:
            previous, repaired, result.dropped_partial_line = read_previous(out, header)
            if previous:
                check_same_model(model, previous, out, tta, thresholds, review_thresholds)
            if repaired is not None:
                with atomic_path(out) as tmp:
                    tmp.write_text("".join(line + "\n" for line in repaired), encoding="utf-8")
            done = {row[0] for row in previous}
            fresh = out.stat().st_size == 0
        elif not overwrite:
            raise DataError(f"{out} exists: pass --resume to continue it, or --overwrite to replace it")
    elif resume and out is None:
        raise DataError("--resume needs --out FILE (the CSV to continue)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if str(p) not in done]
    result.skipped = len(paths) - len(todo)
    for counts in (result.defect, result.review):
        counts.update(dict.fromkeys(info.labels, 0))

    names = {}
    if heatmaps_dir is not None:
        from elcell.explain import unique_names

        names = dict(zip(todo, unique_names(todo)))  # once over all paths: no clashes
    writer = _RowWriter(out, header, fresh)
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="cell", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        workers = workers if workers is not None else default_workers()
        for scored in score(model, todo, batch_size, workers, tta, heatmaps=heatmaps_dir is not None):
            ok = np.array([e is None for e in scored.errors])
            decisions = decide(scored.probs, info, thresholds, review_thresholds)
            if heatmaps_dir is not None:
                result.overlays += _write_overlays(heatmaps_dir, scored, decisions, ok, names, info.labels)
            rows = []
            for i, path in enumerate(scored.paths):
                error = scored.errors[i]
                if error is not None:
                    result.failed.append((str(path), error))
                    bar.write(f"elcell: {path}: {error}", file=sys.stderr)
                    rows.append([str(path)] + [""] * (len(header) - 2) + [error.replace("\n", " ")])
                    continue
                probs = [f"{p:.6f}" for p in scored.probs[i]]
                if tta:
                    probs += [f"{p:.6f}" for p in scored.plain[i]]
                rows.append([str(path), *probs, *decisions[i], ""])
            writer.write(rows)
            good = decisions[ok]
            for j, label in enumerate(info.labels):
                result.defect[label] += int((good[:, j] == DEFECT).sum())
                result.review[label] += int((good[:, j] == REVIEW).sum())
            result.cells_in_review += int(((good == REVIEW).any(axis=1) & ~(good == DEFECT).any(axis=1)).sum())
            result.predicted += int(ok.sum())
            bar.update(len(scored.paths))
    finally:
        bar.close()
        writer.close()
        result.seconds = time.perf_counter() - started
    return result
