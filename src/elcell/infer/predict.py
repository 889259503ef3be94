"""`elcell predict`: stream any number of images through a model into a CSV that
survives a crash. Torch-free.

Rows are appended and fsync'ed batch by batch; `resume=True` continues where
the file ends. Every row names the model that judged it (its file name and a
hash of its weights) and the thresholds it used, so a CSV continued with
another model, or other thresholds, is refused by identity.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from elcell.cells.images import read_gray
from elcell.cells.inputs import Unreadable, check_resumed_paths, collect_inputs, report_unreadable
from elcell.cells.labels import file_key
from elcell.errors import DataError
from elcell.infer.explain import explain_cell
from elcell.infer.runtime import (
    DEFECT,
    OK,
    REVIEW,
    Model,
    ScoredBatch,
    chosen_thresholds,
    default_workers,
    open_model,
    score_files,
)
from elcell.infer.tables import ParquetRows, is_parquet
from elcell.io import atomic_path, check_out_folder, counted, output_mode, unique_names
from elcell.options import show_progress

# Scores files batch by batch: runtime.score_files on this machine, or
# elcell.cluster on Ray (the command line passes it in: inference never imports Ray)
Scorer = Callable[[Model, list[Path], int, bool, list[float], list[float]], Iterable[ScoredBatch]]

CSV_SEPARATOR = ";"  # as the spec's labels CSV and split.csv
TRAILER = ("error", "model", "thresholds")  # the last columns of every row


def csv_header(labels: Sequence[str], tta: bool = False) -> list[str]:
    header = ["path", *(f"prob_{label}" for label in labels)]
    if tta:
        header += [f"prob_{label}_no_tta" for label in labels]
    return header + [f"decision_{label}" for label in labels] + list(TRAILER)


def model_column(model: Model) -> str:
    """Which model judged a row: its file name and the first 16 hex digits of the
    sha256 of its graph (weights included; a tuned copy keeps them)."""
    return f"{model.path.name}@{model.info.short_id}"


def thresholds_column(labels: Sequence[str], thresholds: Sequence[float],
                      review_thresholds: Sequence[float]) -> str:
    """`crack=0.5/0.3 inactive=0.5/0.5`: each label's threshold / review threshold."""
    return " ".join(f"{label}={high:.6g}/{min(low, high):.6g}"
                    for label, high, low in zip(labels, thresholds, review_thresholds, strict=True))


@dataclass
class PredictResult:
    """What a predict run did; `failed` lists this run's unreadable images."""

    total: int = 0
    skipped: int = 0  # already in the output CSV (resume)
    predicted: int = 0
    failed: list[Unreadable] = field(default_factory=list)
    defect: dict[str, int] = field(default_factory=dict)
    review: dict[str, int] = field(default_factory=dict)
    cells_in_review: int = 0
    cells_ok: int = 0  # ok for every label
    seconds: float = 0.0
    dropped_partial_line: bool = False
    overlays: int = 0  # heatmap overlays written (--heatmaps)


class RowWriter:
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


# --------------------------------------------------------------------------- resume
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
        raise DataError(f"--resume {out}: its columns {rows[0]} differ from this run's {header} (another "
                        "model, --tta changed, or an older elcell wrote it); write to a new --out")
    error = header.index("error")
    finished, keep, retry = [], lines[:1], 0
    for line_no, (line, row) in enumerate(zip(lines[1:], rows[1:], strict=True), start=2):
        if len(row) != len(header):
            raise DataError(f"--resume {out} line {line_no}: {len(row)} fields, expected {len(header)}; "
                            "the file was edited or is not from elcell predict")
        if row[error]:
            retry += 1
            continue
        finished.append(row)
        keep.append(line)
    return finished, keep if dropped or retry else None, dropped


