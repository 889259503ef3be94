"""Metrics and threshold tuning, against scikit-learn and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from elcell.metrics import threshold_for_f1, threshold_for_recall


def test_threshold_search_is_exact():
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = np.array([1, 0, 1, 1, 0])
    # recall 1 needs the cell at 0.6: threshold halfway to the next lower cell
    assert threshold_for_recall(positive, probs, 1.0) == pytest.approx(0.55)
    assert threshold_for_recall(positive, probs, 0.6) == pytest.approx(0.65)  # 2 of 3
    assert threshold_for_recall(positive, probs, 0.2) == pytest.approx(0.85)
    # F1: top 4 cells -> 2*3 / (3 + 1 + 3) = 0.857, the best cut
    assert threshold_for_f1(positive, probs) == pytest.approx(0.55)
    # ties stay on one side of the threshold
    tied = np.array([0.7, 0.7, 0.7, 0.2])
    assert threshold_for_f1(np.array([1, 0, 1, 0]), tied) == pytest.approx(0.45)
    assert threshold_for_recall(np.array([1, 0, 1, 0]), tied, 0.5) == pytest.approx(0.45)
