"""Augmentation statistics: flip rates, jitter ranges, normalisation."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from elcell.training.augment import (
    BatchAugment,
    SyntheticCracks,
    _branch,
    _brownian_bridge,
    _busbars_horizontal,
    _coverage,
    _crack_coordinates,
    _finger_interruptions,
    _offset,
    _realistic_cracks,
    normalise,
)

# PyTorch on one thread (conftest.one_thread): no OpenMP stalls on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_flip_happens_with_probability_04():
    torch.manual_seed(0)
    n = 4000
    image = torch.zeros(1, 1, 2, 2)
    image[0, 0, 0, 0] = 1.0  # marks the top-left corner
    out = BatchAugment(flip_p=0.4, brightness=0, contrast=0)(image.repeat(n, 1, 1, 1))
    corner = out[:, 0].flatten(1).argmax(1)  # 0 none, 1 h-flip, 2 v-flip, 3 both
    horizontal = ((corner == 1) | (corner == 3)).float().mean().item()
    vertical = ((corner == 2) | (corner == 3)).float().mean().item()
    assert horizontal == pytest.approx(0.4, abs=0.03)
    assert vertical == pytest.approx(0.4, abs=0.03)
    assert ((corner == 3).float().mean().item()) == pytest.approx(0.16, abs=0.03)  # independent


def test_brightness_jitter_scales_each_image_within_range():
    torch.manual_seed(0)
    images = torch.full((2000, 1, 4, 4), 0.5)
    out = BatchAugment(flip_p=0, brightness=0.2, contrast=0)(images)
    factors = out.mean((1, 2, 3)) / 0.5
    assert factors.min() >= 0.8 - 1e-5 and factors.max() <= 1.2 + 1e-5
    assert factors.std() > 0.1  # drawn per image, roughly uniform (std of U(0.8,1.2) = 0.115)


def test_contrast_jitter_keeps_the_mean_and_scales_spread():
    torch.manual_seed(0)
    images = torch.tensor([0.4, 0.6]).repeat(8).view(1, 1, 4, 4).repeat(500, 1, 1, 1)
    out = BatchAugment(flip_p=0, brightness=0, contrast=0.3)(images)
    assert torch.allclose(out.mean((1, 2, 3)), torch.full((500,), 0.5), atol=1e-5)
    spread = (out.amax((1, 2, 3)) - out.amin((1, 2, 3))) / 0.2
    assert spread.min() >= 0.7 - 1e-4 and spread.max() <= 1.3 + 1e-4


def test_output_stays_in_unit_range_and_normalise_standardises():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 16, 16)
    out = BatchAugment()(images)
    assert out.min() >= 0 and out.max() <= 1 and out.shape == images.shape
    z = normalise(images, images.mean().item(), images.std().item())
    assert z.mean().abs() < 1e-5 and (z.std() - 1).abs() < 1e-3


def test_rotate90_turns_each_cell_exactly_by_a_uniform_quarter():
    torch.manual_seed(0)
    image = torch.arange(9.0).view(1, 1, 3, 3)
    out = BatchAugment(flip_p=0, brightness=0, contrast=0, rotate90=True)(image.repeat(2000, 1, 1, 1))
    turns = [torch.rot90(image[0], k, dims=(-2, -1)) for k in range(4)]
    matches = torch.stack([(out == t).flatten(1).all(1) for t in turns], 1)
    assert matches.sum(1).eq(1).all()  # every output is exactly one rotation, no resampling
    share = matches.float().mean(0)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.03)


def test_small_affine_moves_content_without_black_borders():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 32, 32) * 0.5 + 0.25  # no pixel near 0
    out = BatchAugment(flip_p=0, brightness=0, contrast=0, affine_degrees=5, affine_translate=0.05,
                       affine_scale=0.1)(images)
    assert out.shape == images.shape
    assert (out - images).abs().mean() > 0.01  # it did move
    assert out.min() >= 0.25 - 1e-4  # border padding: no zero-filled corners


def test_synthetic_cracks_mark_clean_cells_only_with_a_thin_line_from_edge_to_edge():
    torch.manual_seed(0)
    images = torch.full((64, 1, 96, 96), 0.6)
    targets = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1 / 3, 1.0], [2 / 3, 0.0]]).repeat(16, 1)
    out, marked = SyntheticCracks(p=1.0, label=0)(images, targets)
    clean = targets[:, 0] < 0.5
    assert torch.equal(marked[clean, 0], torch.ones(32)) and torch.equal(marked[~clean], targets[~clean])
    assert torch.equal(marked[:, 1], targets[:, 1])  # other labels untouched
    assert torch.equal(out[~clean], images[~clean]) and (out <= images).all()
    darker = out[clean, 0] < 0.6 - 0.15 * 0.6 * 0.5  # at least half the weakest depth
    for line in darker:
        ys, xs = torch.nonzero(line, as_tuple=True)
        assert 8 <= len(ys) <= 6 * 96  # a line about a pixel wide, not a blob
        sides = {"top": (ys == 0).any(), "bottom": (ys == 95).any(), "left": (xs == 0).any(),
                 "right": (xs == 95).any()}
        assert sum(map(bool, sides.values())) >= 2  # from one side of the cell to another


@pytest.mark.parametrize("shape", ["line", "realistic"])
def test_synthetic_cracks_with_p_0_3_mark_about_that_share_of_clean_cells(shape):
    torch.manual_seed(0)
    _, marked = SyntheticCracks(p=0.3, label=0, shape=shape)(torch.full((2000, 1, 16, 16), 0.5),
                                                              torch.zeros(2000, 1))
    assert marked.mean().item() == pytest.approx(0.3, abs=0.035)  # 3.4 standard deviations


@pytest.mark.parametrize("shape", ["realistic", "realistic+branches"])
def test_realistic_cracks_are_thin_lines_and_some_cut_off_a_dark_area_marked_inactive(shape):
    torch.manual_seed(0)
    images = torch.full((400, 1, 96, 96), 0.6)
    targets = torch.zeros(400, 2)  # crack, inactive
    targets[:100, 0] = 1.0  # already cracked: left alone
    out, marked = SyntheticCracks(p=1.0, label=0, shape=shape, inactive_label=1)(images, targets)
    assert torch.equal(out[:100], images[:100]) and torch.equal(marked[:100], targets[:100])
    assert torch.equal(marked[100:, 0], torch.ones(300)) and (out <= images).all()
    inactive = marked[100:, 1] == 1
    assert inactive.float().mean().item() == pytest.approx(0.4, abs=0.08)
    darkened = (out[100:, 0] < 0.6 * 0.95).flatten(1).float().mean(1)  # share of each cell darker by 5 %+
    # cracks alone: one to three lines up to 2 pixels wide (3 with anti-aliasing) across a 96-pixel cell
    assert (darkened[~inactive] > 0).all() and (darkened[~inactive] < 3 * 3 * 96 * 2 ** 0.5 / 96 ** 2).all()
    # a cut-off area, darkened by 30 %+: the smaller part (at most half the cell, plus the cracks),
    # and at least the corner cut by a line through a point 15 % in from two edges (4.5 % of the cell)
    area = (out[100:, 0] < 0.6 * 0.72).flatten(1).float().mean(1)
    assert (area[inactive] > 0.04).all() and (darkened[inactive] < 0.6).all()
    assert area[inactive].median() > 5 * darkened[~inactive].median()


def test_crack_coordinates_are_along_and_across_the_jagged_line():
    angle, centre = torch.tensor([[0.0, torch.pi / 2]]), torch.tensor([[[10.0, 20.0], [5.0, 7.0]]])
    along, side = _crack_coordinates(angle, centre, torch.zeros(1, 2, 64), height=30, width=40)
    ys, xs = torch.meshgrid(torch.arange(30.0), torch.arange(40.0), indexing="ij")
    assert torch.allclose(along[0, 0], xs.flatten() - 10) and torch.allclose(side[0, 0], ys.flatten() - 20)
    assert torch.allclose(along[0, 1], ys.flatten() - 7, atol=1e-5)  # cos(pi / 2) is not exactly 0
    assert torch.allclose(side[0, 1], 5 - xs.flatten(), atol=1e-5)
    torch.manual_seed(0)
    bridge = 3.0 * _brownian_bridge((1, 2), 64, "cpu")
    _, jagged = _crack_coordinates(angle, centre, bridge, height=30, width=40)
    moved = (jagged - side).abs()
    assert moved.max() <= 3.0 + 1e-5 and moved.mean() > 0.2  # displaced across, by at most the wiggle


@pytest.mark.slow
def test_a_crack_network_is_one_piece_whose_branch_ends_inside_the_cell():
    def draw(max_cracks):
        torch.manual_seed(0)
        shade, _ = _realistic_cracks(1000, 96, 96, "cpu", max_cracks=max_cracks, inactive_share=0.0,
                                     branching=1.0)
        return (shade < 0.95).numpy()

    network, first_crack = draw(max_cracks=2), draw(max_cracks=1)
    pieces = np.array([ndimage.label(cell, structure=np.ones((3, 3)))[1] for cell in network])
    assert (pieces == 1).mean() > 0.97  # the branch starts on the first crack
    border = np.concatenate([network[:, 0, :], network[:, 1:, -1], network[:, -1, -2::-1],
                             network[:, -2:0:-1, 0]], axis=1)  # the edge pixels, once round the cell
    touches = (border & ~np.roll(border, 1, axis=1)).sum(1)  # separate runs of dark edge pixels
    # the first crack meets the edge at both ends; the branch mostly ends inside, and
    # runs off the cell (a third run) in the others
    assert 0.5 < (touches == 2).mean() < 0.75
    assert (touches >= 2).all()
    # every network has a branch: 15-60 % of the cell size, next to a crack across it
    assert 1.15 < network.sum() / first_crack.sum() < 1.4


def test_branches_start_on_the_crack_before_them_turned_by_a_diagonal_or_a_fork_angle():
    torch.manual_seed(0)
    n, height, width = 500, 96, 96
    angle = torch.rand(n, 3) * torch.pi
    centre = torch.rand(n, 3, 2) * 95
    bridge = 3.0 * _brownian_bridge((n, 3), 64, "cpu")
    network, new_angle, new_centre, new_bridge, length = _branch(angle, centre, bridge, 0.5, height, width)
    assert network.float().mean().item() == pytest.approx(0.5, abs=0.07)
    kept = ~network
    assert torch.equal(new_angle[kept], angle[kept]) and torch.equal(new_centre[kept], centre[kept])
    assert torch.equal(new_bridge[kept], bridge[kept]) and torch.equal(new_bridge[:, 0], bridge[:, 0])
    zero = torch.zeros(n, 1, 1)
    for k in (1, 2):
        parent = k - 1
        delta = new_centre[network, k] - new_centre[network, parent]  # from the parent's centre to the start
        cos, sin = new_angle[network, parent].cos(), new_angle[network, parent].sin()
        along, across = delta[:, 0] * cos + delta[:, 1] * sin, delta[:, 1] * cos - delta[:, 0] * sin
        parent_offset = _offset(new_bridge[network, parent:k], along[:, None, None], height, width)[:, 0, 0]
        assert torch.allclose(across, parent_offset, atol=1e-3)  # the start lies on the jagged parent
        if parent == 0:  # within 30 % of the cell of the first crack's centre
            assert (along.abs() <= 0.3 * 96 * 0.8 + 1e-3).all()
        else:  # 10-90 % along the parent branch
            share = along / length[network, parent]
            assert (share >= 0.1 - 1e-4).all() and (share <= 0.9 + 1e-4).all()
        own_start = _offset(new_bridge[network, k:k + 1], zero[network], height, width)
        assert torch.allclose(own_start, torch.zeros_like(own_start), atol=1e-5)  # no jump at the start
        turn = torch.rad2deg(new_angle[network, k] - new_angle[network, parent]).abs()
        assert (((turn >= 20 - 1e-3) & (turn <= 70 + 1e-3)) | ((turn >= 80 - 1e-3) & (turn <= 100 + 1e-3))).all()
        assert ((turn >= 80 - 1e-3).float().mean() - 0.5).abs() < 0.1
    assert ((length >= 0.15 * 96 - 1e-3) & (length <= 0.6 * 96 + 1e-3)).all()


@pytest.mark.parametrize("half_width", [0.5, 0.75, 1.0])
def test_a_thin_crack_covers_its_full_width_wherever_it_falls_between_pixel_centres(half_width):
    rows = torch.arange(20.0)[:, None]
    for centre in torch.linspace(5, 6, 11):  # a horizontal crack at y = centre: the side is y - centre
        assert _coverage(rows - centre, torch.tensor(half_width)).sum() == pytest.approx(2 * half_width)


def test_brownian_bridge_starts_and_ends_at_zero_with_unit_largest_excursion():
    torch.manual_seed(0)
    bridge = _brownian_bridge((50, 3), steps=64, device="cpu")
    assert bridge.shape == (50, 3, 64)
    assert torch.all(bridge[..., 0] == 0) and torch.allclose(bridge[..., -1], torch.zeros(50, 3), atol=1e-6)
    assert torch.allclose(bridge.abs().amax(-1), torch.ones(50, 3))


def _cells_with_busbars(n: int, size: int = 96) -> torch.Tensor:
    cells = torch.full((n, size, size), 0.6)
    cells[:, [size // 4, size // 2, 3 * size // 4]] = 0.2  # three horizontal busbars
    return cells


@pytest.mark.slow
def test_realistic_cracks_with_fingers_draw_finger_interruptions_in_a_third_never_marked_inactive():
    torch.manual_seed(0)
    images = _cells_with_busbars(600)[:, None]
    out, marked = SyntheticCracks(p=1.0, label=0, shape="realistic+fingers", inactive_label=1)(
        images, torch.zeros(600, 2))
    assert torch.equal(marked[:, 0], torch.ones(600))
    dark = out[:, 0] < images[:, 0] * 0.95
    # finger streaks stay within short runs of columns; a crack or a cut-off area spans rows and columns
    streaks_only = (dark.sum(1) <= 0.3 * 96 + 2).all(1) & (dark.any(1).sum(1) <= 24)
    assert streaks_only.float().mean().item() == pytest.approx(1 / 3, abs=0.06)
    assert not marked[streaks_only, 1].any()  # a broken finger is no inactive area
    assert marked[~streaks_only, 1].mean().item() == pytest.approx(0.4, abs=0.08)


def test_realistic_cracks_without_an_inactive_label_mark_only_the_crack_label():
    torch.manual_seed(0)
    _, marked = SyntheticCracks(p=1.0, label=0, shape="realistic")(torch.full((64, 1, 32, 32), 0.5),
                                                                    torch.zeros(64, 2))
    assert torch.equal(marked[:, 0], torch.ones(64)) and torch.equal(marked[:, 1], torch.zeros(64))
    with pytest.raises(ValueError, match="crack shape 'wavy'"):
        SyntheticCracks(p=1.0, label=0, shape="wavy")


def test_busbars_are_found_horizontal_in_elpv_cells_and_vertical_once_turned(elpv):
    from elcell.cells.images import Decoding, load_cell

    cells = torch.stack([torch.from_numpy(load_cell(path, Decoding(128))).float() / 255
                         for path in elpv.paths[::300]])  # mono and poly cells
    assert _busbars_horizontal(cells).all()
    assert not _busbars_horizontal(cells.transpose(-2, -1)).any()
    # strong shading along the busbars (a cell darker at one end) must not outweigh them
    shaded = _cells_with_busbars(2) * torch.linspace(0.1, 1.0, 96)
    assert _busbars_horizontal(shaded).all() and not _busbars_horizontal(shaded.transpose(-2, -1)).any()
    assert _busbars_horizontal(torch.rand(3, 8, 8)).shape == (3,)  # too small for a margin: no crash


@pytest.mark.parametrize("turned", [False, True])
def test_finger_interruptions_are_short_thin_streaks_across_the_busbars(turned):
    torch.manual_seed(0)
    cells = _cells_with_busbars(200)
    if turned:
        cells = cells.transpose(-2, -1)
    shade = _finger_interruptions(cells)
    assert shade.shape == cells.shape and (shade <= 1).all() and (shade >= 0.5 ** 8).all()
    dark = shade < 1 - 0.05  # the faintest streak darkens its nearest pixel by 0.15 * 0.4
    if turned:
        dark = dark.transpose(-2, -1)  # streaks now run along the rows: look at them as columns
    assert dark.flatten(1).any(1).all()  # every cell got at least one streak
    columns, rows = dark.any(1).sum(1), dark.sum(1)  # per cell: columns touched; dark pixels per column
    assert (columns <= 8 * 3).all()  # at most eight streaks, each at most 3 pixels wide (anti-aliased)
    assert (columns > 3).any()  # and more than one in some cells
    with pytest.raises(ValueError, match="square cells"):
        _finger_interruptions(torch.rand(2, 32, 48))
    streak_lengths = rows[rows > 0].float()  # two spread streaks can share a column: rarely longer
    assert (streak_lengths > 0.3 * 96 + 2).float().mean() < 0.02 and streak_lengths.median() > 0.05 * 96


def _elpv_batch(elpv, count: int = 8, size: int = 160) -> torch.Tensor:
    from elcell.cells.images import Decoding, load_cell

    cells = np.stack([load_cell(p, Decoding(size)) for p in elpv.paths[:count]])
    return torch.from_numpy(cells).float().div(255.0)[:, None]


def test_module_path_distorts_real_cells_but_keeps_them_recognisable(elpv):
    from elcell.training.linepath import ModulePath

    torch.manual_seed(0)
    cells = _elpv_batch(elpv)
    assert torch.equal(ModulePath(0.0)(cells), cells)
    out = ModulePath(1.0)(cells)
    assert out.shape == cells.shape and out.min() >= 0 and out.max() <= 1
    for before, after in zip(cells, out):
        change = (after - before).abs().mean()
        r = np.corrcoef(before.flatten().numpy(), after.flatten().numpy())[0, 1]
        assert change > 0.005 and r > 0.5, (float(change), r)  # distorted, still the same cell


def test_module_path_lights_cells_unevenly_and_resamples_them(elpv):
    import kornia.augmentation as K

    from elcell.training.linepath import NativeResolution

    flat = torch.full((16, 1, 160, 160), 0.5)
    lit = K.RandomLinearIllumination(gain=(0.05, 0.3), p=1.0)(flat)
    # a gradient across each cell: one side brighter than the other, by rows or by columns
    rows, cols = lit.mean(dim=3)[:, 0], lit.mean(dim=2)[:, 0]
    spread = torch.maximum(rows.max(1).values - rows.min(1).values, cols.max(1).values - cols.min(1).values)
    assert (spread > 0.02).all()
    stripes = torch.zeros(4, 1, 160, 160)
    stripes[..., ::2] = 1.0  # one-pixel detail that a camera with fewer pixels cannot keep
    resampled = NativeResolution(1.0)(stripes)
    assert (resampled[..., 1:] - resampled[..., :-1]).abs().mean() < 0.9
    small = torch.rand(2, 1, 128, 128)  # at or below the lowest native size: nothing to resample
    assert torch.equal(NativeResolution(1.0)(small), small)


def test_module_path_adds_no_weights_to_a_checkpoint():
    from elcell.training.lightning_module import ELCellModule

    def keys(p):
        return set(ELCellModule("resnet18", ["crack"], 0.5, 0.2, [1.0], module_path=p).state_dict())

    assert keys(0.5) == keys(0.0)