def check_same_model(rows: list[list[str]], header: list[str], out: Path, model: str, thresholds: str) -> None:
    """Refuse to append to rows that another model (by the hash of its weights) or
    other thresholds wrote: one CSV holds one model's decisions."""
    at_model, at_thresholds = header.index("model"), header.index("thresholds")
    ours = model.rpartition("@")[2]
    for row in rows:
        if row[at_model].rpartition("@")[2] != ours:
            raise DataError(f"--resume {out}: its rows were written by another model ({row[0]}: "
                            f"{row[at_model]}, this is {model}); resume with that model, or write to "
                            "a new --out")
        if row[at_thresholds] != thresholds:
            raise DataError(f"--resume {out}: its decisions were made with other thresholds ({row[0]}: "
                            f"{row[at_thresholds]}, now {thresholds}); resume with the same "
                            "--threshold/--review-threshold, or write to a new --out")


def _prepare_parquet(sink: ParquetRows, resume: bool, overwrite: bool, model: str, thresholds: str) -> set[str]:
    """As _prepare_output for a Parquet --out: the paths it already holds."""
    if not sink.exists():
        sink.out.parent.mkdir(parents=True, exist_ok=True)
        return set()
    if output_mode(sink.out if sink.out.is_file() else sink.parts, overwrite=overwrite, resume=resume) != "resume":
        sink.clear()
        return set()
    previous = sink.previous(["path", "model", "thresholds"]).to_pydict()
    rows = [list(row) for row in zip(previous["path"], previous["model"], previous["thresholds"], strict=True)]
    check_same_model(rows, ["path", "model", "thresholds"], sink.out, model, thresholds)
    return set(previous["path"])


def _open_output(out: Path | None, header: list[str], resume: bool, overwrite: bool, trailer: list[str],
                 result: PredictResult) -> tuple[set[str], RowWriter | ParquetRows]:
    """The paths `out` already holds (resume) and the writer that appends to it."""
    if is_parquet(out):
        sink = ParquetRows(out, header, key="path")
        return _prepare_parquet(sink, resume, overwrite, trailer[1], trailer[2]), sink
    done, fresh = _prepare_output(out, header, resume, overwrite, trailer[1], trailer[2], result)
    return done, RowWriter(out, header, fresh)


def _prepare_output(out: Path | None, header: list[str], resume: bool, overwrite: bool, model: str,
                    thresholds: str, result: PredictResult) -> tuple[set[str], bool]:
    """Check `out` and repair it for resuming: the paths already done and whether
    to start the file afresh (header included)."""
    if out is None:
        if resume:
            raise DataError("--resume needs --out FILE (the CSV to continue)")
        return set(), True
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: give the CSV file to write, e.g. {out / 'predictions.csv'}")
    if output_mode(out, overwrite=overwrite, resume=resume) != "resume":
        out.parent.mkdir(parents=True, exist_ok=True)
        return set(), True
    previous, repaired, result.dropped_partial_line = read_previous(out, header)
    check_same_model(previous, header, out, model, thresholds)
    if repaired is not None:
        with atomic_path(out) as tmp:
            tmp.write_text("".join(line + "\n" for line in repaired), encoding="utf-8")
    return {row[0] for row in previous}, out.stat().st_size == 0


# --------------------------------------------------------------------------- predict
def _rows(scored: ScoredBatch, tta: bool, trailer: list[str], result: PredictResult,
          bar: tqdm) -> list[list[str]]:
    """CSV rows of one batch; unreadable images are reported and counted."""
    n = scored.probs.shape[1]
    rows, k = [], 0
    for i, path in enumerate(scored.paths):
        if scored.errors[i] is not None:
            item = Unreadable(str(path), scored.errors[i])
            result.failed.append(item)
            bar.clear()
            report_unreadable(item)
            rows.append([str(path)] + [""] * (n * (3 if tta else 2)) + [item.reason.replace("\n", " "), *trailer[1:]])
            continue
        probs = [f"{p:.6f}" for p in scored.probs[i]] + ([f"{p:.6f}" for p in scored.plain[i]] if tta else [])
        rows.append([str(path), *probs, *scored.scores.decisions[k], *trailer])
        k += 1
    return rows


