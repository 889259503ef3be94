"""Splits, the memory-mapped image cache, and batches."""

import shutil
from collections import Counter

import numpy as np
import pytest

import elcell.training.data as data
from elcell.cells.images import Decoding, load_cell
from elcell.cells.labels import read_labels_csv
from elcell.errors import DataError
from elcell.training.data import (
    CachedCells,
    build_cache,
    cache_key,
    check_labels,
    pixel_stats,
    pos_weights,
    stratified_split,
    write_split_csv,
)


def test_split_is_stratified_by_label_combination_and_group(elpv):
    split = stratified_split(elpv, val_fraction=0.1, seed=0)
    assert set(split) == {"train", "val"}
    strata = [(tuple(p), g) for p, g in zip(elpv.positives, elpv.groups)]
    total, in_val = Counter(strata), Counter(s for s, part in zip(strata, split) if part == "val")
    for stratum, count in total.items():
        assert abs(in_val[stratum] - 0.1 * count) <= 1, stratum
    assert abs((split == "val").mean() - 0.1) < 0.01


def test_split_is_reproducible_and_depends_on_the_seed(elpv):
    a = stratified_split(elpv, 0.1, seed=1)
    assert np.array_equal(a, stratified_split(elpv, 0.1, seed=1))
    assert not np.array_equal(a, stratified_split(elpv, 0.1, seed=2))


def test_test_fraction_makes_a_third_disjoint_part(elpv):
    split = stratified_split(elpv, 0.1, seed=0, test_fraction=0.25)
    assert abs((split == "test").mean() - 0.25) < 0.01
    assert abs((split == "val").mean() - 0.1) < 0.01


def test_tiny_sets_still_get_a_validation_cell(elpv):
    split = stratified_split(elpv.subset(np.arange(6)), 0.1, seed=0)
    assert (split == "val").sum() >= 1
    with pytest.raises(DataError, match="too few"):
        stratified_split(elpv.subset(np.arange(1)), 0.1, seed=0)
    with pytest.raises(DataError, match="val-fraction"):
        stratified_split(elpv, 1.5, seed=0)


def test_split_csv_lists_every_cell_and_the_held_out_ones_in_the_training_format(tmp_path, elpv):
    table = elpv.subset(np.arange(10))
    split = stratified_split(table, 0.2, seed=0)
    write_split_csv(tmp_path, table, split)
    lines = (tmp_path / "split.csv").read_text().splitlines()
    assert lines[0] == "path;split;defective"
    assert len(lines) == 11 and {line.split(";")[1] for line in lines[1:]} == {"train", "val"}
    val = (tmp_path / "val.csv").read_text().splitlines()
    assert val[0] == "path;defective" and not (tmp_path / "test.csv").exists()
    held_out = [line.split(";") for line in lines[1:] if line.split(";")[1] == "val"]
    assert [row.split(";") for row in val[1:]] == [[path, target] for path, _, target in held_out]


