"""A trained head on disk: a folder anyone can inspect, and that refuses to be changed.

    head.joblib      the fitted estimator (a Keras model inside is stored in .keras format)
    head.json        classes, the feature configuration (fingerprint and facts), scores,
                     arguments, versions
    metrics.json     every score of every split
    predictions.csv  every scored image: path, split, true and predicted label, probability, top 3
    confusion_<split>.png, learning_curve.png (mlp)
    SHA256SUMS       the SHA-256 of every other file, head.json included (`sha256sum -c SHA256SUMS`),
                     but report.html, written after it for a run of one head (nothing loads it back);
                     and each one's size, as `# size N  name` lines (comments to sha256sum)

A joblib file is a pickle, and loading a pickle runs code: `load_head` checks every file's
size first (a stat: a changed file is refused before a byte of any is read), then reads
each once, no more than its size, checks its bytes against SHA256SUMS, and unpickles those
same bytes (the other files are hashed as they are read, never held whole). No file is read
past a cap, whatever SHA256SUMS records (`max_bytes`: head.json 16 MiB, others 4 GiB), so
folders written before sizes were recorded load too, and an edited size line is refused on
a stat like any other change. The check
catches accidental damage and a changed file; it cannot stop someone who can rewrite the
whole folder (SHA256SUMS with it). Only load heads you trust.

A head folder is written as `<folder>.partial-<host>-<pid>-XXXX` beside it and renamed into
place when complete, so a crash leaves no half-written head, and a second run to the same
folder is refused rather than mixed in (a rename onto a folder succeeds only while it is
empty). What a kill -9 leaves there is removed by the next run in that folder, once its
process is gone.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import joblib
import numpy as np

from classify.evaluation import plot_confusion, plot_learning_curve
from extract import (
    FeatureConfig, UsageError, describe, fingerprint, owned_prefix, partial_prefix, read_regular, sha256_regular,
    stale_partials,
)

ARTIFACT = "head.joblib"
INFO = "head.json"
SUMS = "SHA256SUMS"
PREDICTIONS = "predictions.csv"
TOP_K = 3  # labels per image in predictions.csv
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
DEFAULT_HEADS_FOLDER = "heads"
LEADERBOARD = "leaderboard.json"  # beside the heads of a --head all run, best first
MAX_FILE_BYTES = 4 * 2**30  # the most read or hashed of one head file (a large random forest is ~100 MB)
MAX_INFO_BYTES = 16 * 2**20  # head.json: classes, configuration, scores, arguments (1,000 classes: ~100 KB)
MAX_SUMS_BYTES = 2**20  # SHA256SUMS: two lines a file
CONFIG_FACTS = ("backbone", "weights", "weights_sha256", "weights_seed", "weights_backend", "weights_path",
                "input_size", "interpolation", "preprocessing", "pooling", "precision", "dtype", "feature_shape", "decode", "layer")
_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *]([^/\\\n]+)")
_SIZE_LINE = re.compile(r"# size ([0-9]{1,20})  ([^/\\\n]+)")


def save_head(folder: Path, estimator, info: dict, scores: dict, predictions=()) -> None:
    """Write a head folder (which must be new or empty), SHA256SUMS last. `predictions`:
    the `evaluation.Predictions` of the scored splits, written as predictions.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, folder / ARTIFACT)
    (folder / "metrics.json").write_text(json.dumps(scores, indent=2))
    if predictions:
        write_predictions(folder / PREDICTIONS, predictions)
    for split, split_scores in scores.items():
        plot_confusion(split_scores, estimator.classes_, f"{info['head']} on {split}", folder / f"confusion_{split}.png")
    if getattr(estimator, "history_", None):
        plot_learning_curve(estimator.history_, f"{info['head']}: learning curve", folder / "learning_curve.png",
                            augmented=bool(info.get("training_views")))
    (folder / INFO).write_text(json.dumps(info, indent=2))
    names = sorted(path.name for path in folder.iterdir() if path.name != SUMS)
    digests, sizes = {}, {}
    for name in names:  # one file in memory at a time
        data = _read(folder / name)
        digests[name], sizes[name] = _sha256(data), len(data)
    (folder / SUMS).write_text("".join(f"{digests[name]}  {name}\n" for name in names)
                               + "".join(f"# size {sizes[name]}  {name}\n" for name in names))