def _count(result: PredictResult, decisions: np.ndarray, labels: list[str]) -> None:
    for j, label in enumerate(labels):
        result.defect[label] += int((decisions[:, j] == DEFECT).sum())
        result.review[label] += int((decisions[:, j] == REVIEW).sum())
    flagged_defect = (decisions == DEFECT).any(axis=1)
    result.cells_in_review += int(((decisions == REVIEW).any(axis=1) & ~flagged_defect).sum())
    result.cells_ok += int((decisions == OK).all(axis=1).sum())
    result.predicted += len(decisions)


def _write_overlays(folder: str | Path, scored: ScoredBatch, names: dict[Path, str], model: Model) -> int:
    """Overlays, on each cell at its own resolution (read again: only flagged cells
    are), for the labels each readable cell is not `ok` for; returns how many."""
    written = 0
    scores = scored.scores
    for k, i in enumerate(np.flatnonzero(scored.ok)):
        flagged = [j for j, decision in enumerate(scores.decisions[k]) if decision != OK]
        if flagged:
            original = read_gray(scored.paths[i], model.decoding.bit_depth)
            explain_cell(folder, names[scored.paths[i]], original, scores.heatmaps[k],
                         scores.probs[k], model.info.labels, which=flagged, decisions=scores.decisions[k],
                         raw=False)
            written += len(flagged)
    return written


def _not_done(paths: list[Path], done: set[str], out: Path | None) -> list[Path]:
    """The paths `out` does not hold yet, matched as files (relative or absolute,
    through links), not as the text typed. Rows written as relative paths from
    another folder cannot be matched: refused, rather than every cell twice."""
    if not done:
        return list(paths)
    check_resumed_paths(done, out)
    keys = {file_key(p) for p in done}
    return [p for p in paths if file_key(p) not in keys]


def _local_scorer(workers: int, heatmaps: bool) -> Scorer:
    """runtime.score_files: decoding in `workers` threads, one ONNX Runtime session."""
    def scorer(model, todo, batch_size, tta, thresholds, review_thresholds):
        return score_files(model, todo, batch_size, workers, tta, heatmaps, thresholds, review_thresholds)
    return scorer


OTHER_FORMATS = (".json", ".jsonl", ".ndjson", ".xlsx", ".xls", ".html", ".npy")


def predict(model: Model, paths: list[Path], out: str | Path | None = None, *,
            batch_size: int = 16, workers: int | None = None, tta: bool = False,
            thresholds: list[float] | None = None, review_thresholds: list[float] | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = True,
            heatmaps_dir: str | Path | None = None, scorer: Scorer | None = None) -> PredictResult:
    """Predict every image in `paths` into a CSV (stdout when `out` is None), or
    a Parquet file when `out` ends in .parquet (typed columns, same names).

    Columns: path, prob_<label> (the TTA mean with tta, plus prob_<label>_no_tta),
    decision_<label> (defect / review / ok), error, model, thresholds. Bad
    images get empty probabilities and decisions and the reason in `error`; they
    are also reported on stderr, and the run goes on. With heatmaps_dir, cells
    judged `defect` or `review` for a label get an overlay of that label's
    heatmap there (`<name>_<label>.png`). `scorer` replaces the local decoding
    and scoring (elcell.cluster passes Ray Data's).
    """
    info = model.info
    thresholds = info.thresholds if thresholds is None else thresholds
    review_thresholds = info.review_thresholds if review_thresholds is None else review_thresholds
    header = csv_header(info.labels, tta)
    trailer = ["", model_column(model), thresholds_column(info.labels, thresholds, review_thresholds)]
    out = Path(out) if out is not None and str(out) != "-" else None
    if batch_size < 1:  # before the output file is made
        raise DataError(f"--batch-size {batch_size}: need at least 1")
    if heatmaps_dir is not None:
        check_out_folder(heatmaps_dir, "--heatmaps")
    if out is not None and out.suffix.lower() in OTHER_FORMATS:  # it would hold CSV under that name
        raise DataError(f"--out {out}: predict writes CSV (FILE.csv) or Parquet (FILE.parquet), not "
                        f"{out.suffix.lower()[1:].upper()}")
    result = PredictResult(total=len(paths), defect=dict.fromkeys(info.labels, 0),
                           review=dict.fromkeys(info.labels, 0))
    done, writer = _open_output(out, header, resume, overwrite, trailer, result)
    todo = _not_done(paths, done, out)
    result.skipped = len(paths) - len(todo)
    names = dict(zip(todo, unique_names(todo))) if heatmaps_dir is not None else {}  # once: no clashes
    scorer = scorer or _local_scorer(default_workers() if workers is None else workers, heatmaps_dir is not None)
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="cell", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for scored in scorer(model, todo, batch_size, tta, thresholds, review_thresholds):
            if heatmaps_dir is not None:
                result.overlays += _write_overlays(heatmaps_dir, scored, names, model)
            writer.write(_rows(scored, tta, trailer, result, bar))
            _count(result, scored.scores.decisions, info.labels)
            bar.update(len(scored.paths))
    finally:
        bar.close()
        writer.close()
        result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- command
