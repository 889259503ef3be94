"""Output files: names that do not clash, and one policy for existing outputs."""

from __future__ import annotations

from elcell.io import unique_names


def test_unique_names_only_disambiguate_clashes(tmp_path):
    names = unique_names([tmp_path / "a" / "cell 1.png", tmp_path / "b" / "cell 1.png",
                          tmp_path / "cell2.tif"])
    assert names[2] == "cell2"
    assert names[0] != names[1] and all(n.startswith("cell_1_") for n in names[:2])


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    import pytest

    from elcell.errors import DataError
    from elcell.io import output_mode

    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(DataError, match=r"notes\.txt is a file, not a folder"):
        output_mode(tmp_path / "notes.txt" / "deeper" / "out.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="--int8-out .*folder is a folder; name the file"):
        output_mode(tmp_path / "folder", "--int8-out", file=True)
    assert output_mode(tmp_path / "new" / "out.csv") == "new"  # folders to be made are fine
