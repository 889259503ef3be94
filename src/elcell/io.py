"""Writing outputs: atomically (a reader or a crash never sees half a file), to
paths that the user agreed to replace, under names that do not clash."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elcell.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def output_mode(path: str | Path, option: str = "--out", *, overwrite: bool = False,
                resume: bool | None = None, file: bool = False) -> str:
    """One policy for every output a command writes: `new` when nothing is there
    (or an empty file or folder), else `resume` or `overwrite` when the user said
    so, else DataError naming the path and the way on. `resume=None`: the command
    cannot resume, so only --overwrite is offered. Also refused before any work:
    a path that cannot be written, and (file=True) a folder where a file goes."""
    path = Path(path)
    _check_writable(path, option)
    if file and path.is_dir():
        raise DataError(f"{option} {path} is a folder; name the file to write")
    if not path.exists() or (path.is_file() and path.stat().st_size == 0) or \
            (path.is_dir() and not any(path.iterdir())):
        return "new"
    if resume:
        return "resume"
    if overwrite:
        return "overwrite"
    way = ("pass --resume to continue it, or --overwrite to replace it" if resume is not None
           else f"pass --overwrite to replace it, or choose another {option}")
    raise DataError(f"{path} exists: {way}")


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """A folder a command will write in, refused before any work when it is a
    file or cannot be written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path}: exists and is not a folder")
    _check_writable(path, option)
    return path


def _check_writable(path: Path, option: str) -> None:
    """DataError when `path` could not be written: its nearest existing folder is
    a file, or cannot be written in (permissions, a read-only file system)."""
    target = path if path.is_dir() else path.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise DataError(f"{option} {path}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise DataError(f"{option} {path}: cannot write in {target} (read-only, or not yours)")


def counted(n: int, noun: str) -> str:
    """'1 image', '2 images': a count in a message."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def safe_name(text: str) -> str:
    """A file-name-safe version of a label or image stem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """One output name per image: its stem, made unique with a short hash of the
    path when two images (in different folders) share a stem."""
    stems = [safe_name(Path(p).stem) for p in paths]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else
            f"{stem}_{hashlib.sha1(str(Path(p).resolve()).encode()).hexdigest()[:8]}"
            for stem, p in zip(stems, paths, strict=True)]