def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts.items())


def _say(text: str) -> None:
    print(f"elcell: {text}", file=sys.stderr)


def _report(result: PredictResult, args, paths: list[Path]) -> int:
    if args.heatmaps:
        _say(f"{result.overlays} heatmap overlays in {args.heatmaps}")
    if result.dropped_partial_line:
        _say(f"{args.out}: dropped a partially written last line")
    rate = result.predicted / result.seconds if result.seconds > 0 else 0.0
    # after --resume the counts are of this run's cells, not of the whole file
    skipped = f" ({result.skipped} were already in {args.out}); among the new ones," if result.skipped else ";"
    _say(f"predicted {counted(result.predicted, 'cell')} in {result.seconds:.1f} s ({rate:.1f} cells/s){skipped} "
         f"defect: {_counts(result.defect)}; review: {_counts(result.review)}; "
         f"{counted(result.cells_in_review, 'cell')} for a person to review")
    if result.predicted >= 20 and result.cells_ok == 0:
        _say(f"warning: no cell is ok: all {result.predicted} are defect or review for some label. Are the "
             "thresholds what you meant (a tuned model's, --threshold, --review-threshold)?")
    if result.failed:
        _say(f"{len(result.failed)} of {len(paths) - result.skipped} images failed (see the error column)")
        return 1
    return 0


def main(args, scorer: Scorer | None = None) -> int:
    """`elcell predict` (options: elcell.cli); `scorer`: see `predict`."""
    model = open_model(args.model, threads=args.threads)
    info = model.info
    thresholds, review = chosen_thresholds(info, args.threshold, args.review_threshold)
    paths = collect_inputs(args.inputs, outputs=[args.heatmaps])
    for label, high, low in zip(info.labels, thresholds, review, strict=True):
        if low > high:
            _say(f"note: {label}: review threshold {low:g} is above the threshold {high:g}, so there is "
                 "no review band")
    bands = ", ".join(f"{label} defect >= {t:.4g}, review >= {min(r, t):.4g}"
                      for label, t, r in zip(info.labels, thresholds, review, strict=True))
    _say(f"{model.path.name} on {model.provider}; {counted(len(paths), 'image')}; {bands}")
    try:
        result = predict(model, paths, args.out, batch_size=args.batch_size, workers=args.workers,
                         tta=args.tta, thresholds=thresholds, review_thresholds=review, resume=args.resume,
                         overwrite=args.overwrite, progress=show_progress(args.progress),
                         heatmaps_dir=args.heatmaps, scorer=scorer)
    except BrokenPipeError:
        if args.out not in (None, "-"):
            raise
        # `elcell predict ... | head`: the reader has all it wants; stdout goes to
        # /dev/null so that Python's flush at exit does not fail a second time
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return _report(result, args, paths)
