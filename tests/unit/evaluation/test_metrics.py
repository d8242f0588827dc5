"""``compute_metrics`` against sklearn on the same predictions (property-based, with hypothesis).

Random labels and probabilities, with classes absent from the labels, a single predicted
class, and ties in the scores (probabilities drawn from a few levels, so equal values are
common): every figure must equal what sklearn computes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from jewelclf.evaluation.metrics import compute_metrics

NAMES = [f"c{i}" for i in range(8)]


@st.composite
def predictions(draw):
    n_classes = draw(st.integers(2, 8))
    n = draw(st.integers(1, 40))
    # Labels drawn from a subset of the classes: some classes are absent from the labels.
    label_pool = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=n_classes, unique=True))
    y = np.array(draw(st.lists(st.sampled_from(label_pool), min_size=n, max_size=n)))
    # Scores from four levels: ties within a row are frequent.
    levels = draw(st.sampled_from([(0.0, 0.25, 0.5, 1.0), (0.1, 0.1, 0.2, 0.3)]))
    raw = np.array(draw(st.lists(st.lists(st.sampled_from(levels), min_size=n_classes, max_size=n_classes),
                                 min_size=n, max_size=n)), dtype=float)
    if draw(st.booleans()):  # one class predicted for every image
        raw[:, draw(st.integers(0, n_classes - 1))] += 5.0
    k = draw(st.integers(1, n_classes))
    return y, raw, n_classes, k


@settings(max_examples=300, deadline=None)
@given(predictions())
def test_compute_metrics_equals_sklearn(case):
    y, probs, n_classes, k = case
    names = NAMES[:n_classes]
    m = compute_metrics(y, probs, names, top_k=k)
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert m["macro_precision"] == pytest.approx(p)
    assert m["macro_recall"] == pytest.approx(r)
    assert m["macro_f1"] == pytest.approx(f)
    labels = list(range(n_classes))
    pc, rc, fc, sc = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    assert list(m["per_class"]) == names
    for i, name in enumerate(names):
        assert m["per_class"][name] == pytest.approx(
            {"precision": pc[i], "recall": rc[i], "f1": fc[i], "support": sc[i]})
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    if n_classes > 2:  # sklearn's binary top-k takes one score column; jewelclf has one per class
        assert m["top_k_accuracy"] == pytest.approx(
            top_k_accuracy_score(y, probs, k=k, labels=labels))


def test_predicted_class_absent_from_the_labels_counts_in_the_macro_average():
    # The example: 4 classes, the labels hold 3, one image is taken for the fourth.
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 3])
    probs = np.eye(4)[pred]
    m = compute_metrics(y, probs, NAMES[:4])
    assert m["macro_precision"] == pytest.approx(0.75)
    assert m["macro_classes"] == 4
    assert m["per_class"]["c3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_top_k_is_not_top_1():
    y = np.array([1, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]])
    m = compute_metrics(y, probs, NAMES[:3], top_k=2)
    assert m["accuracy"] == 0.0 and m["top_k_accuracy"] == 0.5


def test_top_k_ties_rank_the_higher_class_first_as_sklearn_does():
    y = np.array([1, 2])
    probs = np.array([[0.4, 0.4, 0.2], [0.3, 0.3, 0.3]])
    m = compute_metrics(y, probs, NAMES[:3], top_k=1)
    assert m["top_k_accuracy"] == top_k_accuracy_score(y, probs, k=1, labels=[0, 1, 2]) == 1.0