def write_predictions(path: Path, predictions, top_k: int = TOP_K) -> None:
    """One CSV row per scored image: path, split, true and predicted label, the predicted
    label's probability, whether it was right, then the next most probable labels. Text
    cells are defended against spreadsheet formulas (see `spreadsheet_cell`)."""
    predictions = list(predictions)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        first = predictions[0]
        alternatives = range(2, min(top_k, len(first.classes)) + 1)
        writer.writerow(["path", "split", "true_label", "predicted_label", "probability", "correct"]
                        + [name for rank in alternatives for name in (f"label_{rank}", f"probability_{rank}")])
        for made in predictions:
            confidence = made.confidence()
            order, top = made.top(len(alternatives) + 1) if made.proba is not None else (None, None)
            for i, (image, truth, predicted) in enumerate(zip(made.paths, made.y, made.predicted)):
                row = [spreadsheet_cell(str(image)), made.split, spreadsheet_cell(str(truth)), spreadsheet_cell(str(predicted)),
                       "" if confidence[i] != confidence[i] else f"{confidence[i]:.6f}", int(truth == predicted)]
                for rank in alternatives:
                    row += ["", ""] if order is None else [spreadsheet_cell(str(made.classes[order[i, rank - 1]])),
                                                           f"{top[i, rank - 1]:.6f}"]
                writer.writerow(row)


def spreadsheet_cell(text: str) -> str:
    """`text`, with a leading ' when a spreadsheet would take it for a formula (OWASP: it
    starts with = + - @, a tab or a carriage return)."""
    return "'" + text if text[:1] in FORMULA_STARTS else text


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
            theirs = f" ({describe(facts)})" if facts else ""
            raise UsageError(
                f"The head in {str(self.folder)!r} was trained on features of configuration {self.fingerprint} "
                f"({describe(self.info['feature_config'])}); these are configuration {fingerprint}{theirs}. "
                f"Extract features with the head's settings, or train a head on these."
            )

    def predict_proba(self, features: np.ndarray, fingerprint: str) -> np.ndarray:
        self.check_features(fingerprint)
        return self.estimator.predict_proba(np.asarray(features, np.float32).reshape(len(features), -1))

    def predict(self, features: np.ndarray, fingerprint: str) -> np.ndarray:
        self.check_features(fingerprint)
        return self.estimator.predict(np.asarray(features, np.float32).reshape(len(features), -1))


