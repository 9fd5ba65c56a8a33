"""Scores of a fitted head on one split, all from sklearn.metrics, and their pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics


def predictions(estimator, rows, probabilities: bool = False):
    """A fitted head's labels for `rows` (a `classify.data.Rows`, read a batch at a time)
    and, with `probabilities` where the head gives them, its probabilities (else None)."""
    probabilities = probabilities and hasattr(estimator, "predict_proba")
    predicted, proba = [rows.y[:0]], []
    for X, _ in rows.batches(rows.scan_rows):
        predicted.append(estimator.predict(X))
        if probabilities:
            proba.append(estimator.predict_proba(X))
    return np.concatenate(predicted), np.concatenate(proba) if proba else None


def evaluate(estimator, rows) -> dict:
    """Accuracy, balanced accuracy, macro-F1, log loss (where the head gives
    probabilities), per-class precision/recall/F1 and the confusion matrix, JSON-ready, of
    a fitted head on `rows` (a `classify.data.Rows`). Rows and columns of the matrix follow
    `estimator.classes_`."""
    classes, y = list(estimator.classes_), rows.y
    predicted, proba = predictions(estimator, rows, probabilities=True)
    scores = {
        "images": int(len(y)),
        "accuracy": float(metrics.accuracy_score(y, predicted)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y, predicted)),
        "macro_f1": float(metrics.f1_score(y, predicted, labels=classes, average="macro", zero_division=0)),
        "log_loss": None,
    }
    if proba is not None:
        scores["log_loss"] = float(metrics.log_loss(y, proba, labels=classes))
    report = metrics.classification_report(y, predicted, labels=classes, output_dict=True, zero_division=0)
    scores["per_class"] = {
        name: {key: float(report[name][key]) for key in ("precision", "recall", "f1-score", "support")}
        for name in classes
    }
    scores["confusion_matrix"] = metrics.confusion_matrix(y, predicted, labels=classes).tolist()
    return scores


def format_scores(name: str, split: str, scores: dict) -> str:
    """A readable table of one head's scores on one split."""
    loss = "n/a" if scores["log_loss"] is None else f"{scores['log_loss']:.4f}"
    lines = [
        f"{name} on {split} ({scores['images']} images): accuracy {scores['accuracy']:.4f}, "
        f"balanced accuracy {scores['balanced_accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}, log loss {loss}",
        f"  {'class':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'images':>7}",
    ]
    for label, row in scores["per_class"].items():
        lines.append(
            f"  {label[:20]:<20} {row['precision']:>9.3f} {row['recall']:>9.3f} {row['f1-score']:>9.3f} {int(row['support']):>7}"
        )
    return "\n".join(lines)


def plot_confusion(scores: dict, classes, title: str, path: Path) -> None:
    plt = _pyplot()
    display = metrics.ConfusionMatrixDisplay(np.array(scores["confusion_matrix"]), display_labels=list(classes))
    side = max(4.0, 0.5 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(side, side))
    display.plot(ax=axes, colorbar=False, xticks_rotation="vertical")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_learning_curve(history: dict, title: str, path: Path) -> None:
    plt = _pyplot()
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(9, 3.5))
    for axes, metric in ((loss, "loss"), (accuracy, "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            if prefix + metric in history:
                values = history[prefix + metric]
                axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt
