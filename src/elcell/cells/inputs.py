"""Where cells come from: files, folders and CSVs named on the command line,
decoded in threads batch by batch. Torch-free.

An image that cannot be used never stops a batch job: it becomes an
`Unreadable` (path and reason), reported once by `report_unreadable` and
written to the job's outputs, and the job goes on.
"""

from __future__ import annotations

import csv
import glob
import itertools
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from elcell.cells.images import IMAGE_SUFFIXES, Decoding, find_images, load_cell
from elcell.cells.labels import (
    PATH,
    check_slashes,
    file_key,
    guess_separator,
    is_number,
    path_column,
)
from elcell.errors import DataError

MODEL_SUFFIXES = (".onnx", ".ckpt")


@dataclass(frozen=True)
class Unreadable:
    """An image a job skipped, and why (the reason without the path)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def report_unreadable(item: Unreadable, note: str = "", stream: TextIO | None = None) -> None:
    """The one line every command prints for an image it could not use."""
    print(f"elcell: {item}{f' ({note})' if note else ''}", file=stream or sys.stderr)


def unreadable(path: str | Path, err: BaseException) -> Unreadable:
    """The Unreadable for an exception a file provoked (ImageError names the file
    itself; anything else a broken file throws is named here)."""
    message = str(err) or type(err).__name__
    return Unreadable(str(path), message.removeprefix(f"{path}: "))


# --------------------------------------------------------------------------- collecting
def paths_from_csv(csv_path: Path) -> list[Path]:
    """Image paths from a CSV (labels or predictions): the column its header names
    `path`, else the first; relative to the CSV's folder unless absolute. The
    first line is a header unless its first field names an image file."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{csv_path}: cannot read ({err})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{csv_path}: the CSV is empty")
    sep = guess_separator(lines[0]) or ";"  # one column: any separator reads it whole
    rows = list(csv.reader(lines, delimiter=sep))
    at = 0
    if Path(rows[0][0].strip()).suffix.lower() not in IMAGE_SUFFIXES:
        at, rows = path_column(rows[0]), rows[1:]
    base = csv_path.resolve().parent
    values = [row[at].strip() for row in rows if len(row) > at and row[at].strip()]
    if values and all(is_number(v) for v in values[:20]):  # labels where the paths should be
        raise DataError(f"{csv_path}: the image path column holds {values[0]!r}; put the image paths in the first "
                        f"column or name their column {PATH!r}")
    if not values:
        raise DataError(f"{csv_path}: no image paths in the first column (or one named {PATH!r})")
    check_slashes(values[0], base, str(csv_path))
    return [base / value for value in values]  # absolute stays itself


def check_resumed_paths(earlier: Iterable[str], out: Path) -> None:
    """DataError when an output being resumed names files none of which is there
    from this folder: paths typed relative to the folder the first run ran in,
    which cannot be matched from here (everything would be done twice, or
    taken for another file)."""
    sample = list(itertools.islice(earlier, 50))
    if sample and not any(Path(p).exists() for p in sample):
        raise DataError(f"--resume {out}: it names files that are not there from this folder (e.g. "
                        f"{sample[0]!r}): resume from the folder the first run ran in, or write to a new --out")


def _expand_patterns(inputs: Iterable[str | Path]) -> Iterator[str | Path]:
    for item in inputs:
        if Path(item).exists() or not glob.has_magic(str(item)):
            yield item
        else:  # a pattern that matches nothing is named as it is
            yield from sorted(glob.glob(str(item), recursive=True)) or [item]


TABLE_SUFFIXES = (".csv", ".tsv")  # lists of images (labels CSVs: `;`, `,` or tab)


def _expand(item: Path, written: list[Path]) -> list[Path]:
    if item.is_dir():
        images = find_images([item])
        root = item.resolve()
        inside = [w for w in written if w != root and w.is_relative_to(root)]  # an output folder within it
        kept = [p for p in images if not any((root / p.relative_to(item)).is_relative_to(w) for w in inside)]
        if images and not kept:
            raise DataError(f"{item}: its only images are under {inside[0]}, where this command writes")
        images = kept
        if not images:
            raise DataError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return images
    if item.suffix.lower() in TABLE_SUFFIXES and item.is_file():
        return paths_from_csv(item)
    if item.suffix.lower() in MODEL_SUFFIXES:
        raise DataError(f"{item}: a model, not an image; give one model, then the images "
                        "(a shell pattern such as best_model_epoch*.onnx may have matched two models)")
    if item.exists():
        return [item]
    raise DataError(f"{item}: no such file or folder")


def collect_inputs(inputs: Iterable[str | Path], outputs: Iterable[str | Path | None] = ()) -> list[Path]:
    """Image files, folders (searched recursively) and CSVs (first column) -> image
    paths, in order, each once. A named input that does not exist is an error; an
    image listed in a CSV that does not exist is reported per image later. A
    pattern such as cells/*.png is expanded here where no shell did (Windows).
    `outputs`: folders the command writes pictures into; a folder searched does
    not give their files (an earlier run's overlays are not cells)."""
    written = [Path(o).resolve() for o in outputs if o is not None]
    found = [path for item in map(Path, _expand_patterns(inputs)) for path in _expand(item, written)]
    # each file once, however it was named (a CSV's paths are absolute, a folder's as given)
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(file_key(path), path)
    return list(unique.values())


# --------------------------------------------------------------------------- decoding
def read_cell(path: Path, decoding: Decoding) -> np.ndarray | Unreadable:
    """One cell as the model's input, or why it cannot be used. Never raises: a
    batch job must outlive any one file."""
    try:
        return load_cell(path, decoding)
    except Exception as err:  # ImageError, and whatever else a broken file provokes
        return unreadable(path, err)


@dataclass
class Batch:
    """Decoded cells of one batch of paths; `images` holds the readable ones, in order."""

    paths: list[Path]
    images: np.ndarray  # uint8 [k, H, W], k = number of None entries in errors
    errors: list[str | None]  # the reason a path could not be used, else None

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    def unreadable(self) -> list[Unreadable]:
        return [Unreadable(str(p), e) for p, e in zip(self.paths, self.errors, strict=True) if e is not None]


def _collect(chunk: list[Path], results: list, decoding: Decoding) -> Batch:
    images = [r for r in results if not isinstance(r, Unreadable)]
    blank = np.zeros((0, decoding.size, decoding.size), dtype=np.uint8)
    return Batch(chunk, np.stack(images) if images else blank,
                 [r.reason if isinstance(r, Unreadable) else None for r in results])


def decode_batches(paths: Iterable[Path], decoding: Decoding, batch_size: int = 16,
                   workers: int = 2) -> Iterator[Batch]:
    """Decode images (`load_cell`) in `workers` threads, `batch_size` at a time, in order.

    At most workers + 2 batches are decoded ahead of the consumer, so memory
    stays flat however many paths there are. Threads, not processes: Pillow
    releases the GIL while decoding and resizing, ONNX Runtime while running,
    so decoding the next batches overlaps inference, and no arrays are pickled.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: need at least 1")
    chunks = _chunks(paths, batch_size)
    if workers <= 0:
        for chunk in chunks:
            yield _collect(chunk, [read_cell(p, decoding) for p in chunk], decoding)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="elcell-decode") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(read_cell, p, decoding) for p in chunk]))
            if len(pending) >= workers + 2:
                done, futures = pending.popleft()
                yield _collect(done, [f.result() for f in futures], decoding)
        while pending:
            done, futures = pending.popleft()
            yield _collect(done, [f.result() for f in futures], decoding)


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
