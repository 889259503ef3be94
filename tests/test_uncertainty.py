"""The order in which reviewed cells teach a model most: nearest a threshold first."""

from __future__ import annotations

import numpy as np
import pytest

from elcell.judging.uncertainty import uncertainty, uncertainty_order


def test_a_cell_is_as_uncertain_as_its_least_certain_label_in_log_odds():
    thresholds = [0.5, 0.05]  # a recall-first threshold far below 0.5
    probs = np.array([[0.90, 0.01],   # sure on both
                      [0.97, 0.07],   # near inactive's threshold: 0.07 is about as near 0.05 as 0.59 is to 0.5
                      [0.45, 0.50],   # crack 0.45 nearer 0.5 than any
                      [np.nan, np.nan]])  # unreadable: last
    assert uncertainty_order(probs, thresholds).tolist() == [2, 1, 0, 3]
    # in plain distance inactive 0.07 - 0.05 = 0.02 would come first; in log-odds it is 0.36
    assert uncertainty(probs, thresholds)[1] == pytest.approx(-abs(np.log(0.07 / 0.93) - np.log(0.05 / 0.95)))
    with pytest.raises(ValueError, match="2 labels"):
        uncertainty(probs[:, :1], thresholds)


def test_real_cells_are_ordered_by_their_distance_from_the_models_thresholds(model, seed_csv):
    from elcell.cells.labels import load_table
    from elcell.infer.runtime import score_files

    table = load_table(seed_csv)
    probs = np.concatenate([b.probs for b in score_files(model, table.paths)])
    order = uncertainty_order(probs, model.info.thresholds)
    assert sorted(order.tolist()) == list(range(len(table)))
    logit = np.log(probs / (1 - probs)) - np.log(np.asarray(model.info.thresholds) / (1 - np.asarray(model.info.thresholds)))
    nearest = np.abs(logit).min(axis=1)
    assert np.all(np.diff(nearest[order]) >= -1e-9)  # each next cell is at least as sure
