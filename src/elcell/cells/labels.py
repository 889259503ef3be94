"""Label tables: which image has which labels. Torch-free (used by evaluate too).

Two sources: a labels CSV in the seed format (path; crack; inactive) and the
ELPV cells shipped in the `elpv-dataset` package (one soft label, `defective`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elcell.errors import DataError


@dataclass
class LabelTable:
    """Image paths with one target column per label.

    targets are floats in [0, 1]: 0/1 for CSV labels, the expert probability for
    ELPV. A cell counts as positive for a label when its target is >= 0.5. NaN
    means unknown: the CSV left that label empty for that cell (ELPV has none).
    """

    paths: list[Path]
    names: list[str]
    targets: np.ndarray  # float32 [N, L]
    groups: list[str] | None = None  # e.g. ELPV cell type (mono/poly)
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def positives(self) -> np.ndarray:
        """0/1 int array [N, L]: the decision a perfect model would make; 0 where
        unknown (NaN >= 0.5 is False), so use it together with `known`."""
        return (self.targets >= 0.5).astype(np.int64)

    @property
    def known(self) -> np.ndarray:
        """bool [N, L]: False where the label of that cell is unknown (left empty)."""
        return ~np.isnan(self.targets)

    @property
    def strata(self) -> np.ndarray:
        """int [N, L] for stratified splits: 1 positive, 0 negative, -1 unknown, so
        the unknowns spread over the splits as the known negatives do."""
        return np.where(self.known, self.positives, -1)

    def subset(self, index: np.ndarray) -> LabelTable:
        index = np.asarray(index, dtype=np.int64)
        return LabelTable(
            paths=[self.paths[i] for i in index],
            names=list(self.names),
            targets=self.targets[index],
            groups=None if self.groups is None else [self.groups[i] for i in index],
            source=self.source,
        )


def guess_separator(line: str) -> str | None:
    """The most frequent of `;`, `,` and tab in a CSV line; None if it has none."""
    counts = {sep: line.count(sep) for sep in (";", ",", "\t")}
    sep = max(counts, key=counts.get)
    return sep if counts[sep] else None


def _detect_separator(header: str, csv_path: Path) -> str:
    sep = guess_separator(header)
    if sep is None:
        raise DataError(
            f"{csv_path}: header {header.strip()!r} has only one column; "
            "expected an image path column and at least one label column (e.g. 'path;crack;inactive')"
        )
    return sep


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_YES_NO = ("yes", "no", "y", "n", "true", "false")


def file_key(path: str | Path) -> str:
    """One key per file however it is named: relative or absolute, through links,
    in any case where the file system ignores case."""
    return os.path.normcase(os.path.realpath(path))


def _rows_with_line_numbers(text: str, sep: str) -> list[tuple[int, list[str]]]:
    """The non-blank rows, each with the file line it starts on: messages name the
    line a user sees in an editor, blank lines and quoted line breaks included."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    rows, start = [], 1
    for row in reader:
        if any(field.strip() for field in row):
            rows.append((start, row))
        start = reader.line_num + 1
    return rows


