"""Parquet outputs (`--out results.parquet`) written as a crash-safe stream.
Torch-free; pyarrow is imported only when a Parquet file is asked for.

An archive's results are read with pandas, DuckDB or Spark, so predict and
inspect write typed columns (probabilities as floats, counts as integers,
empty values as nulls) instead of CSV text. A Parquet file is only readable
once its footer is written, so rows go first into small, atomically written
part files in `<out>.parts/` (every 1,024 rows or 5 seconds); closing merges the file and the parts into
`<out>` (atomically), records the last part merged in the file's metadata and
removes the parts. After a kill, `--resume` finds the parts (and any parts a
merge had already taken, by that record), so it loses at most the rows not
yet in a part, and never counts a row twice.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from elcell.errors import DataError
from elcell.io import atomic_path

MERGED_KEY = b"elcell.merged_upto"  # the name of the last part the file holds
FLOAT_COLUMNS = re.compile(r"^(prob_.*|x[0-3]|y[0-3]|dark_area|seconds)$")
INT_COLUMNS = re.compile(r"^(row|col|defect_.*|review_.*|defect_cells|review_cells)$")


def is_parquet(out: str | Path | None) -> bool:
    return out is not None and Path(out).suffix.lower() in (".parquet", ".pq")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise DataError("--out *.parquet needs pyarrow: pip install 'elcell[parquet]' (or elcell[cluster])") from None
    return pa, pq


def schema_for(header: Sequence[str]):
    """Column types for the CSV header a command writes: floats, integers, text."""
    pa, _ = _pyarrow()

    def kind(name: str):
        if INT_COLUMNS.match(name):
            return pa.int64()
        if FLOAT_COLUMNS.match(name):
            return pa.float64()
        return pa.string()

    return pa.schema([(name, kind(name)) for name in header])


def _converter(kind) -> Callable[[str], object]:
    pa, _ = _pyarrow()
    if kind == pa.int64():
        return lambda text: int(text) if text else None
    if kind == pa.float64():
        return lambda text: float(text) if text else None
    return lambda text: text if text else None


class ParquetRows:
    """The rows of one output, given as the CSV rows (lists of strings) a command
    makes, written to `out` through part files. `key` names the column whose
    values resume skips (path for predict, module for inspect); rows with an
    `error` are tried again, as in the CSV outputs."""

    def __init__(self, out: str | Path, header: Sequence[str], key: str, rows_per_part: int = 1024,
                 seconds_per_part: float = 5.0):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.header = list(header)
        self.key = key
        self.schema = schema_for(header)
        self.convert = [_converter(f.type) for f in self.schema]
        # a part when either is reached: few files for an archive, little lost to a kill on a slow one
        self.rows_per_part, self.seconds_per_part = rows_per_part, seconds_per_part
        self.last_part = time.monotonic()
        self.pending: list[list[str]] = []
        self.old: list[Path] = []  # sources from earlier runs: their failed rows are dropped at the merge

    # ------------------------------------------------------------------ resume
    def exists(self) -> bool:
        return self.out.is_file() or any(self._part_files())

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def _merged_upto(self) -> str:
        if not self.out.is_file():
            return ""
        _, pq = _pyarrow()
        meta = pq.read_schema(self.out).metadata or {}
        return meta.get(MERGED_KEY, b"").decode()

    def previous(self, columns: Iterable[str]):
        """The finished rows (no error) of the file and its parts, `columns` only,
        as one pyarrow Table; checks that they have this run's columns."""
        pa, pq = _pyarrow()
        upto = self._merged_upto()
        for part in self._part_files():  # merged, but the merge was killed before it removed them
            if part.name <= upto:
                part.unlink()
        self.old = ([self.out] if self.out.is_file() else []) + self._part_files()
        tables = []
        for source in self.old:
            try:
                names = pq.read_schema(source).names
            except (OSError, pa.ArrowInvalid) as err:
                raise DataError(f"--resume {source}: not a Parquet file elcell wrote ({err})") from None
            if names != self.header:
                raise DataError(f"--resume {source}: its columns {names} differ from this run's {self.header} "
                                "(another model, --tta changed, or another command wrote it); write to a new --out")
            table = pq.read_table(source, columns=[*columns, "error"])
            tables.append(table.filter(table.column("error").is_null()).select(list(columns)))
        if not tables:
            return pa.table({name: pa.array([], pa.string()) for name in columns})
        return pa.concat_tables(tables)

    def clear(self) -> None:
        """--overwrite: remove an earlier run's file and parts."""
        self.out.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    # ------------------------------------------------------------------ writing
    def write(self, rows: list[list[str]]) -> None:
        self.pending.extend(rows)
        if len(self.pending) >= self.rows_per_part or time.monotonic() - self.last_part >= self.seconds_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        _, pq = _pyarrow()
        self.parts.mkdir(parents=True, exist_ok=True)
        # time-ordered, unique across runs and processes: the merge record compares names
        name = f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        with atomic_path(self.parts / name) as tmp:
            pq.write_table(self._table(self.pending), tmp)
        self.pending = []
        self.last_part = time.monotonic()

    def _table(self, rows: list[list[str]]):
        pa, _ = _pyarrow()
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in self.header]
        return pa.Table.from_arrays([pa.array([convert(v) for v in values], type=field.type)
                                     for values, convert, field in zip(columns, self.convert, self.schema,
                                                                       strict=True)], schema=self.schema)

    def close(self) -> None:
        """Write the last rows and merge everything into `out` (streamed, one row
        group per source, so an archive's file never has to fit in memory)."""
        self.flush()
        _, pq = _pyarrow()
        parts = self._part_files()
        if not parts and self.out.is_file() and not self.old:
            return
        last = parts[-1].name if parts else ""
        schema = self.schema.with_metadata({MERGED_KEY: last.encode()})
        with atomic_path(self.out) as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                for source in ([self.out] if self.out.is_file() else []) + parts:
                    for batch in pq.ParquetFile(source).iter_batches(batch_size=65536):
                        if source in self.old:  # an earlier run's failures were tried again by this one
                            batch = batch.filter(batch.column("error").is_null())
                        writer.write_batch(batch.cast(self.schema) if batch.schema != self.schema else batch)
                if not parts and not self.out.is_file():
                    writer.write_table(self._table([]))
        shutil.rmtree(self.parts, ignore_errors=True)
        self.old = []
