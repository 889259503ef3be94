"""The int8 recall guard's evidence and the warning for int8 models that
saturate on CPUs without VNNI (no model needed)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import elcell.infer.runtime as runtime
from elcell.infer.quantize import lost_and_gained, recall_drops, unguarded


def _runs(lost: int, gained: int, kept: int):
    """float and int8 scores of positives: `lost` only float catches, `gained` only int8."""
    float_probs = np.array([0.9] * lost + [0.1] * gained + [0.9] * kept)[:, None]
    int8_probs = np.array([0.1] * lost + [0.9] * gained + [0.9] * kept)[:, None]
    positives = np.ones_like(float_probs, dtype=np.int64)
    known = np.ones_like(positives, dtype=bool)
    return (SimpleNamespace(positives=positives, probs=float_probs, known=known),
            SimpleNamespace(positives=positives, probs=int8_probs, known=known))


@pytest.mark.parametrize(("lost", "gained", "kept", "refused"), [
    (1, 0, 15, False),  # 0.06 of recall on 16 positives, but one cell: chance (p = 0.5)
    (6, 0, 54, True),  # six lost, none gained: p = 1/64
    (6, 5, 49, False),  # as many gained as lost: no evidence
])
def test_a_recall_drop_refuses_only_beyond_chance(lost, gained, kept, refused):
    a, b = _runs(lost, gained, kept)
    counts = lost_and_gained(a, b, 0, threshold=0.5)
    assert (counts["positives_lost"], counts["positives_gained"]) == (lost, gained)
    positives = lost + gained + kept
    comparison = {"per_label": {"inactive": {"positives": positives, "recall_drop": (lost - gained) / positives,
                                             **counts}}}
    assert bool(recall_drops(comparison)) == refused


def test_a_check_set_too_small_to_refuse_anything_is_named():
    # 4 positives, all lost by int8, none gained: p = 1/16, not beyond chance; the guard is blind there
    a, b = _runs(lost=4, gained=0, kept=0)
    few = {"positives": 4, "recall_drop": 1.0, **lost_and_gained(a, b, 0, threshold=0.5)}
    a, b = _runs(lost=5, gained=0, kept=0)
    enough = {"positives": 5, "recall_drop": 1.0, **lost_and_gained(a, b, 0, threshold=0.5)}
    comparison = {"per_label": {"inactive": few, "crack": enough}}
    assert not recall_drops({"per_label": {"inactive": few}}) and recall_drops({"per_label": {"crack": enough}})
    assert unguarded(comparison) == ["inactive"]


@pytest.mark.parametrize(("vnni", "reduce_range", "warned"), [(False, False, True), (True, False, False),
                                                              (False, True, False), (None, False, False)])
def test_an_old_int8_model_on_a_cpu_without_vnni_is_warned_about(monkeypatch, vnni, reduce_range, warned):
    monkeypatch.setattr(runtime, "has_vnni", lambda: vnni)
    quantization = {"format": "QDQ", **({"reduce_range": True} if reduce_range else {})}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.warn_saturating_int8(SimpleNamespace(extra={"quantization": quantization}), "old.int8.onnx")
    assert [("without VNNI" in str(w.message)) for w in caught] == ([True] if warned else [])