def test_split_csv_writes_unknown_labels_empty_and_they_read_back_unknown(tmp_path):
    lines = ["path;crack;inactive"] + [f"c{i}.png;{'' if i % 4 == 0 else i % 2};{'' if i % 4 == 1 else 0.5}"
                                       for i in range(24)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    table = read_labels_csv(tmp_path / "data.csv")
    assert 0 < np.isnan(table.targets).sum() < table.targets.size
    split = stratified_split(table, 0.25, seed=0, test_fraction=0.25)
    run = tmp_path / "run"
    run.mkdir()
    write_split_csv(run, table, split)
    text = (run / "split.csv").read_text()
    assert "nan" not in text and f"{table.paths[0]};{split[0]};;0.5\n" in text
    for part in ("val", "test"):
        again = read_labels_csv(run / f"{part}.csv")
        rows = np.flatnonzero(split == part)
        assert again.paths == [table.paths[i].resolve() for i in rows]
        np.testing.assert_array_equal(again.targets, table.targets[rows])  # NaN where it was NaN


def test_pos_weights_count_only_known_cells():
    nan = np.nan
    targets = np.array([[1, nan], [0, 0], [0, 1], [nan, 0], [nan, 0], [0.5, nan]], dtype=np.float32)
    # crack: 4 known, 1.5 positive -> 2.5 / 1.5; inactive: 4 known, 1 positive -> 3 / 1
    assert pos_weights(targets) == pytest.approx([2.5 / 1.5, 3.0])
    assert pos_weights(targets, "none") == [1.0, 1.0]
    assert pos_weights(targets, "sqrt") == pytest.approx([(2.5 / 1.5) ** 0.5, 3.0 ** 0.5])


def test_check_labels_counts_known_train_cells_and_refuses_a_label_no_train_cell_knows(tmp_path):
    def table_of(rows: list[str]):
        (tmp_path / "data.csv").write_text("path;crack;inactive\n" + "\n".join(rows) + "\n")
        return read_labels_csv(tmp_path / "data.csv")

    split = np.array(["train"] * 4 + ["val"])
    check_labels(table_of(["a.png;1;", "b.png;0;1", "c.png;1;0", "d.png;0;", "e.png;1;1"]), split)
    every = table_of(["a.png;1;1", "b.png;0;", "c.png;1;", "d.png;0;1", "e.png;1;0"])
    with pytest.raises(DataError, match="'inactive' is positive on every train cell \\(2 train cells with a known"):
        check_labels(every, split)
    nobody = table_of(["a.png;1;", "b.png;0;", "c.png;1;", "d.png;0;", "e.png;1;1"])
    with pytest.raises(DataError, match="label 'inactive' is unknown \\(empty\\) on all 4 train cells"):
        check_labels(nobody, split)


@pytest.fixture
def cells(tmp_path, elpv):
    folder = tmp_path / "cells"
    folder.mkdir()
    paths = []
    for src in elpv.paths[:12]:
        paths.append(folder / src.name)
        shutil.copy(src, paths[-1])
    return paths


def test_cache_decodes_once_and_is_reused(tmp_path, cells):
    cache = tmp_path / "cache"
    first = build_cache(cells, Decoding(32), cache, workers=2, progress=False)
    assert isinstance(first, np.memmap) and first.shape == (12, 32, 32)
    assert np.array_equal(first[3], load_cell(cells[3], Decoding(32)))
    stored = sorted(cache.glob("*.npy"))
    assert len(stored) == 1
    mtime = stored[0].stat().st_mtime_ns
    second = build_cache(cells, Decoding(32), cache, progress=False)
    assert np.array_equal(first, second)
    assert sorted(cache.glob("*.npy")) == stored and stored[0].stat().st_mtime_ns == mtime


def test_cache_is_invalidated_when_an_image_or_the_size_changes(tmp_path, cells):
    cache = tmp_path / "cache"
    before = np.array(build_cache(cells, Decoding(32), cache, progress=False))
    shutil.copy(cells[0], cells[5])  # image 5 now has other content
    after = build_cache(cells, Decoding(32), cache, progress=False)
    assert np.array_equal(after[5], after[0]) and not np.array_equal(after[5], before[5])
    build_cache(cells, Decoding(48), cache, progress=False)
    assert len(list(cache.glob("*.npy"))) == 3


def test_min_shrink_has_its_own_cache_and_bilinear_keeps_the_old_key(tmp_path, cells):
    cache = tmp_path / "cache"
    plain = build_cache(cells, Decoding(32), cache, progress=False)
    kept = build_cache(cells, Decoding(32, shrink="min"), cache, workers=2, progress=False)
    assert len(list(cache.glob("*.npy"))) == 2
    assert np.array_equal(kept[7], load_cell(cells[7], Decoding(32, "min"))) and not np.array_equal(kept[7], plain[7])
    # caches built before --shrink existed are still found (the key of these 12 cells then)
    assert cache_key(cells, Decoding(32)) == "22128496ab6b5b32557d1a8336871761" != cache_key(cells, Decoding(32, "min"))


def test_bad_images_stop_the_build_naming_the_files(tmp_path, cells):
    cells[4].write_bytes(b"corrupt")
    with pytest.raises(DataError, match=rf"1 image\(s\) cannot be used:\n  {cells[4]}"):
        build_cache(cells, Decoding(32), tmp_path / "cache", progress=False)
    # every missing file is named at once, so one run shows all that need fixing
    gone = [tmp_path / f"gone{i}.png" for i in range(12)]
    with pytest.raises(DataError) as err:
        build_cache([*cells, *gone], Decoding(32), tmp_path / "cache", progress=False)
    assert str(err.value).startswith("13 image(s) cannot be used:")  # the 12, and the corrupt one
    assert f"{gone[0]}: image file not found\n  {gone[1]}: image file not found" in str(err.value)
    assert str(err.value).endswith("... and 3 more")
    with pytest.raises(DataError) as err:  # a file that is no image is named with the missing ones
        build_cache([*cells, gone[0]], Decoding(32), tmp_path / "cache", progress=False)
    assert str(err.value).startswith("2 image(s) cannot be used:") and f"{cells[4]}: not a readable image" \
        in str(err.value)


class _InlinePool:
    """Stands in for ProcessPoolExecutor: runs chunks in-process and records them."""

    jobs: list = []
    interrupt_after: int | None = None

    def __init__(self, max_workers):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        for n, job in enumerate(jobs):
            if self.interrupt_after is not None and n == self.interrupt_after:
                raise KeyboardInterrupt
            _InlinePool.jobs.append(job[0])
            yield fn(job)


def test_interrupted_build_resumes_where_it_stopped(tmp_path, cells, monkeypatch):
    monkeypatch.setattr(data, "ProcessPoolExecutor", _InlinePool)
    cache = tmp_path / "cache"
    _InlinePool.jobs, _InlinePool.interrupt_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        build_cache(cells, Decoding(32), cache, chunk=4, progress=False)
    assert _InlinePool.jobs == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not list(cache.glob("????????????????????????????????.npy"))  # no final file yet

    _InlinePool.jobs, _InlinePool.interrupt_after = [], None
    images = build_cache(cells, Decoding(32), cache, chunk=4, progress=False)
    assert _InlinePool.jobs == [[8, 9, 10, 11]]  # only the missing chunk was decoded
    assert np.array_equal(images, np.stack([load_cell(p, Decoding(32)) for p in cells]))
    assert not list(cache.glob("*.partial.npy")) and not list(cache.glob("*.done.npy"))


def test_pixel_stats_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 8, 8), dtype=np.uint8)
    index = np.arange(0, 50, 3)
    mean, std = pixel_stats(images, index, chunk=4)
    expected = images[index].astype(np.float64) / 255
    assert mean == pytest.approx(expected.mean()) and std == pytest.approx(expected.std())


def test_cached_cells_fetch_whole_batches():
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    targets = np.eye(5, 2, dtype=np.float32)
    dataset = CachedCells(images, targets, index=np.array([4, 2, 0]))
    batch, y = dataset.__getitems__([0, 2])
    assert batch.shape == (2, 1, 4, 4) and batch.dtype.is_floating_point is False
    assert np.array_equal(batch[:, 0].numpy(), images[[4, 0]])
    assert y.tolist() == [[0, 0], [1, 0]]
    assert len(dataset) == 3 and dataset[1][0].shape == (1, 4, 4)
