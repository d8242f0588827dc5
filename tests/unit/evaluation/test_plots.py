"""The run's plots, rendered from small synthetic inputs: files written, and what they say."""

import csv

import numpy as np
import pytest

from jewelclf.evaluation import plots

PNG = b"\x89PNG\r\n\x1a\n"
FIELDS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
          "seconds"]


def _history(path, val_losses, phases):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for e, (v, phase) in enumerate(zip(val_losses, phases), start=1):
            w.writerow({"epoch": e, "phase": phase, "loss": 1 / e, "accuracy": 0.5 + e / 40,
                        "val_loss": v, "val_accuracy": 0.4 + e / 40, "learning_rate": 0.01,
                        "seconds": 0.1})
    return path


def _frame_of(fig, text):
    """The (x, y) of ``text`` in its axes' fraction coordinates (0..1 is inside the frame)."""
    ax = next(a for a in fig.axes if text in a.texts)
    x, y = (ax.transAxes.inverted().transform(text.get_transform().transform(text.get_position())))
    return x, y


PHASES = ["stage1"] * 4 + ["stage2.1"] * 2 + ["stage2.2"] * 2


def test_training_curves_mark_the_restored_epoch_the_phases_and_the_run(tmp_path):
    history = _history(tmp_path / "history.csv", [1.2, 0.6, 0.4, 0.3, 0.25, 0.2, 0.4, 0.35], PHASES)
    out = tmp_path / "curves.png"
    fig = plots.training_curves(history, out, run="quick", restored_epoch=6)
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    texts = plots.figure_texts(fig)
    assert "quick" in texts and texts.count("restored (epoch 6)") == 1   # one shared legend
    for ax in fig.axes:
        markers = [line for line in ax.get_lines() if line.get_label() == "restored (epoch 6)"]
        assert len(markers) == 1 and list(markers[0].get_xdata()) == [6, 6]
    labels = [t for t in fig.findobj(plots.Text) if t.get_text() in {"stage1", "stage2.1", "stage2.2"}]
    assert sorted(t.get_text() for t in labels) == sorted(["stage1", "stage2.1", "stage2.2"] * 2)
    for t in labels:  # inside the frame, whatever the data's range
        x, y = _frame_of(fig, t)
        assert 0 < x < 1 and 0 < y < 1, (t.get_text(), x, y)


def test_training_curves_default_to_the_lowest_val_loss_and_zero_marks_nothing(tmp_path):
    history = _history(tmp_path / "history.csv", [1.0, 0.5, 0.7, 0.6], ["stage1"] * 4)
    fig = plots.training_curves(history, tmp_path / "a.png")
    assert "restored (epoch 2)" in plots.figure_texts(fig)
    fig = plots.training_curves(history, tmp_path / "b.png", restored_epoch=0)
    assert not any(t.startswith("restored") for t in plots.figure_texts(fig))
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(FIELDS) + "\n")
    assert plots.training_curves(empty, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_confusion_matrix_cells_colour_bar_and_title(tmp_path):
    cm = np.array([[12, 38, 0], [3, 40, 7], [0, 0, 0]])
    out = tmp_path / "cm.png"
    fig = plots.confusion_matrix(cm, ["necklace", "ring", "watch"], out, run="quick", split="test")
    assert out.read_bytes().startswith(PNG)
    texts = plots.figure_texts(fig)
    assert "quick — test split (100 images)" in texts
    # Counts with their share of the true class; empty cells stay blank.
    cells = sorted(t for t in texts if "\n" in t)
    assert cells == sorted(["12\n24%", "38\n76%", "3\n6%", "40\n80%", "7\n14%"])
    assert len(fig.axes) == 2 and "share of the true class (row)" in texts   # the colour bar
    assert "100%" in texts


def test_confusion_matrix_diagonal_of_a_class_never_right_and_plain_title(tmp_path):
    fig = plots.confusion_matrix(np.array([[0, 5], [0, 5]]), ["a", "b"], tmp_path / "cm.png",
                                 title="my title")
    texts = plots.figure_texts(fig)
    assert "my title" in texts and "0\n0%" in texts and "5\n100%" in texts


@pytest.mark.parametrize("args, expected", [
    (("quick", "test", 250), "quick — test split (250 images)"),
    (("quick", "all", 1), "quick — all images (1 image)"),
    (("quick", "val", 12, "other_photos"), "quick — val split of other_photos (12 images)"),
    (("", "test", None), "test split"),
])
def test_confusion_title(args, expected):
    assert plots.confusion_title(*args) == expected
