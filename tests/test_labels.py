"""Reading label tables: the seed CSV format in its variants, and ELPV."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elcell.cells.labels import LabelTable, load_table, read_labels_csv
from elcell.errors import DataError
from elcell.training.data import limit_table, stratified_split


def write(folder: Path, text: str, name: str = "data.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("sep", [";", ",", "\t"])
def test_separator_is_detected(tmp_path, sep):
    path = write(tmp_path, sep.join(["path", "crack", "inactive"]) + "\n" + sep.join(["a.png", "1", "0"]) + "\n")
    table = read_labels_csv(path)
    assert table.names == ["crack", "inactive"]
    assert table.targets.tolist() == [[1.0, 0.0]]


def test_paths_are_relative_to_the_csv_folder_unless_absolute(tmp_path):
    (tmp_path / "sub").mkdir()
    absolute = tmp_path / "elsewhere" / "b.png"
    path = write(tmp_path / "sub", f"path;crack\nimgs/a.png;0\n{absolute};1\n")
    table = read_labels_csv(path)
    assert table.paths == [tmp_path / "sub" / "imgs" / "a.png", absolute]


def test_a_column_named_path_holds_the_paths_wherever_it_stands(tmp_path):
    from elcell.cells.inputs import paths_from_csv

    path = write(tmp_path, "crack;type;Path;inactive\n1;mono;a.png;0\n0;poly;b.png;1\n")
    table = read_labels_csv(path, group="type")
    assert table.names == ["crack", "inactive"] and table.groups == ["mono", "poly"]
    assert table.paths == [tmp_path / "a.png", tmp_path / "b.png"] and table.targets.tolist() == [[1, 0], [0, 1]]
    assert paths_from_csv(path) == table.paths  # predict reads the same column
    with pytest.raises(DataError, match="the image path column holds '1'"):
        paths_from_csv(write(tmp_path, "crack;inactive\n1;0\n0;1\n", "nopath.csv"))


def test_bom_blank_lines_and_float_style_labels_are_accepted(tmp_path):
    path = write(tmp_path, "\ufeffpath,crack,inactive\n\na.png,1.0,0.0\nb.png,0,1\n\n")
    table = read_labels_csv(path)
    assert table.targets.tolist() == [[1, 0], [0, 1]]
    assert table.positives.dtype == np.int64


def test_group_column_is_not_a_label(tmp_path):
    path = write(tmp_path, "path;type;crack\na.png;mono;1\nb.png;poly;0\n")
    table = read_labels_csv(path, group="type")
    assert table.names == ["crack"]
    assert table.groups == ["mono", "poly"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("\n\n", "empty"),
        ("path;crack\n", "no rows"),
        ("path\na.png\n", "only one column"),
        ("a.png;1;0\nb.png;0;1\n", "header"),
        ("path;crack;inactive\na.png;1;2\n", "line 2: label 'inactive' is '2'"),
        ("path;crack;inactive\na.png;1;0\nb.png;yes;0\n", "line 3: label 'crack' is 'yes'"),
        ("path;crack;inactive\na.png;1;0\nb.png;1\n", "line 3: 2 fields"),
        ("path;crack\n;1\n", "line 2: empty image path"),
        ("path;crack;crack\na.png;1;0\n", "duplicate column"),
        # blank lines still count, so the line named is the one an editor shows
        ("path;crack\n\na.png;1\n\nb.png;yes\n", "line 5: label 'crack' is 'yes'"),
        ("path;crack;\na.png;1;\n", "header column 3 has no name in 'path;crack;' (a ';' at the end"),
        ("path;;crack\na.png;1;0\n", "header column 2 has no name in 'path;;crack'"),
        (";;\n", "empty"),
        ("path;type;crack\na.png;mono;1\n", "pass --group type"),
        ('path;crack\n"a\nb.png";1\nc.png;yes\n', "line 4: label 'crack' is 'yes'; labels must be 0 or 1"),
        # the same image twice could be trained on and tested on
        ("path;crack\na.png;1\nb.png;0\n./a.png;0\n", "line 4: image './a.png' is listed again (first on line 2)"),
        # no path column: the first column's labels are not file names
        ("crack;inactive\n1;0\n0;1\n", "line 2: the image path column 'crack' holds '1'; put the image paths"),
    ],
)
def test_bad_csv_gives_one_clear_message_naming_file_and_row(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        read_labels_csv(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_csv_and_unknown_group(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_labels_csv(tmp_path / "nope.csv")
    path = write(tmp_path, "path;crack\na.png;1\n")
    with pytest.raises(DataError, match="no column 'type'"):
        read_labels_csv(path, group="type")


def test_elpv_table_is_the_real_data_set(elpv):
    assert len(elpv) == 2624
    assert elpv.names == ["defective"]
    assert np.allclose(np.unique(elpv.targets), [0, 1 / 3, 2 / 3, 1], atol=1e-3)
    assert set(elpv.groups) == {"mono", "poly"}
    assert all(p.is_file() for p in elpv.paths[:20])
    assert load_table("elpv").names == ["defective"]


def test_subset_keeps_rows_aligned(elpv):
    sub = elpv.subset(np.array([5, 1]))
    assert sub.paths == [elpv.paths[5], elpv.paths[1]]
    assert sub.groups == [elpv.groups[5], elpv.groups[1]]
    assert np.array_equal(sub.targets, elpv.targets[[5, 1]])


@pytest.mark.parametrize("value", ["yes", "2"])
def test_group_hint_only_for_names(tmp_path, value):
    """'--group' helps for a column of names such as 'mono'; not for a yes or a 2 (a blank is unknown)."""
    path = write(tmp_path, f"path;crack\na.png;{value}\n")
    with pytest.raises(DataError) as err:
        read_labels_csv(path)
    assert "labels must be 0 or 1" in str(err.value) and "--group" not in str(err.value)


def test_soft_labels_are_read_as_given_and_positive_from_one_half(tmp_path):
    """ELPV's expert probabilities (and a run's own val.csv of them) are labels too."""
    path = write(tmp_path, "path;defective\na.png;0.333333\nb.png;0.666667\nc.png;1\nd.png;0\n")
    table = read_labels_csv(path)
    np.testing.assert_allclose(table.targets[:, 0], [0.333333, 0.666667, 1, 0], rtol=1e-6)
    assert table.positives[:, 0].tolist() == [0, 1, 1, 0]
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(DataError, match=f"label 'defective' is '{bad}'; labels must be 0 or 1, or a soft"):
            read_labels_csv(write(tmp_path, f"path;defective\na.png;{bad}\n"))


def test_an_empty_value_is_unknown_for_that_label_only(tmp_path):
    path = write(tmp_path, "path;crack;inactive\na.png;1;\nb.png; ;0\nc.png;0;1\nd.png;0.75;0\n")
    table = read_labels_csv(path)
    assert np.isnan(table.targets[0, 1]) and np.isnan(table.targets[1, 0])
    assert table.targets.dtype == np.float32 and np.isnan(table.targets).sum() == 2
    assert table.known.tolist() == [[True, False], [False, True], [True, True], [True, True]]
    # 0 where unknown, so `positive.astype(bool)` never takes an unknown for a defect
    assert table.positives.tolist() == [[1, 0], [0, 0], [0, 1], [1, 0]]
    assert table.strata.tolist() == [[1, -1], [-1, 0], [0, 1], [1, 0]]  # unknown apart from 0
    sub = table.subset(np.array([1, 2]))
    assert sub.known.tolist() == [[False, True], [True, True]]


def test_elpv_has_no_unknown_labels(elpv):
    assert elpv.known.all() and np.array_equal(elpv.strata, elpv.positives)


@pytest.mark.parametrize("group", [None, "type"])
def test_a_row_with_every_label_empty_names_its_file_and_line(tmp_path, group):
    """A row with no known label teaches nothing: most likely a row left unfinished."""
    type_column = ";type" if group else ""
    mono = ";mono" if group else ""
    path = write(tmp_path, f"path;crack;inactive{type_column}\na.png;1;0{mono}\n\nb.png;;{mono}\n")
    with pytest.raises(DataError) as err:
        read_labels_csv(path, group=group)
    assert f"{path} line 4: every label of 'b.png' is empty (unknown)" in str(err.value)


def _table(strata: list[tuple[float, ...]], counts: list[int]) -> LabelTable:
    targets = np.repeat(np.array(strata, dtype=np.float32), counts, axis=0)
    return LabelTable([Path(f"c{i}.png") for i in range(len(targets))], ["crack", "inactive"], targets)


def test_split_and_limit_keep_unknowns_stratified_apart_from_negatives():
    """Unknowns spread over the splits in proportion, as their own stratum: were
    they counted as negatives, val could get all of them and no scorable cell."""
    nan = np.nan
    table = _table([(0, 0), (nan, 0), (1, nan), (1, 1), (nan, 1)], [100, 50, 30, 10, 10])
    split = stratified_split(table, val_fraction=0.2, seed=0, test_fraction=0.1)
    for stratum in map(tuple, np.unique(table.strata, axis=0)):
        members = (table.strata == stratum).all(axis=1)
        for part, fraction in (("val", 0.2), ("test", 0.1)):
            assert abs((split[members] == part).sum() - fraction * members.sum()) <= 1, (stratum, part)
    small = limit_table(table, 40, seed=0)
    assert len(small) == 40
    assert np.isnan(small.targets[:, 0]).sum() == pytest.approx(60 * 40 / 200, abs=1)
    assert np.isnan(small.targets[:, 1]).sum() == pytest.approx(30 * 40 / 200, abs=1)


def test_windows_backslashes_and_tab_separated_lists_are_understood(tmp_path):
    from elcell.cells.inputs import collect_inputs

    (tmp_path / "cells").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "cells" / "a.png")
    with pytest.raises(DataError, match=r"line 2: 'cells.*a\.png' uses \\ between folders; write / instead"):
        read_labels_csv(write(tmp_path, "path;crack\ncells\\a.png;1\n"))
    with pytest.raises(DataError, match="between folders"):
        collect_inputs([write(tmp_path, "path;crack\ncells\\a.png;1\n", "list.csv")])
    listed = write(tmp_path, "path\tcrack\ncells/a.png\t1\n", "list.tsv")
    assert collect_inputs([listed]) == [tmp_path / "cells" / "a.png"]  # a .tsv is a list, not an image
