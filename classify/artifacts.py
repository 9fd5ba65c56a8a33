"""A trained head on disk: a folder anyone can inspect, and that refuses to be tampered with.

    head.joblib      the fitted estimator (a Keras model inside is stored in .keras format)
    head.json        classes, the feature configuration (fingerprint and facts), scores,
                     arguments, versions, and the SHA-256 of every other file here
    metrics.json     every score of every split
    confusion_<split>.png, learning_curve.png (mlp)

A joblib file is a pickle, and loading a pickle runs code: `load_head` checks each file
against the SHA-256 recorded in head.json before loading anything. Only load heads you trust.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np

from classify.evaluation import plot_confusion, plot_learning_curve
from extract import UsageError

ARTIFACT = "head.joblib"
INFO = "head.json"
CONFIG_FACTS = ("backbone", "weights", "weights_sha256", "weights_seed", "weights_path", "input_size",
                "interpolation", "preprocessing", "pooling", "precision", "dtype", "feature_shape", "decode")


def describe_config(facts: dict) -> str:
    """A feature configuration in a few words, for messages."""
    return (f"{facts.get('backbone', '?')}, {facts.get('weights', '?')} weights, {facts.get('input_size', '?')} px "
            f"{facts.get('interpolation', '?')}, pooling {facts.get('pooling', '?')}, {facts.get('precision', '?')}")


def save_head(folder: Path, estimator, info: dict, scores: dict) -> None:
    """Write a head folder (which must be new or empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, folder / ARTIFACT)
    (folder / "metrics.json").write_text(json.dumps(scores, indent=2))
    for split, split_scores in scores.items():
        plot_confusion(split_scores, estimator.classes_, f"{info['head']} on {split}", folder / f"confusion_{split}.png")
    if getattr(estimator, "history_", None):
        plot_learning_curve(estimator.history_, f"{info['head']}: learning curve", folder / "learning_curve.png")
    files = sorted(path.name for path in folder.iterdir() if path.name != INFO)
    info = dict(info, files={name: _sha256(folder / name) for name in files})
    (folder / INFO).write_text(json.dumps(info, indent=2))


@dataclass
class LoadedHead:
    """A head read back from its folder. It scores features of its own configuration only."""

    folder: Path
    estimator: object
    info: dict

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def check_features(self, fingerprint: str, facts: dict | None = None) -> None:
        """Refuse features of another configuration, naming both."""
        if fingerprint != self.fingerprint:
            theirs = f" ({describe_config(facts)})" if facts else ""
            raise UsageError(
                f"The head in {str(self.folder)!r} was trained on features of configuration {self.fingerprint} "
                f"({describe_config(self.info['feature_config'])}); these are configuration {fingerprint}{theirs}. "
                f"Extract features with the head's settings, or train a head on these."
            )

    def predict_proba(self, features: np.ndarray, fingerprint: str) -> np.ndarray:
        self.check_features(fingerprint)
        return self.estimator.predict_proba(np.asarray(features, np.float32).reshape(len(features), -1))

    def predict(self, features: np.ndarray, fingerprint: str) -> np.ndarray:
        self.check_features(fingerprint)
        return self.estimator.predict(np.asarray(features, np.float32).reshape(len(features), -1))


def load_head(folder) -> LoadedHead:
    """Load a head folder written by train-head, after checking every file's SHA-256."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO).read_text())
        recorded = info["files"]
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{str(folder)!r} is not a head folder written by train-head (no readable {INFO}).") from error
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise UsageError(
                f"{str(path)!r} does not match the SHA-256 recorded in {INFO}: it was changed or removed "
                f"after training. Refusing to load it (a joblib file can run code); restore it or retrain."
            )
    if ARTIFACT not in recorded:
        raise UsageError(f"{str(folder)!r} has no recorded {ARTIFACT}; retrain the head.")
    return LoadedHead(folder, joblib.load(folder / ARTIFACT), info)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
