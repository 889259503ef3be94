"""Which cells a person should look at first. Torch-free; one function for the
station's review queue and `elcell segment --model`, in two orders:

`check` (the station's default: an operator checks the line's decisions).
Most uncertain first: a cell's uncertainty is its distance to the nearest
threshold across labels, in log-odds (a crack at 0.47 against a threshold of
0.5 is 0.12 away, one at 0.99 is 4.6 away), so cells the model could have
decided either way come before those it is sure about, whichever label they
are borderline for. Log-odds rather than probability so that a threshold of
0.05 has as wide a borderline as one of 0.5. A share of the places (every
1/share-th) goes to a cell drawn at random among those decided `ok`: the
uncertainty order alone never shows a confident miss, and answers on random
`ok` cells estimate how many cracks the line lets through.

`teach` (labelling cells to fine-tune on, `train --from`). Places alternate
between the most likely defects (highest probability, each label in turn, so a
rare label gets its share) and the cells nearest 0.5 in log-odds, the boundary
the loss trains, with the same random share. Uncertainty about a recall-first
threshold is the wrong guide here: such thresholds sit near 0.005, so the
cells near them are intact ones, and a model new to a line learns from its
defects and from the look-alikes it scores high (docs/adaptation.md measures
both orders against random choice).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ORDERS = ("check", "teach")
UNCERTAIN_MARGIN = 2.0  # log-odds: within it a cell is borderline (0.12..0.88 around a threshold of 0.5)
EPS = 1e-6


@dataclass(frozen=True)
class Choice:
    """One place in the order: the cell's index, its margin and why it is there."""

    index: int
    margin: float  # log-odds to the nearest threshold (small: uncertain)
    random: bool
    reason: str


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def margins(probs: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per cell ([N, L] probabilities), the log-odds distance to the nearest
    threshold across labels [N] and which label that is [N]."""
    distance = np.abs(_logit(np.atleast_2d(probs)) - _logit(np.asarray(thresholds))[None, :])
    nearest = distance.argmin(axis=1)
    return distance[np.arange(len(distance)), nearest], nearest


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: one of {', '.join(ORDERS)}")
    return order


def boundary(probs: Sequence[float]) -> float:
    """Log-odds from 0.5 of a cell's least certain label (plain floats: the
    station's queue asks this of every waiting cell under its lock)."""
    return min(abs(math.log(p / (1 - p))) for p in (min(max(float(q), EPS), 1 - EPS) for q in probs))


def teach_reason(probs: Sequence[float], labels: Sequence[str], likely: int | None) -> str:
    """Why the `teach` order chose a cell: as the most likely `likely` defect
    left (said to be likely only from 0.5: an operator reads "likely" as the
    model's answer), or as the cell nearest 0.5."""
    if likely is not None:
        p = float(probs[likely])
        return f"highest {labels[likely]} left: {p:.2f}" + (", likely" if p >= 0.5 else ", though unlikely")
    j = min(range(len(labels)), key=lambda k: boundary([probs[k]]))
    return f"nearest 0.5: {labels[j]} {float(probs[j]):.2f}"


def reason(probs: Sequence[float], thresholds: Sequence[float], labels: Sequence[str], random: bool,
           flagged: bool = False) -> str:
    """Why the `check` order (or the random share) chose a cell, in words the page shows."""
    if random:
        return "random check of an ok cell"
    margin, nearest = margins(np.asarray(probs, dtype=np.float64)[None], thresholds)
    j = int(nearest[0])
    said = f"{labels[j]} {float(probs[j]):.2f}"
    if margin[0] < UNCERTAIN_MARGIN:
        return f"uncertain: {said} near {float(thresholds[j]):.2f}"
    flagged_labels = [f"{label} {float(p):.2f}" for label, p, t in zip(labels, probs, thresholds, strict=True)
                      if p >= t]
    if flagged and flagged_labels:
        return "flagged: " + ", ".join(flagged_labels)
    return f"{'flagged' if flagged else 'sure'}: {said}, threshold {float(thresholds[j]):.2f}"


def random_turn(position: int, share: float) -> bool:
    """Whether place `position` (0, 1, ...) of the order goes to a random `ok`
    cell: every 1/share-th place, spread evenly (share 0.1: places 9, 19, ...)."""
    if share <= 0:
        return False
    return math.floor((position + 1) * share + 1e-9) > math.floor(position * share + 1e-9)


def review_order(probs: np.ndarray, thresholds: Sequence[float], ok: np.ndarray, labels: Sequence[str],
                 random_share: float = 0.0, seed: int = 0, order: str = "check") -> list[Choice]:
    """Every cell once, in the order a person should look at them (`order`: see
    the module's doc), every 1/random_share-th place a cell drawn at random among
    the `ok` ones ([N] bool). Deterministic for a seed."""
    check_order(order)
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    margin, _ = margins(probs, thresholds)
    ok = np.asarray(ok, dtype=bool)
    rng = np.random.default_rng(seed)
    drawn = deque(int(i) for i in rng.permutation(np.flatnonzero(ok))) if random_share > 0 else deque()
    centre = [0.5] * probs.shape[1] if order == "teach" else thresholds
    by_margin = deque(int(i) for i in np.argsort(margins(probs, centre)[0], kind="stable"))
    # teach: each label's cells, most likely first; the labels take turns
    likely = [deque(int(i) for i in np.argsort(-probs[:, j], kind="stable")) for j in range(probs.shape[1])]
    taken: set[int] = set()

    def first_untaken(line: deque) -> int | None:
        while line and line[0] in taken:
            line.popleft()
        return line.popleft() if line else None

    chosen: list[Choice] = []
    taught = 0  # places not drawn at random: in teach, even ones go to a likely defect
    while len(chosen) < len(probs):
        index = first_untaken(drawn) if random_turn(len(chosen), random_share) else None
        random = index is not None
        label = None
        if index is None and order == "teach" and taught % 2 == 0:
            label = (taught // 2) % probs.shape[1]
            index = first_untaken(likely[label])
        index = first_untaken(by_margin) if index is None else index
        taken.add(index)
        taught += not random
        why = teach_reason(probs[index], labels, label) if order == "teach" and not random else \
            reason(probs[index], thresholds, labels, random, not ok[index])
        chosen.append(Choice(index, float(margin[index]), random, why))
    return chosen
