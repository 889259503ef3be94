"""Output files: names that do not clash, and one policy for existing outputs."""

from __future__ import annotations

from elcell.io import unique_names


def test_unique_names_only_disambiguate_clashes(tmp_path):
    names = unique_names([tmp_path / "a" / "cell 1.png", tmp_path / "b" / "cell 1.png",
                          tmp_path / "cell2.tif"])
    assert names[2] == "cell2"
    assert names[0] != names[1] and all(n.startswith("cell_1_") for n in names[:2])
