"""Decoding cells: bit depths, colour, sizes, and broken files."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from elcell.cells.images import (
    Decoding,
    find_images,
    load_cell,
    min_filter,
    min_filter_size,
    read_pixels,
    to_uint8,
)
from elcell.errors import ImageError


def test_8bit_gray_is_read_as_is(tmp_path, elpv):
    cell = load_cell(elpv.paths[0], Decoding(300))
    assert cell.dtype == np.uint8 and cell.shape == (300, 300)
    assert np.array_equal(cell, np.asarray(Image.open(elpv.paths[0])))


def test_16bit_is_scaled_by_its_real_depth_not_255(tmp_path):
    values = np.array([[0, 257 * 100], [257 * 200, 65535]] * 8, dtype=np.uint16).reshape(16, 2)
    values = np.tile(values, (1, 8))  # 16 x 16
    path = tmp_path / "cell16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    cell = load_cell(path, Decoding(16))
    assert cell[0, :2].tolist() == [0, 100]
    assert cell[1, :2].tolist() == [200, 255]


def test_16bit_file_holding_12bit_data_is_named_once(tmp_path, monkeypatch, capsys):
    """A 12-bit camera's values read as 0..65535 keep 17 grey levels (0..16): the user is told, once."""
    import elcell.cells.images

    monkeypatch.setattr(elcell.cells.images, "_warned_low_range", False)
    paths = []
    for name, top in (("full.png", 65535), ("twelve_bit.png", 4095), ("another.png", 4000)):
        paths.append(tmp_path / name)
        Image.fromarray(np.linspace(0, top, 256, dtype=np.uint16).reshape(16, 16)).save(paths[-1])
    load_cell(paths[0], Decoding(16))
    assert capsys.readouterr().err == ""
    for path in paths[1:]:
        load_cell(path, Decoding(16))
    err = capsys.readouterr().err
    assert err.startswith(f"elcell: warning: {paths[1]}: 16-bit image whose largest value is 4095")
    assert "17 grey levels" in err and "train with --bit-depth (at least 12 for this image" in err and err.count("\n") == 1


def test_bit_depth_reads_a_12bit_camera_over_the_full_grey_range(tmp_path, elpv, monkeypatch, capsys):
    """The 8-bit ELPV cell stored as 12-bit values (0..4095) in a 16-bit PNG is read
    back exactly with bit_depth=12, without a warning; values above 4095 are refused."""
    import elcell.cells.images

    monkeypatch.setattr(elcell.cells.images, "_warned_low_range", False)
    original = np.asarray(Image.open(elpv.paths[0]))
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(np.round(original * (4095 / 255)).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(load_cell(path, Decoding(300, bit_depth=12)), original)
    assert np.array_equal(load_cell(path, Decoding(128, "min", bit_depth=12)), load_cell(elpv.paths[0], Decoding(128, "min")))
    assert capsys.readouterr().err == ""
    assert load_cell(path, Decoding(300)).max() <= 16  # read as 0..65535: the few grey levels warned about
    Image.fromarray(np.full((16, 16), 4096, dtype=np.uint16)).save(path)
    with pytest.raises(ImageError, match=f"{path}: 16-bit image with values up to 4096, above 0..4095"):
        load_cell(path, Decoding(16, bit_depth=12))
    with pytest.raises(ValueError, match="bit depth 17"):
        load_cell(path, Decoding(16, bit_depth=17))


def test_deep_images_reach_8_bits_with_no_float64_copy(tmp_path, elpv):
    """16-bit values (a real cell's, scaled to the depths a camera stores) map to 8
    bits as round(v * 255 / top) did in float64, without a float64 temporary: the
    largest allocation is the uint8 result (a 4900 x 4900 16-bit image would need
    190 MB for one). Float images stay float32, as Pillow holds them."""
    import tracemalloc

    cell = read_pixels(elpv.paths[0]).astype(np.uint16)
    for depth in (16, 14, 12):
        values = np.round(cell * ((2**depth - 1) / 255)).astype(np.uint16)
        values[0, 0] = 2**depth - 1  # the top of the range is used, so no low-range warning
        reference = np.round(values.astype(np.float64) * (255.0 / (2**depth - 1))).astype(np.uint8)
        np.testing.assert_array_equal(to_uint8(values, depth), reference)
    large = np.tile(values, (8, 8))  # 2400 x 2400
    tracemalloc.start()
    try:
        to_uint8(large, 12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * large.size, peak  # uint8 result (1 byte a pixel); float64 would be 8
    Image.fromarray(cell.astype(np.float32) / 255, mode="F").save(tmp_path / "f.tif")
    floats = read_pixels(tmp_path / "f.tif")
    assert floats.dtype == np.float32 and np.array_equal(to_uint8(floats), read_pixels(elpv.paths[0]))


def test_rgb_becomes_gray(tmp_path):
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., :] = (90, 90, 90)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    cell = load_cell(path, Decoding(32))
    assert cell.shape == (32, 32) and int(cell.mean()) == 90


def test_odd_sizes_are_resized(tmp_path):
    path = tmp_path / "odd.png"
    Image.fromarray(np.full((301, 287), 77, dtype=np.uint8)).save(path)
    cell = load_cell(path, Decoding(64))
    assert cell.shape == (64, 64) and (cell == 77).all()


def cracked_cell_png(folder, height: int = 300, width: int | None = None):
    """A flat cell (200) with a dark vertical crack (60) one pixel wide, as a PNG."""
    cell = np.full((height, width or height), 200, dtype=np.uint8)
    cell[:, cell.shape[1] // 2 + 1] = 60
    path = folder / f"cell{height}x{width or height}.png"
    Image.fromarray(cell).save(path)
    return path


def test_min_shrink_keeps_a_thin_crack_dark_and_flat_areas_unchanged(tmp_path):
    path = cracked_cell_png(tmp_path)
    plain, kept = load_cell(path, Decoding(128)), load_cell(path, Decoding(128, shrink="min"))
    assert [min_filter_size(side, 128) for side in (255, 256, 300, 511, 512)] == [1, 3, 3, 3, 5]
    assert plain.min() > 130  # bilinear shrinking averages the crack away to less than half its depth
    assert kept.min() < 100  # about 80: the widened crack keeps most of its depth
    assert (kept[:, :50] == 200).all() and (plain[:, :50] == 200).all()  # flat areas as before
    # a cell cut a little off square is filtered by its shorter side's factor
    assert load_cell(cracked_cell_png(tmp_path, 300, 280), Decoding(128, shrink="min")).min() < 100


def test_min_shrink_is_pils_min_filter_then_bilinear(tmp_path, elpv):
    """The decoding E47/E48 were measured with (PIL's MinFilter), to the byte."""
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (301, 287), dtype=np.uint8)).save(odd)
    for path, size in [(p, 128) for p in elpv.paths[:5]] + [(elpv.paths[5], 64), (odd, 128), (odd, 60)]:
        with Image.open(path) as image:
            width = min_filter_size(min(image.size), size)
            expected = image.filter(ImageFilter.MinFilter(width)).resize((size, size), Image.BILINEAR)
        assert width > 1 and np.array_equal(load_cell(path, Decoding(size, shrink="min")), np.asarray(expected))


