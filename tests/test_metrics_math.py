"""Classification metrics from a confusion matrix (rows = true, columns = predicted), checked by hand."""

from __future__ import annotations

import pytest

from kubetune.train.evaluate import classification_metrics

LABELS = ["a", "b", "c"]


def test_macro_metrics_on_an_imbalanced_confusion_matrix() -> None:
    # 100 examples: class a dominates; b and c are small and often confused. Micro (accuracy) and macro differ.
    confusion = [
        [80, 5, 5],  # a: recall 80/90
        [2, 3, 1],   # b: recall 3/6
        [1, 2, 1],   # c: recall 1/4
    ]
    m = classification_metrics(confusion, LABELS)
    precision = [80 / 83, 3 / 10, 1 / 7]
    recall = [80 / 90, 3 / 6, 1 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert m["accuracy"] == pytest.approx(84 / 100)
    assert m["precision"] == pytest.approx(sum(precision) / 3)
    assert m["recall"] == pytest.approx(sum(recall) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["f1"] == pytest.approx(0.4939, abs=1e-4)  # far below the accuracy: macro weighs the small classes
    assert m["confusion_matrix"] == confusion


def test_macro_metrics_skip_classes_absent_from_truth_and_predictions() -> None:
    perfect_without_c = [[5, 0, 0], [0, 3, 0], [0, 0, 0]]
    m = classification_metrics(perfect_without_c, LABELS)
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0)

    # A class only predicted (never true) still counts: its precision is 0.
    predicted_c = [[4, 0, 1], [0, 3, 0], [0, 0, 0]]
    m = classification_metrics(predicted_c, LABELS)
    assert m["precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["recall"] == pytest.approx((4 / 5 + 1 + 0) / 3)


def test_metrics_of_an_empty_matrix_are_zero() -> None:
    m = classification_metrics([[0, 0], [0, 0]], ["a", "b"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0, 0.0)
