"""The review loop: cells a model flagged, answered by a person, become training
data. Torch-free.

`elcell.station.queue` holds the cells waiting for an operator. `LabelsFolder` writes each
answer to DIR/labels.csv in the training format (`path;crack;inactive`, the
path relative to DIR) with the cell image beside it in DIR/cells/, so that
`elcell train --data DIR/labels.csv` trains on it.

Crash safety: the image is written first (temporary file, fsync, rename, then
an fsync of cells/ so that the rename itself is on disk), the row after it,
so a row never names a missing image, not even after a power cut. A row is
appended with one write() on a file opened for appending, under a lock (a
thread lock for this process, an advisory file lock for other processes on
the same folder), then fsync'ed: concurrent reviewers never interleave. A
server killed in the middle of that write can leave a partial last line; the
next start drops it, and a row is never appended after a partial line, so the
file stays readable by `read_labels_csv`. A failed write (disk full) is cut
back off.

One row per cell: a cell is known by the hash of its decoded pixels
(`pixel_key`), which its image's file name carries (`..._h<key>.png`), so the
answers given survive a restart with labels.csv itself and nothing beside it
can disagree with it. The same answer again adds nothing; a different one
replaces the row (labels.csv rewritten atomically) and says what it replaced.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from elcell.cells.labels import guess_separator
from elcell.errors import DataError
from elcell.io import check_out_folder, safe_name

try:  # advisory locks between processes (POSIX); a thread lock alone elsewhere
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SEPARATOR = ";"  # as the spec's labels CSV
KEY = re.compile(r"_h([0-9a-f]{16})\.png$")  # a reviewed cell's file name carries its pixel key


def pixel_key(pixels: np.ndarray) -> str:
    """A cell's identity: 16 hex digits of the SHA-256 of its decoded pixels (with
    their shape and type), so the same cell uploaded twice, under any name or
    file format, is one cell."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(pixels.data)
    return digest.hexdigest()[:16]


@dataclass
class Saved:
    """One answer on disk: the row's image path (relative to the folder) and values."""

    path: str
    values: list[str]
    rows: int  # rows in labels.csv after this one
    replaced: list[str] | None = None  # the values of the row this answer replaced
    same: bool = False  # the cell had this answer already: nothing written