def numpy_min_filter(gray: np.ndarray, width: int) -> np.ndarray:
    """The hand-written separable minimum cv2.erode replaced: edges replicated."""
    height, wide = gray.shape
    padded = np.pad(gray, width // 2, mode="edge")
    rows = padded[:, :wide].copy()
    for shift in range(1, width):
        np.minimum(rows, padded[:, shift : shift + wide], out=rows)
    out = rows[:height].copy()
    for shift in range(1, width):
        np.minimum(out, rows[shift : shift + height], out=out)
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_min_filter_is_the_hand_written_minimum_it_replaced(dtype):
    rng = np.random.default_rng(3)
    for shape, width in [((301, 287), 3), ((64, 90), 5), ((40, 33), 7), ((20, 20), 1), ((5, 9), 3)]:
        gray = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
        ours = min_filter(gray, width)
        assert ours.dtype == dtype and np.array_equal(ours, numpy_min_filter(gray, width))


@pytest.mark.parametrize("height", [100, 128, 200, 255])
def test_min_shrink_is_bilinear_where_a_cell_does_not_shrink_twofold(tmp_path, height):
    path = cracked_cell_png(tmp_path, height)  # enlarged, as is, and shrunk less than twofold: no filter
    assert np.array_equal(load_cell(path, Decoding(128, shrink="min")), load_cell(path, Decoding(128)))


def test_unknown_shrink_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shrink 'nearest'"):
        load_cell(cracked_cell_png(tmp_path), Decoding(128, shrink="nearest"))


@pytest.mark.parametrize("content", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        load_cell(path, Decoding(64))


def test_an_icon_is_not_read_whatever_its_name(tmp_path):
    """ICO embeds an image that Pillow decodes while opening, before any header
    check could see its size: a format elcell does not read, under any suffix."""
    icon = Image.fromarray(np.full((64, 64), 128, dtype=np.uint8))
    icon.save(tmp_path / "cell.ico", sizes=[(64, 64)])
    (tmp_path / "cell.png").write_bytes((tmp_path / "cell.ico").read_bytes())
    for name in ("cell.ico", "cell.png"):
        with pytest.raises(ImageError, match=f"{name}: not a readable image"):
            load_cell(tmp_path / name, Decoding(64))


def test_truncated_png_is_rejected(tmp_path, elpv):
    data = elpv.paths[0].read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_cell(path, Decoding(64))


def test_missing_and_tiny_files(tmp_path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        load_cell(tmp_path / "missing.png", Decoding(64))
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match="at least 8x8"):
        load_cell(tmp_path / "tiny.png", Decoding(64))


def test_find_images_walks_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.TIF", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path / "a"])
    assert [p.name for p in found] == ["1.png", "2.TIF"]
