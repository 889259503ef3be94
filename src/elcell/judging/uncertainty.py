"""Which cells a person should label first: those the model is least sure of.

A cell is as uncertain as its least certain label, and a label as uncertain as
its probability is near the label's decision threshold, measured in log-odds:
0.02 against a threshold of 0.05 is as near as 0.29 against 0.5 (thresholds
chosen for recall sit far from 0.5, where plain distances would call every
`ok` cell sure). Torch-free. The review queue of the station orders its cells
its own way (with a random share of `ok` cells); this is the plain order the
adaptation experiment compares with random choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def uncertainty(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """float [N]: per cell, minus the smallest log-odds distance of a label's
    probability from its threshold (higher = less sure); -inf for a cell
    without a finite probability."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(thresholds):
        raise ValueError(f"probs {probs.shape} must be [cells, {len(thresholds)} labels]")
    distance = np.abs(_logit(probs) - _logit(np.asarray(thresholds, dtype=np.float64)))
    nearest = np.min(np.where(np.isfinite(probs), distance, np.inf), axis=1)
    return -nearest


def uncertainty_order(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """int [N]: the cells' indices, most uncertain first (ties in input order)."""
    return np.argsort(-uncertainty(probs, thresholds), kind="stable")