def _read_text(csv_path: Path) -> str:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{csv_path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{csv_path}: cannot read labels file ({err})") from None
    if not text.strip():
        raise DataError(f"{csv_path}: the labels file is empty")
    return text


PATH = "path"  # the column of image paths when a header names it; else the first column


def path_column(header: list[str]) -> int:
    """Where the image paths are: the column named `path` (any case), else the first."""
    return next((i for i, name in enumerate(header) if name.strip().casefold() == PATH), 0)


def check_slashes(image: str, base: Path, where: str) -> None:
    """DataError for a path written with Windows' backslashes that names a file
    only when read with slashes (which every system reads)."""
    if "\\" in image and not (base / image).exists() and (base / image.replace("\\", "/")).exists():
        raise DataError(f"{where}: {image!r} uses \\ between folders; write / instead (Windows reads it too)")


NOTE = "reason"  # a column of words beside the labels (why `segment --model` put a cell where it is), not a label


def _check_header(header: list[str], header_line: str, sep: str, csv_path: Path, group: str | None) -> list[int]:
    """The label columns of a header, or DataError saying what is wrong with it."""
    at = path_column(header)
    if any(is_number(name) for i, name in enumerate(header) if i != at):
        raise DataError(f"{csv_path}: the first line must be a header naming the columns (e.g. "
                        f"'path;crack;inactive'), got {header_line!r}")
    if not all(header):
        trailing = f" (a {sep!r} at the end of each line?)" if not header[-1] else ""
        raise DataError(f"{csv_path}: header column {header.index('') + 1} has no name in {header_line!r}{trailing}")
    if len(set(header)) != len(header):
        raise DataError(f"{csv_path}: duplicate column names in header {header}")
    if group is not None and (group not in header or header.index(group) == at):
        raise DataError(f"{csv_path}: no column {group!r} for groups; columns are {header}")
    label_columns = [i for i, name in enumerate(header) if i != at and name not in (group, NOTE)]
    if not label_columns:
        raise DataError(f"{csv_path}: no label columns; expected e.g. 'path;crack;inactive'")
    return label_columns


def _label_value(value: str, name: str, where: str) -> float:
    """0 or 1, or a soft label in [0, 1] (an expert's probability, as ELPV's);
    NaN for an empty value: unknown for this label (the loss and metrics skip it)."""
    if not value:
        return math.nan
    if is_number(value) and 0 <= float(value) <= 1:
        return float(value)
    names_a_group = value and not is_number(value) and value.lower() not in _YES_NO
    hint = f" (if {name!r} names groups such as the cell type, pass --group {name})" if names_a_group else ""
    raise DataError(f"{where}: label {name!r} is {value!r}; labels must be 0 or 1, or a soft label in "
                    f"[0, 1]{hint}")


def label_fields(targets: np.ndarray) -> list[str]:
    """A row's labels as a labels CSV holds them (what read_labels_csv reads
    back): empty where unknown (NaN)."""
    return ["" if np.isnan(t) else f"{t:g}" for t in targets]


def read_labels_csv(csv_path: str | Path, group: str | None = None) -> LabelTable:
    """Read a labels CSV in the spec's format.

    The column named `path`, else the first: image path (relative to the CSV's
    folder unless absolute).
    Every other column is a label, 0/1 or soft in [0, 1] (positive from 0.5),
    or empty for unknown (NaN in targets; each row needs one known label),
    except `group` (e.g. cell type), which is kept as a group name for stratified
    splits and per-group reports, and `reason` (words, ignored).
    """
    csv_path = Path(csv_path)
    text = _read_text(csv_path)
    first = next(line for line in text.splitlines() if line.strip())
    sep = _detect_separator(first, csv_path)
    rows = _rows_with_line_numbers(text, sep)
    if not rows:  # only separators
        raise DataError(f"{csv_path}: the labels file is empty")
    header = [name.strip() for name in rows[0][1]]
    label_columns = _check_header(header, sep.join(rows[0][1]).strip(), sep, csv_path, group)
    if len(rows) < 2:
        raise DataError(f"{csv_path}: the labels file has a header but no rows")
    base = csv_path.resolve().parent
    at = path_column(header)
    paths, targets, groups = [], [], []
    first_line: dict[str, int] = {}  # each image once: a repeat could land in train and test
    for line_no, row in rows[1:]:
        where = f"{csv_path} line {line_no}"
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
        image = row[at].strip()
        if not image:
            raise DataError(f"{where}: empty image path")
        check_slashes(image, base, where)
        if is_number(image) and not Path(image).suffix:  # a label where the path should be
            raise DataError(f"{where}: the image path column {header[at]!r} holds {image!r}; put the image paths "
                            f"in the first column or name their column {PATH!r}")
        targets.append([_label_value(row[i].strip(), header[i], where) for i in label_columns])
        if all(math.isnan(t) for t in targets[-1]):  # a row with no known label teaches nothing
            raise DataError(f"{where}: every label of {image!r} is empty (unknown); give at least one "
                            "label or drop the row")
        path = base / image  # an absolute path stays itself
        if file_key(path) in first_line:
            raise DataError(f"{where}: image {image!r} is listed again (first on line "
                            f"{first_line[file_key(path)]}); list each image once")
        first_line[file_key(path)] = line_no
        paths.append(path)
        if group is not None:
            groups.append(row[header.index(group)].strip())
    return LabelTable(paths=paths, names=[header[i] for i in label_columns],
                      targets=np.asarray(targets, dtype=np.float32),
                      groups=groups if group is not None else None, source=str(csv_path))


def elpv_table() -> LabelTable:
    """The 2,624 ELPV cells: label `defective` = expert defect probability, group = cell type."""
    try:
        import elpv_dataset
    except ImportError:
        raise DataError(
            "--data elpv needs the ELPV cells: pip install elpv-dataset (or elcell[elpv])"
        ) from None
    folder = Path(elpv_dataset.__file__).parent / "data"
    paths, probabilities, types = [], [], []
    for line in (folder / "labels.csv").read_text().splitlines():
        if line.strip():
            image, probability, cell_type = line.split()
            paths.append(folder / image)
            probabilities.append(float(probability))
            types.append(cell_type)
    return LabelTable(
        paths=paths,
        names=["defective"],
        targets=np.asarray(probabilities, dtype=np.float32)[:, None],
        groups=types,
        source="elpv",
    )


def load_table(data: str | Path, group: str | None = None) -> LabelTable:
    """`elpv` for the embedded ELPV cells, else a labels CSV."""
    if str(data) == "elpv":
        table = elpv_table()
        if group not in (None, "type"):
            raise DataError(f"--data elpv has one group column, 'type' (mono/poly), not {group!r}")
        return table
    return read_labels_csv(data, group=group)