def load_head(folder) -> LoadedHead:
    """Load a head folder written by train-head. Every file listed in SHA256SUMS must have
    its recorded size (all stat'ed before any is read), then is read once, no further, and
    checked; head.json is parsed and head.joblib unpickled from the checked bytes (never
    opened again), and head.json's classes must be the estimator's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{str(folder)!r} is not a head folder written by train-head (not a folder).")
    if not (folder / SUMS).exists():
        if (folder / INFO).exists():
            raise UsageError(f"{str(folder)!r} has no {SUMS} (written by train-head since this version, covering "
                             f"{INFO} too); retrain the head.")
        raise UsageError(_run_folder_note(folder) or
                         f"{str(folder)!r} is not a head folder written by train-head (no {SUMS}).")
    recorded, sizes = _read_sums(folder / SUMS)
    for name in (INFO, ARTIFACT):
        if name not in recorded:
            raise UsageError(f"{str(folder / SUMS)!r} does not list {name}; retrain the head.")
    changed = "it was removed or replaced after training: restore it or retrain"
    for name, size in sizes.items():  # every size, before a byte of any file is read
        _check_size(folder / name, size, changed)
    contents = {}
    for name, digest in recorded.items():
        path, limit = folder / name, min(sizes.get(name, MAX_FILE_BYTES), max_bytes(name))
        if name in (INFO, ARTIFACT):  # kept: the bytes checked are the bytes loaded
            contents[name] = read_regular(path, limit, repr(str(path)), changed)
            found = _sha256(contents[name])
        else:  # only checked: never held whole
            found = sha256_regular(path, limit, repr(str(path)), changed)
        if found != digest:
            raise UsageError(
                f"{str(path)!r} does not match the SHA-256 recorded in {SUMS}: it was changed "
                f"after training. Refusing to load it (a joblib file can run code); restore it or retrain."
            )
    info = _parse_info(folder / INFO, contents[INFO])
    try:
        estimator = joblib.load(io.BytesIO(contents[ARTIFACT]))
    except Exception as error:  # the bytes are the ones written: another version of a library
        raise UsageError(f"Cannot load {str(folder / ARTIFACT)!r} with these library versions "
                         f"({type(error).__name__}: {_first_line(error)}); retrain the head.") from None
    classes = [str(label) for label in getattr(estimator, "classes_", [])]
    if classes != info["classes"]:
        raise UsageError(f"{str(folder / INFO)!r} lists the classes {info['classes']!r}, but the model predicts "
                         f"{classes!r}; refusing to relabel its predictions. Retrain the head.")
    return LoadedHead(folder, estimator, info)


def _run_folder_note(folder: Path) -> str:
    """Where `folder` is a run of `train-head --head all` (its heads in folders inside it and
    leaderboard.json), a message naming them and the best; else ""."""
    try:
        heads = sorted(child.name for child in folder.iterdir() if (child / SUMS).is_file())
    except OSError:  # unreadable: the plain message says enough
        return ""
    if not heads:
        return ""
    best = None
    try:
        best = json.loads((folder / LEADERBOARD).read_text())[0]["head"]
    except (OSError, ValueError, LookupError, TypeError):  # no leaderboard: the heads are still named
        pass
    best = best if best in heads else None
    where = str(folder / (best or heads[0]))
    return (f"{str(folder)!r} is a folder of {len(heads)} heads ({', '.join(heads)}), not one head; pass one of "
            f"them, e.g. --head {where!r}" + (" (the best on the leaderboard)." if best else "."))


def _read_sums(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """SHA256SUMS: each file's SHA-256 and, unless the folder was written before sizes were
    recorded (then {}), its size; a size for each file listed, and none for another."""
    try:
        listing = read_regular(path, MAX_SUMS_BYTES, repr(str(path)), "restore it or retrain").decode("ascii")
    except UnicodeDecodeError as error:
        raise UsageError(f"Cannot read {str(path)!r} ({error}); restore it or retrain.") from None
    recorded, sizes = {}, {}
    for line in listing.splitlines():
        digest, size = _SUMS_LINE.fullmatch(line), _SIZE_LINE.fullmatch(line)
        match, into = (digest, recorded) if digest else (size, sizes)
        if not match or match[2] in into:
            raise UsageError(f"{str(path)!r} is not a SHA256SUMS file written by train-head "
                             f"(line {line[:60]!r}); restore it or retrain.")
        into[match[2]] = match[1] if digest else int(match[1])
    if sizes and sizes.keys() != recorded.keys():
        raise UsageError(f"{str(path)!r} does not record a size for each file it lists (and only those); "
                         f"restore it or retrain.")
    return recorded, sizes


def _check_size(path: Path, size: int, fix: str) -> None:
    """A head file must have the size SHA256SUMS records (a stat, no read). A special file
    has no size to compare: opening it (`read_regular`) refuses it."""
    try:
        found = os.stat(path)
    except OSError as error:
        raise UsageError(f"Cannot read {str(path)!r} ({error.strerror or error}); {fix}.") from None
    if stat.S_ISREG(found.st_mode) and found.st_size != size:
        raise UsageError(f"{str(path)!r} is {found.st_size} bytes, not the {size} recorded in {SUMS}: it was "
                         f"changed after training. Refusing to read it; restore it or retrain.")


def _parse_info(path: Path, data: bytes) -> dict:
    """head.json, checked to hold what scoring and export read."""
    try:
        info = json.loads(data)
    except ValueError as error:
        raise UsageError(f"{str(path)!r} is not JSON ({error}); retrain the head.") from None
    problem = None
    if not isinstance(info, dict):
        problem = f"a JSON {type(info).__name__}, not an object"
    elif not isinstance(info.get("head"), str):
        problem = "no head name"
    elif not (isinstance(info.get("classes"), list) and len(info["classes"]) >= 2
              and all(isinstance(label, str) for label in info["classes"])):
        problem = "no list of at least 2 class names"
    elif not isinstance(info.get("fingerprint"), str):
        problem = "no fingerprint"
    elif not isinstance(info.get("feature_config"), dict):
        problem = "no feature_config"
    elif not (isinstance(info["feature_config"].get("feature_shape"), list)
              and all(isinstance(n, int) and n > 0 for n in info["feature_config"]["feature_shape"])):
        problem = "no feature_config.feature_shape"
    if problem:
        raise UsageError(f"{str(path)!r} is not a head.json written by train-head ({problem}); retrain the head.")
    return info


def max_bytes(name: str) -> int:
    """The most read of the head file `name`, written or loaded, whatever size SHA256SUMS
    records: a recorded size edited to match a huge sparse file is still refused on a stat."""
    return MAX_INFO_BYTES if name == INFO else MAX_FILE_BYTES


def _read(path: Path) -> bytes:
    """A file just written to a head folder (to hash it), at most `max_bytes`: what is
    saved can be loaded."""
    return read_regular(path, max_bytes(path.name), repr(str(path)))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]



def check_out(out) -> Path | None:
    """--out, refused early if it cannot become the new head folder."""
    if out is None:
        return None
    out = Path(out)
    if out.is_symlink() or out.exists():
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"--out {str(out)!r} exists and is not a folder; choose a new folder.")
        if any(out.iterdir()):
            raise UsageError(f"--out {str(out)!r} exists and is not empty; choose a new folder (runs never overwrite).")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"Cannot make the folder of --out {str(out)!r} ({error.strerror or error}).") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write in {str(out.parent)!r}, the folder of --out (permission denied); "
                         f"choose another --out.")
    return out


def partial_folder(final: Path) -> Path:
    """A new folder beside `final` to write into; renamed to `final` when complete. Its name
    carries this process's id, and the partial folders beside it whose process is gone (a
    run killed with -9, whatever its --out) are removed first."""
    for stale in stale_partials(final.parent):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    try:
        folder = Path(tempfile.mkdtemp(prefix=owned_prefix(partial_prefix(final.name)), dir=final.parent))
        mask = os.umask(0o022)
        os.umask(mask)
        folder.chmod(0o777 & ~mask)  # as a folder made by mkdir would be
        return folder
    except OSError as error:
        raise UsageError(f"Cannot write in {str(final.parent)!r} ({error.strerror or error}); "
                         f"choose another --out.") from None


@contextmanager
def written_whole(final: Path, made: bool, what: str = "head"):
    """A partial folder beside `final` to write into (`partial_folder`), renamed to `final`
    when the block ends (`commit_folder`), or removed, with `final` too when this run `made`
    it, when the block raises: a run leaves its whole folder or nothing."""
    partial = partial_folder(final)
    try:
        yield partial
        commit_folder(partial, final, what)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if made:
            remove_empty(final)
        raise


def commit_folder(partial: Path, final: Path, what: str = "head") -> None:
    """Rename the finished folder into place: atomic, and never over another run's `what`
    ("head", "check": named in the refusal) (a rename onto a folder succeeds only if that
    folder is empty)."""
    try:
        os.rename(partial, final)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise UsageError(
                f"--out {str(final)!r} was written by another run while this one worked; this run's "
                f"{what} is not saved. Run again with a new --out."
            ) from None
        raise


def remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def new_folder(name: str, parent=DEFAULT_HEADS_FOLDER) -> Path:
    """A new, empty folder under heads/ (never an old one), reserved by making it."""
    stem = Path(parent) / f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
    for attempt in range(1, 1000):
        folder = stem if attempt == 1 else stem.with_name(f"{stem.name}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            raise UsageError(f"Cannot make a folder under {parent}/ ({error.strerror or error}); "
                             f"pass --out.") from None
    raise UsageError(f"Could not make a new folder under {parent}/; pass --out.")


def head_config(head: LoadedHead, weights: str | None = None) -> FeatureConfig:
    """The feature configuration the head was trained on, checked to be the same one."""
    return recorded_config(head.info["feature_config"], head.fingerprint, weights, "head's features",
                           f"The feature_config in {str(head.folder / INFO)!r}", "retrain the head")


def recorded_config(facts: dict, key: str, weights: str | None, whose: str, where: str, fix: str) -> FeatureConfig:
    """The feature configuration that `facts` record (a head's, or a cache group's) and
    `key` names, built again, with its weights found where `weights` says (default: where
    it was made) and checked to be the same ones; refused in one line naming --weights
    PATH when they are not there or not the same. `whose` names the features in messages
    ("head's features"), `where` the record, `fix` what to do if it is not readable."""
    try:
        config = FeatureConfig.from_facts(facts, weights)
    except (KeyError, TypeError, ValueError) as error:
        what = f"no {error}" if isinstance(error, KeyError) else " ".join(str(error).split())[:200]
        raise UsageError(f"{where} is not one train-head can read ({what}); {fix}.") from None
    place = config.weights
    if place not in ("imagenet", "random") and not Path(place).is_file():
        what = "not a regular file" if os.path.exists(place) else "not there"  # a folder, a FIFO ... is there
        raise UsageError(
            f"The {whose} were made with the weights file {place!r}, which is {what}; "
            f"pass --weights PATH to a copy of it."
        )
    config.validate()
    identity = config.identity()
    if fingerprint(identity) == key:
        return config
    if config.weights == "random":
        made_on = facts.get("weights_backend", "tensorflow")
        raise UsageError(
            f"The {whose} were made with random weights (seed {config.seed}) on the Keras backend "
            f"{made_on}, and random weights differ by backend; run with KERAS_BACKEND={made_on} "
            f"(this is {identity.get('weights_backend', 'tensorflow')})."
        )
    raise UsageError(
        f"--weights {place}: not the weights the {whose} were made with "
        f"(SHA-256 {facts.get('weights_sha256', facts.get('weights'))}); pass --weights PATH to the right file."
    )
