"""Collecting inputs (files, folders, CSVs, patterns) and decoding them in threads."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from elcell.cells.images import Decoding, find_images
from elcell.cells.inputs import collect_inputs, decode_batches
from elcell.errors import DataError


def test_decoding_streams_with_bounded_look_ahead(elpv):
    pulled = 0

    def paths():
        nonlocal pulled
        for path in itertools.islice(itertools.cycle(elpv.paths[:20]), 400):
            pulled += 1
            yield path

    batches = decode_batches(paths(), Decoding(32), batch_size=8, workers=2)
    first = next(batches)
    assert first.images.shape == (8, 32, 32) and first.images.dtype == np.uint8
    assert pulled <= (2 + 2) * 8 + 8  # a few batches ahead, not the whole list
    assert sum(len(b.paths) for b in batches) == 400 - 8
    serial = next(decode_batches(elpv.paths[:20], Decoding(32), batch_size=8, workers=0))
    np.testing.assert_array_equal(serial.images, first.images)  # same cells, same order


def test_collect_inputs(cell_folder, seed_csv, tmp_path, monkeypatch):
    listed = tmp_path / "list.csv"
    listed.write_text("image\ncells/a.png\n")
    paths = collect_inputs([cell_folder, seed_csv, listed, cell_folder])
    assert len(paths) == 12 + 64 + 1  # each once
    assert paths[-1] == tmp_path.resolve() / "cells" / "a.png"
    # the same file named relatively and absolutely is still one cell
    monkeypatch.chdir(tmp_path)
    first = sorted(cell_folder.glob("*.png"))[0]
    assert collect_inputs([cell_folder, Path("cells") / first.name, str(first)]) == find_images([cell_folder])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        collect_inputs([empty])
    # a pattern no shell expanded (Windows); one that matches nothing is named
    assert collect_inputs([str(cell_folder / "*.png")]) == sorted(cell_folder.glob("*.png"))
    with pytest.raises(DataError, match=r"\*\.tif: no such file or folder"):
        collect_inputs([str(cell_folder / "*.tif")])
