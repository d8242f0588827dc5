"""``class_weights`` equals sklearn's ``compute_class_weight("balanced")`` (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from jewelclf.data.prepare import class_weights
from jewelclf.data.sources import Record

NAMES = ["bracelet", "earring", "necklace", "ring"]


def _train(counts):
    return [Record(f"/d/{c}/{i}.jpg", f"{c}/{i}.jpg", c) for c, n in zip(NAMES, counts) for i in range(n)]


@pytest.mark.parametrize("counts", [(40, 10, 5, 25), (3, 30, 30, 30), (100, 1, 7, 50)])
def test_balanced_weights_equal_sklearn(counts):
    train = _train(counts)
    weights = class_weights(train, NAMES, "balanced", log=lambda _: None)
    labels = np.array([NAMES.index(r.label) for r in train])
    expected = compute_class_weight("balanced", classes=np.arange(len(NAMES)), y=labels)
    np.testing.assert_allclose([weights[i] for i in range(len(NAMES))], expected, rtol=1e-12)
    # each class then carries the same total weight: the rare class is weighted up
    totals = [weights[i] * n for i, n in enumerate(counts)]
    np.testing.assert_allclose(totals, totals[0])
    assert weights[int(np.argmin(counts))] == max(weights.values())


def test_auto_weights_only_past_one_and_a_half_to_one():
    assert class_weights(_train((15, 10, 12, 11)), NAMES, "auto", log=lambda _: None) is None
    assert class_weights(_train((16, 10, 12, 11)), NAMES, "auto", log=lambda _: None) is not None
    assert class_weights(_train((40, 10, 5, 25)), NAMES, "none", log=lambda _: None) is None