class LabelsFolder:
    """DIR/labels.csv and DIR/cells/: answers appended as training rows."""

    def __init__(self, folder: str | Path, labels: Sequence[str]):
        self.folder = Path(folder)
        self.labels = list(labels)
        self.csv = self.folder / "labels.csv"
        self.cells = self.folder / "cells"
        self._lock = threading.Lock()
        check_out_folder(self.folder, "--labels-out")  # a file, or unwritable: said before serving
        self.cells.mkdir(parents=True, exist_ok=True)
        _sync_folder(self.folder)  # cells/ itself survives a power cut
        self.separator = SEPARATOR
        self.dropped_partial_line = False
        self.answered: dict[str, tuple[str, list[str]]] = {}  # pixel key -> (path, values) of its row
        with self._locked():
            self.rows = self._prepare()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's lock, then the folder's lock file (other processes)."""
        with self._lock:
            if fcntl is None:
                yield
                return
            with open(self.folder / ".labels.lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _prepare(self) -> int:
        """Create labels.csv with its header, or check the one there and cut off a
        partial last line a killed writer left. Returns the number of rows."""
        if not self.csv.is_file() or self.csv.stat().st_size == 0:
            self._write_whole(SEPARATOR.join(["path", *self.labels]) + "\n")
            return 0
        data = self.csv.read_bytes()
        if not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self.dropped_partial_line = True
            self._write_whole(data.decode("utf-8", errors="replace"))
        lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
        if not lines:
            self._write_whole(SEPARATOR.join(["path", *self.labels]) + "\n")
            return 0
        self.separator = guess_separator(lines[0]) or SEPARATOR
        header = [name.strip() for name in lines[0].split(self.separator)]
        if header[1:] != self.labels:
            raise DataError(f"--labels-out {self.folder}: its labels.csv has the columns {header}, this model "
                            f"gives {['path', *self.labels]}; use another folder for this model's labels")
        for line in lines[1:]:
            fields = [part.strip() for part in line.split(self.separator)]
            found = KEY.search(fields[0])
            if found:
                self.answered[found[1]] = (fields[0], fields[1:])
        return len(lines) - 1

    def _write_whole(self, text: str) -> None:
        tmp = self.csv.with_name(f".{self.csv.name}.{secrets.token_hex(4)}.tmp")
        _write_synced(tmp, text.encode("utf-8"))
        os.replace(tmp, self.csv)
        _sync_folder(self.folder)

    def add(self, pixels: np.ndarray, name: str, answer: Mapping[str, int], key: str | None = None,
            image: bytes | None = None) -> Saved:
        """Save the cell (at its own resolution and depth; `image`: its PNG bytes
        when at hand) and append its row; or, for a cell answered before, keep
        its row if the answer is the same and replace it if not.
        `answer`: 0 or 1 per label (a label left out is 0)."""
        unknown = set(answer) - set(self.labels)
        if unknown:
            raise DataError(f"labels {sorted(unknown)} are not this model's; its labels are {self.labels}")
        values = [str(int(answer.get(label, 0))) for label in self.labels]
        key = key or pixel_key(pixels)
        with self._locked():
            if key in self.answered:
                return self._again(key, values)
        file = f"cells/{time.strftime('%Y%m%d-%H%M%S')}_{safe_name(Path(name).stem)[:80]}_h{key}.png"
        _write_synced(self.folder / file, image or png(pixels), atomic=True)  # written, fsync'ed, renamed
        _sync_folder(self.cells)  # the rename on disk before a row names the file
        line = (self.separator.join([file, *values]) + "\n").encode("utf-8")
        with self._locked():
            if key in self.answered:  # another reviewer answered it meanwhile
                if self.answered[key][0] != file:  # (in the same second, the same name: theirs now)
                    (self.folder / file).unlink(missing_ok=True)
                return self._again(key, values)
            self._append(line)
            self.rows += 1
            self.answered[key] = (file, values)
            return Saved(file, values, self.rows)

    def _again(self, key: str, values: list[str]) -> Saved:
        """A second answer for a cell (under the lock): the same one changes
        nothing; a different one replaces its row, by rewriting labels.csv whole."""
        path, before = self.answered[key]
        if before == values:
            return Saved(path, values, self.rows, same=True)
        lines = self.csv.read_text(encoding="utf-8").splitlines(keepends=True)
        for i, line in enumerate(lines):
            if i and line.split(self.separator, 1)[0].strip() == path:
                lines[i] = self.separator.join([path, *values]) + "\n"
        self._write_whole("".join(lines))
        self.answered[key] = (path, values)
        return Saved(path, values, self.rows, replaced=before)

    def _append(self, line: bytes) -> None:
        fd = os.open(self.csv, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer elsewhere died mid-line
                size = _cut_partial(fd, size)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(f"{self.csv}: short write (disk full?)")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no half row left behind
                raise
        finally:
            os.close(fd)


def _cut_partial(fd: int, size: int) -> int:
    """Truncate a file open at `fd` after its last newline; returns the new size."""
    start = max(0, size - 65536)
    tail = os.pread(fd, size - start, start)
    keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
    os.ftruncate(fd, keep)
    return keep


def _write_synced(path: Path, data: bytes, atomic: bool = False) -> None:
    """Write `data` to `path` and fsync it; atomic: through a temporary file renamed over it."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if atomic else path  # writers never share it
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic:
            target.unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut. Where folders
    cannot be opened (Windows) or synced (some network file systems: EINVAL)
    this does nothing; any other failure (EIO) is raised, as a file's is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def png(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a gray cell at its own depth: uint8 as 8-bit, uint16 as 16-bit,
    floats in [0, 1] as 16-bit (decoded as the float image would be, to within rounding).
    compress_level 1 encodes about 3.5x faster for a fifth more bytes (the review queue's choice)."""
    pixels = np.asarray(pixels)
    if pixels.dtype.kind == "f":
        pixels = np.round(np.clip(pixels, 0, 1) * 65535).astype(np.uint16)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
