"""Do heatmaps point at the defect? The measures themselves, and a model trained
here to find drawn cracks, its heatmaps taken from the exported ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from elcell.cells.images import Decoding, load_cell
from elcell.cli import main
from elcell.infer.localisation import (
    SYMMETRIES,
    border_share,
    consistency,
    mask_on_grid,
    peaks,
    pointing_game,
    widen,
)
from elcell.infer.runtime import open_model, score_cells
from elcell.training.augment import _realistic_cracks


def test_a_map_with_no_evidence_has_no_peak_not_the_top_left_corner():
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[1, 2, 3] = 1.0
    assert peaks(maps).tolist() == [[-1, -1], [2, 3], [-1, -1]]


def test_pointing_game_counts_a_peak_within_one_feature_cell_of_the_drawing():
    masks = np.zeros((3, 40, 40), dtype=bool)
    masks[:, 5, 5] = True  # a drawn pixel in feature cell (0, 0) of a 4 x 4 map
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[0, 1, 1] = 1  # one cell away: a hit
    maps[1, 3, 3] = 1  # far: a miss
    game = pointing_game(maps, masks)  # map 2 is all zero: a miss, counted as no peak
    assert game.hits == pytest.approx(1 / 3) and game.no_peak == pytest.approx(1 / 3)
    assert game.chance == pytest.approx(4 / 16)  # cells (0..1, 0..1) of 16 count as hits
    assert mask_on_grid(masks, (4, 4))[0].sum() == 1 and widen(mask_on_grid(masks, (4, 4)))[0].sum() == 4


def test_consistency_follows_the_peak_through_each_symmetry():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 6, 6)).astype(np.float32)
    turned = {name: np.ascontiguousarray(turn(maps)) for name, turn in SYMMETRIES.items()}
    assert consistency(maps, turned) == dict.fromkeys(SYMMETRIES, 1.0)  # an equivariant map
    corner = np.zeros((5, 8, 8), dtype=np.float32)
    corner[:, 0, 2] = 1  # every peak on the top border, off its middle and diagonals...
    frozen = dict.fromkeys(SYMMETRIES, corner)  # ...and staying there whatever the cell does
    assert max(consistency(corner, frozen).values()) == 0.0


def test_border_share_against_the_borders_area():
    maps = np.zeros((4, 5, 5), dtype=np.float32)
    maps[0, 0, 0] = maps[1, 2, 2] = maps[2, 4, 1] = maps[3, 3, 3] = 1
    share, area = border_share(maps)
    assert share == pytest.approx(0.5) and area == pytest.approx(16 / 25)


def drawn(cells: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    shade, _ = _realistic_cracks(len(cells), cells.shape[1], cells.shape[2], "cpu")
    cracked = np.clip(cells * shade.numpy(), 0, 255).round().astype(np.uint8)
    return cracked, shade.numpy() < 0.9


@pytest.mark.slow
def test_a_model_that_learnt_drawn_cracks_points_at_them_and_its_map_turns_with_the_cell(elpv, tmp_path):
    """EfficientNet-Lite0 from its ImageNet weights, fine-tuned briefly to tell clean
    ELPV cells from the same kind of cells with cracks drawn on them; then, through
    the exported ONNX model, on cells and cracks it never saw."""
    size = 97
    clean = np.flatnonzero(elpv.targets[:, 0] == 0)
    cells = np.stack([load_cell(elpv.paths[i], Decoding(size)) for i in clean[:360]]).astype(np.float32)
    cracked, _ = drawn(cells[:120], seed=1)
    (tmp_path / "cells").mkdir()
    lines = ["path;crack"]
    for k, (image, label) in enumerate([(c, 1) for c in cracked] + [(c.astype(np.uint8), 0) for c in cells[120:240]]):
        Image.fromarray(image).save(tmp_path / "cells" / f"{k}.png")
        lines.append(f"cells/{k}.png;{label}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    assert main(["train", "--recipe", "spec", "--data", str(tmp_path / "data.csv"), "--out", str(tmp_path / "run"),
                 "--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--image-size", str(size),
                 "--epochs", "4", "--lr", "1e-3", "--optimizer", "adamw", "--schedule", "cosine",
                 "--rotate90", "--batch-size", "24", "--val-fraction", "0.15", "--no-progress"]) == 0
    model = open_model(tmp_path / "run")
    assert model.info.extra["heatmap"] == {"method": "layercam", "stride": 8, "views": 8, "graph_views": 1,
                                              "coarse": {"method": "layercam", "stride": 32}}
    unseen, masks = drawn(cells[240:], seed=2)  # other cells, other cracks
    scores = score_cells(model, unseen, heatmaps=True)
    assert scores.heatmaps.shape[2:] == (13, 13)  # at least as fine as 97 / 8
    game = pointing_game(scores.heatmaps[:, 0], masks)
    assert game.hits >= 0.8 and game.hits >= game.chance + 0.25 and game.no_peak <= 0.05
    coarse = score_cells(model, unseen, heatmaps=True, map_views=1, map_detail="coarse")  # a module map's
    np.testing.assert_allclose(coarse.probs, scores.probs, atol=1e-6)
    assert coarse.heatmaps.shape[2:] == (4, 4)  # 97 / 32
    game = pointing_game(coarse.heatmaps[:, 0], masks)
    assert game.hits >= 0.8 and game.hits > game.chance and game.no_peak <= 0.05, game
    flagged = unseen[scores.decisions[:, 0] != "ok"]
    assert len(flagged) >= 0.6 * len(unseen)
    maps = score_cells(model, flagged, heatmaps=True).heatmaps[:, 0]
    turned = {name: score_cells(model, np.ascontiguousarray(turn(flagged)), heatmaps=True).heatmaps[:, 0]
              for name, turn in SYMMETRIES.items()}
    assert min(consistency(maps, turned).values()) >= 0.9
    share, area = border_share(maps)
    assert share <= 1.5 * area  # cracks drawn from edge to edge reach the border; no pull beyond that
    found = peaks(maps)
    side = maps.shape[-1] - 1
    for corner in ((0, 0), (0, side), (side, 0), (side, side)):  # today's maps: 69 % on the top-left one
        assert (found == corner).all(axis=1).mean() <= 0.1, corner
