"""Scores of a fitted head on one split, all from sklearn.metrics, and their pictures."""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass
class Predictions:
    """A head's predictions for the images of one split, row by row: each image's path
    (relative to the data folder), true label, predicted label and, where the head gives
    them, the probabilities of `classes`."""

    split: str
    classes: list
    paths: np.ndarray
    y: np.ndarray
    predicted: np.ndarray
    proba: np.ndarray | None

    def confidence(self) -> np.ndarray:
        """The probability of each predicted label (NaN without probabilities)."""
        if self.proba is None:
            return np.full(len(self.y), np.nan)
        return self.proba[np.arange(len(self.y)), np.searchsorted(self.classes, self.predicted)]

    def mistakes(self, limit: int) -> np.ndarray:
        """Positions of at most `limit` wrong predictions, the most confident first."""
        wrong = np.flatnonzero(self.predicted != self.y)
        return wrong[np.argsort(-np.nan_to_num(self.confidence()[wrong], nan=0), kind="stable")][:limit]

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k most probable classes (positions in `classes`) and their probabilities."""
        order = np.argsort(-self.proba, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.proba, order, axis=1)


def evaluate(estimator, rows, predicted=None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, log loss (where the head gives
    probabilities), per-class precision/recall/F1 and the confusion matrix, JSON-ready, of
    a fitted head on `rows` (a `classify.data.Rows`). Rows and columns of the matrix follow
    `estimator.classes_`. `predicted`: the head's `predictions(..., probabilities=True)`
    for these rows, when they are already made."""
    classes, y = list(estimator.classes_), rows.y
    predicted, proba = predicted or predictions(estimator, rows, probabilities=True)
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


def natural_order(names) -> list[int]:
    """Positions of `names` in natural order: `2` before `10`, `img9` before `img10`."""
    def key(position):
        parts = re.split(r"(\d+)", str(names[position]))
        return [(0, int(part), "") if part.isdigit() else (1, 0, part.casefold()) for part in parts]
    return sorted(range(len(names)), key=key)


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
    """The confusion matrix twice, side by side: counts, and each row as a share of its true
    class (recall on the diagonal); classes in natural order."""
    plt = pyplot()
    order = natural_order(list(classes))
    counts = np.array(scores["confusion_matrix"])[np.ix_(order, order)]
    names = [str(classes[position]) for position in order]
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(16.0, max(4.0, 0.45 * len(names) + 2.5))  # inches; past ~30 classes, cells shrink instead
    figure, panels = plt.subplots(1, 2, figsize=(2 * side, side))
    for axes, matrix, what, form in ((panels[0], counts, "images", "d"), (panels[1], shares, "share of the true class", ".2f")):
        if len(names) <= 50:
            metrics.ConfusionMatrixDisplay(matrix, display_labels=names).plot(
                ax=axes, colorbar=False, cmap="Blues", xticks_rotation="vertical", values_format=form,
                include_values=len(names) <= 30)
        else:  # names unreadable and slow to draw: the classes in natural order, unnamed
            axes.imshow(matrix, cmap="Blues", interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_xlabel(f"Predicted label ({len(names)} classes in natural order)")
            axes.set_ylabel("True label")
        axes.set_title(what, fontsize=10)
    figure.suptitle(f"{title}: accuracy {scores['accuracy']:.4f} ({scores['images']} images)")
    figure.tight_layout()
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)


def plot_learning_curve(history: dict, title: str, path: Path, augmented: bool = False) -> None:
    """Loss and accuracy by epoch, on the training rows and on the validation split.
    `augmented`: the training rows were augmented views, which the label says. A finetune
    head's history marks where its second step (block5 tuned) began: `fine_tuning_from`."""
    plt = pyplot()
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(9, 3.5))
    for axes, metric in ((loss, "loss"), (accuracy, "accuracy")):
        for prefix, label in (("", "train (augmented views)" if augmented else "train"), ("val_", "validation")):
            if prefix + metric in history:
                values = history[prefix + metric]
                axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
        if history.get("fine_tuning_from"):  # finetune: the head alone, then block5 and the head together
            axes.axvline(history["fine_tuning_from"][0] + 0.5, color="grey", linestyle="--", label="block5 tuned from here")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pyplot():
    """matplotlib.pyplot, drawing into files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt
