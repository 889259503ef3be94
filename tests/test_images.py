"""Decoding cells: bit depths, colour, sizes, and broken files."""

import numpy as np
import pytest
from PIL import Image

from elcell.errors import ImageError
from elcell.images import find_images, load_cell


def test_8bit_gray_is_read_as_is(tmp_path, elpv):
    cell = load_cell(elpv.paths[0], 300)
    assert cell.dtype == np.uint8 and cell.shape == (300, 300)
    assert np.array_equal(cell, np.asarray(Image.open(elpv.paths[0])))


def test_16bit_is_scaled_by_its_real_depth_not_255(tmp_path):
    values = np.array([[0, 257 * 100], [257 * 200, 65535]] * 8, dtype=np.uint16).reshape(16, 2)
    values = np.tile(values, (1, 8))  # 16 x 16
    path = tmp_path / "cell16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    cell = load_cell(path, 16)
    assert cell[0, :2].tolist() == [0, 100]
    assert cell[1, :2].tolist() == [200, 255]


def test_rgb_becomes_gray(tmp_path):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., :] = (90, 90, 90)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    cell = load_cell(path, 32)
    assert cell.shape == (32, 32) and int(cell.mean()) == 90


def test_odd_sizes_are_resized(tmp_path):
    path = tmp_path / "odd.png"
    Image.fromarray(np.full((301, 287), 77, dtype=np.uint8)).save(path)
    cell = load_cell(path, 64)
    assert cell.shape == (64, 64) and (cell == 77).all()


@pytest.mark.parametrize("content", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        load_cell(path, 64)


def test_truncated_png_is_rejected(tmp_path, elpv):
    data = elpv.paths[0].read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_cell(path, 64)


def test_missing_and_tiny_files(tmp_path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        load_cell(tmp_path / "missing.png", 64)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match="at least 8x8"):
        load_cell(tmp_path / "tiny.png", 64)


def test_find_images_walks_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.TIF", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path / "a"])
    assert [p.name for p in found] == ["1.png", "2.TIF"]
