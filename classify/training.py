"""Train heads on cached features (see splits.py for the rows): fitting, search,
cross-validation, the leaderboard, head folders.

    from classify import train_head
    training = train_head("cache/features.h5", head="all")
    for row in training.leaderboard(): print(row)
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from sklearn import metrics
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid
from tqdm import tqdm

from classify.artifacts import (
    DEFAULT_HEADS_FOLDER, LEADERBOARD, check_out, new_folder, save_head, written_whole,
)
from classify.data import READ_SHARE, Rows, gigabytes
from classify.data import memory_budget as memory_budget_bytes
from classify.evaluation import Predictions, evaluate, predictions
from classify.finetune import KerasFinetuneClassifier, feature_sets
from classify.heads import HEADS
from classify.keras_head import KerasMLPClassifier
from classify.report import MISTAKES, REPORT, write_report
from classify.splits import HeadWarning, Splits, image_folds, load_splits
from extract import (
    DEFAULT_CACHE, SEED, Interval, StrOptions, UsageError, check_options, console, describe, package_versions,
)


def _option(name: str) -> str:
    """An mlp parameter's train-head option: hidden_units -> --hidden-units."""
    return f"--{name.replace('_', '-')}"


MLP_OPTIONS = (*KerasMLPClassifier.parameter_constraints, "early_stopping", "standardize")  # train_head's **options
FINETUNE_OPTIONS = ("head_epochs",)  # and the finetune head's own
KERAS_HEADS = ("mlp", "finetune")  # the heads the options go to
# Every option's bounds and choices (see extract.options); the mlp's are its estimator's.
TRAIN_HEAD = {
    "--mistakes": StrOptions(MISTAKES),
    "--class-weight": [StrOptions(("balanced",)), None],
    "--cv": [Interval(Integral, 2, 100), None],
    "--seed": SEED,
    "--validation-fraction": Interval(Real, 0, 1, closed="neither"),
    **{_option(name): constraint for name, constraint in KerasFinetuneClassifier.parameter_constraints.items()},
}


@dataclass
class HeadResult:
    head: str
    estimator: object
    scores: dict  # split -> evaluate(...)
    fit_seconds: float
    folder: Path
    params: dict = field(default_factory=dict)
    cross_validation: dict | None = None
    search: list | None = None
    predictions: dict = field(default_factory=dict)  # split -> evaluation.Predictions, row by row

    def summary(self) -> dict:
        validation = self.scores["validation"]
        row = {"head": self.head, "validation_accuracy": validation["accuracy"], "macro_f1": validation["macro_f1"],
               "log_loss": validation["log_loss"], "fit_seconds": round(self.fit_seconds, 3), "folder": str(self.folder)}
        if "test" in self.scores:
            row["test_accuracy"] = self.scores["test"]["accuracy"]
        if self.cross_validation:
            row["cv_accuracy_mean"] = self.cross_validation["accuracy_mean"]
            row["cv_accuracy_std"] = self.cross_validation["accuracy_std"]
        return row


@dataclass
class Training:
    results: list[HeadResult]
    folder: Path
    fingerprint: str
    validation_source: str
    training_images: int = 0
    training_views: int = 0  # augmented views the heads trained on (0: none)
    streamed: bool = False  # the features were read from the cache as the heads trained, not held in memory
    leaks: int = 0  # validation and test images that are exact copies of training images
    report: Path | None = None  # the run's report.html, once written

    def leaderboard(self) -> list[dict]:
        """Best first: validation accuracy, then macro-F1."""
        rows = [result.summary() for result in self.results]
        return sorted(rows, key=lambda row: (-row["validation_accuracy"], -row["macro_f1"]))

    @property
    def best(self) -> HeadResult:
        """The head the leaderboard puts first."""
        return next(result for result in self.results if result.head == self.leaderboard()[0]["head"])


def train_head(
    cache=DEFAULT_CACHE,
    head: str = "mlp",
    *,
    config: str | None = None,
    out=None,
    search: bool = False,
    cv: int | None = None,
    class_weight: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.2,
    augment: bool = True,
    memory_budget=None,
    report: bool = True,
    mistakes: str = "best",
    progress: bool = False,
    weights: str | None = None,
    **options,
) -> Training:
    """Train one head (or every head, `head="all"`) on a cache's features, score it on the
    validation split (and test split), and save each under `out` (default: a new folder in
    heads/). With cached augmented views (and `augment`), scikit-learn heads train on every
    view and the mlp on one view of each image per epoch. Features that need more than
    `memory_budget` (bytes, or a size such as "8G"; default half the memory available) are
    streamed from the cache, and only heads that stream train. With `report`, the run's
    folder gets a report.html, showing the mistakes of the best head (or, `mistakes="all"`,
    of every head). `options` go to the mlp and finetune
    heads: hidden_units, dropout_rate, epochs, learning_rate, early_stopping, standardize.

    On a cache of unpooled maps below block5_pool (`extract-features --layer block4_pool`),
    the finetune head tunes block 5 on them, and the other heads train on block5_pool's
    maps computed from them once (heads of that configuration); `weights` says where the
    weights the cache was made with are now (default: where they were)."""
    names = _head_names(head)
    if options and not set(names) & set(KERAS_HEADS):
        raise UsageError(f"Expected --head {' or '.join(KERAS_HEADS)} (or all) with {', '.join(sorted(options))}; "
                         f"received --head {head}.")
    unknown = set(options) - set(MLP_OPTIONS) - set(FINETUNE_OPTIONS)
    own = sorted(_option(name) for name in set(options) & set(FINETUNE_OPTIONS))
    if own and "finetune" not in names:
        raise UsageError(f"Expected --head finetune (or all) with {', '.join(own)}; received --head {head}.")
    if unknown:
        raise UsageError(f"Unknown mlp option(s) {', '.join(sorted(unknown))}.")
    check_options({"--mistakes": mistakes, "--class-weight": class_weight, "--cv": cv, "--seed": seed,
                   "--validation-fraction": validation_fraction,
                   **{_option(name): value for name, value in options.items() if _option(name) in TRAIN_HEAD}},
                  TRAIN_HEAD)
    budget = memory_budget_bytes(memory_budget)
    final = check_out(out)
    with load_splits(cache, config, validation_fraction, seed, folds=cv, augment=augment,
                     read_bytes=budget // READ_SHARE) as splits:
        if progress:
            console.terminal_line(splits_line(cache, splits))
        tuning = [name for name in names if HEADS[name].tunes]
        sets = feature_sets(names, tuning, head == "all", splits, cache, weights)
        plan = _Plan(search, cv, class_weight, seed, validation_fraction, augment, False, report, mistakes)
        splits_of, plans = {}, {}
        for features, group in sets:  # each set in memory if it fits in what the sets before it left
            streamed = features.memory_needed > budget
            group = _streaming(group, head, features, budget, memory_budget) if streamed else group
            features = features if streamed else features.load()
            budget -= 0 if streamed else features.memory_needed
            splits_of.update((name, features) for name in group)
            plans.update((name, replace(plan, streamed=streamed)) for name in group)
        names = [name for name in names if name in splits_of]
        final = final or new_folder("all" if len(names) > 1 else names[0], DEFAULT_HEADS_FOLDER)
        with written_whole(final, made=out is None) as partial:
            training = _train_all(names, splits_of, partial, final, plans, options, progress)
    return training


def splits_line(cache, splits: Splits) -> str:
    """What a run trains on, in one line, said before it starts (a forgotten --cache or
    --config shows at once): the cache, the folder its images were read from, the
    configuration, the rows of each split."""
    rows = [f"{splits.training_images} training images"
            + (f" (and {splits.training_views} views of them)" if splits.training_views else ""),
            f"{len(splits.validation)} validation"
            + (" (held out of the training images)" if splits.validation_source == "drawn" else "")]
    if splits.test is not None:
        rows.append(f"{len(splits.test)} test")
    source = f", extracted from {splits.data_dir!r}" if splits.data_dir else ""
    return (f"training on {str(cache)!r}{source}: configuration {splits.fingerprint} ({describe(splits.config)}); "
            f"{', '.join(rows)}")


def _streaming(names: list[str], head: str, splits: Splits, budget: int, given) -> list[str]:
    """The heads of `names` that stream; a head that does not is refused (alone) or left
    out with a warning (--head all)."""
    streaming = [name for name in HEADS if HEADS[name].streams and HEADS[name].tunes == (splits.base is not None)]
    cannot = [name for name in names if not HEADS[name].streams]
    if not cannot:
        return names
    why = (f"the features need about {gigabytes(splits.memory_needed)} in memory ({len(splits.train)} training rows "
           f"of {splits.train.n_features} floats, twice, and the validation and test rows), more than --memory-budget "
           f"{gigabytes(budget)}{' (half the memory available)' if given is None else ''}")
    if head != "all":
        raise UsageError(f"{head} cannot train here: {why}. Train a head that streams ({', '.join(streaming)}) "
                         f"or raise --memory-budget.")
    warnings.warn(f"{', '.join(cannot)} left out: {why}; heads that stream are trained.", HeadWarning)
    return [name for name in names if name not in cannot]


def _train_all(names, splits_of: dict[str, Splits], partial: Path, final: Path, plans: dict[str, "_Plan"],
               options: dict, progress: bool):
    """Every head of `names` into `partial` (as it will be once renamed to `final`), each on
    its features (`splits_of`) as its plan says. With several heads, one that cannot be
    trained on these data is a warning, not a stop."""
    results = []
    splits = splits_of[names[0]]  # the features the run is described by (the first head's)
    bar = tqdm(names, unit="head", desc="training", disable=None if progress and len(names) > 1 else True)
    for name in bar:
        bar.set_postfix_str(name)
        try:
            fitted = _fit_one(name, splits_of[name], plans[name], _options(name, options), progress)
        except _CannotTrain as error:
            if len(names) == 1:
                raise UsageError(str(error)) from None
            warnings.warn(f"{error}; it is left out of the leaderboard.", HeadWarning)
            continue
        relative = Path(name) if len(names) > 1 else Path()
        results.append(_save_one(fitted, splits_of[name], partial / relative, final / relative))
    if not results:
        raise UsageError("No head could be trained on these data (see the warnings); add training images.")
    plan = plans[names[0]]
    training = Training(results, final, splits.fingerprint, splits.validation_source, splits.training_images,
                        splits.training_views, any(plans[result.head].streamed for result in results), splits.leaks)
    if len(names) > 1:
        (partial / LEADERBOARD).write_text(json.dumps(training.leaderboard(), indent=2))
    if plan.report:
        if progress:
            console.terminal_line(f"drawing {REPORT} (t-SNE map of the features) ...")
        folders = {result.head: partial / (result.head if len(names) > 1 else "") for result in results}
        try:
            write_report(partial / REPORT, training, splits, folders, plan.mistakes, plan.seed)
            training.report = final / REPORT
        except Exception as error:  # the heads are trained and saved: a failed page must not lose them
            warnings.warn(f"{REPORT} not written ({type(error).__name__}: {' '.join(str(error).split())[:300]}); "
                          f"the heads are saved.", HeadWarning)
    return training


def _options(name: str, options: dict) -> dict:
    """The options of train_head that head `name` takes."""
    if name not in KERAS_HEADS:
        return {}
    return options if name == "finetune" else {key: value for key, value in options.items() if key in MLP_OPTIONS}


@dataclass(frozen=True)
class _Plan:
    """How every head of one train_head call is trained (recorded in head.json)."""

    search: bool
    cv: int | None
    class_weight: str | None
    seed: int
    validation_fraction: float
    augment: bool
    streamed: bool  # the features were read from the cache as heads trained (another order than in memory)
    report: bool = True  # write report.html
    mistakes: str = "best"  # whose mistakes the report shows: the best head's or every head's


class _CannotTrain(Exception):
    """A head that cannot be fitted on these data (e.g. too few images of a class for its folds)."""


@dataclass
class _Fitted:
    name: str
    estimator: object
    scores: dict
    fit_seconds: float
    plan: _Plan
    options: dict
    cross_validation: dict | None
    search: list | None
    predictions: dict  # split -> Predictions


def _fit_one(name: str, splits: Splits, plan: _Plan, options: dict, progress: bool = False) -> _Fitted:
    spec = HEADS[name]
    if plan.class_weight and not spec.class_weights:
        warnings.warn(f"{name} has no class weights; --class-weight {plan.class_weight} is ignored for it.", HeadWarning)
    class_weight = plan.class_weight if spec.class_weights else None
    try:
        estimator = spec.build(random_state=plan.seed, class_weight=class_weight, **options)
        if spec.tunes:
            estimator.set_params(base=splits.base)
        if "n_neighbors" in estimator.get_params() and estimator.get_params()["n_neighbors"] > splits.training_images:
            estimator.set_params(n_neighbors=splits.training_images)
        table = None
        if plan.search:
            best, table = _search(estimator, spec.grid, splits)
            estimator.set_params(**best)
        cross_validation = _cross_validate(estimator, splits, plan.cv, plan.seed) if plan.cv else None
        started = time.perf_counter()
        fit(estimator, splits.train, splits.validation, name if progress else None)
        fit_seconds = time.perf_counter() - started
        scored = {"validation": splits.validation, "test": splits.test}
        scored = {split: rows for split, rows in scored.items() if rows is not None}
        made = {split: Predictions(split, list(estimator.classes_), splits.paths[rows.entry], rows.y,
                                   *predictions(estimator, rows, probabilities=True)) for split, rows in scored.items()}
        scores = {split: evaluate(estimator, rows, (made[split].predicted, made[split].proba))
                  for split, rows in scored.items()}
    except (ValueError, ArithmeticError) as error:  # what estimators raise on data they cannot fit
        reason = " ".join(str(error).split())[:300]
        raise _CannotTrain(f"{name} cannot be trained on these data ({reason})") from error
    return _Fitted(name, estimator, scores, fit_seconds, plan, options, cross_validation, table, made)


def fit(estimator, rows: Rows, validation: Rows | None = None, progress: str | None = None):
    """Fit a head on `rows`: one that streams (`fit_rows`) reads them as it goes and
    scores `validation` as it learns (the mlp); the others take them in memory. A Keras
    head shows its epochs on a terminal as a bar named `progress` (None: silent)."""
    if isinstance(estimator, KerasMLPClassifier):  # the finetune head too
        return estimator.fit_rows(rows, validation, progress=progress)
    if hasattr(estimator, "fit_rows"):
        return estimator.fit_rows(rows, validation)
    return estimator.fit(rows.X, rows.y)


def _save_one(fitted: _Fitted, splits: Splits, folder: Path, final: Path) -> HeadResult:
    """Write a fitted head into `folder`; its result names `final`, where it will be."""
    name, estimator, scores, plan = fitted.name, fitted.estimator, fitted.scores, fitted.plan
    params = {key: value for key, value in estimator.get_params().items() if isinstance(value, (bool, int, float, str, type(None)))}
    info = {
        "head": name,
        "description": HEADS[name].description,
        "classes": [str(label) for label in estimator.classes_],
        "fingerprint": splits.fingerprint,
        "feature_config": splits.config,
        "n_features": splits.train.n_features,
        "training_images": splits.training_images,
        "training_views": splits.training_views,
        "augmentation": splits.augmentation,
        "params": params,
        "arguments": dict(asdict(plan), options=fitted.options),
        "validation_source": splits.validation_source,
        **({"computed_from": splits.computed_from} if splits.computed_from else {}),
        "metrics": {split: {key: value[key] for key in ("images", "accuracy", "balanced_accuracy", "macro_f1", "log_loss")}
                    for split, value in scores.items()},
        "cross_validation": fitted.cross_validation,
        "search": fitted.search,
        "fit_seconds": round(fitted.fit_seconds, 3),
        "versions": package_versions(("bottleneck-features", "scikit-learn", "keras", "tensorflow", "numpy")),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    save_head(folder, estimator, info, scores, fitted.predictions.values())
    return HeadResult(name, estimator, scores, fitted.fit_seconds, final, params, fitted.cross_validation, fitted.search,
                      fitted.predictions)


def _search(estimator, grid: dict, splits: Splits):
    """The grid point with the best validation accuracy (fitted on the training split; the
    first of equals). A point the head cannot be fitted with scores None."""
    table = []
    for params in ParameterGrid(grid):
        try:
            candidate = fit(clone(estimator).set_params(**params), splits.train)
            accuracy = metrics.accuracy_score(splits.validation.y, predictions(candidate, splits.validation)[0])
        except (ValueError, ArithmeticError) as error:
            warnings.warn(f"--search: {params} cannot be fitted ({' '.join(str(error).split())[:200]}).", HeadWarning)
            accuracy = None
        table.append({"params": params, "validation_accuracy": accuracy})
    scored = [row for row in table if row["validation_accuracy"] is not None]
    if not scored:
        raise ValueError("no point of the --search grid can be fitted")
    return max(scored, key=lambda row: row["validation_accuracy"])["params"], table


def _cross_validate(estimator, splits: Splits, folds: int, seed: int) -> dict:
    """Stratified K-fold on the training images: mean and standard deviation. A fold's
    views train with their image and are never scored."""
    accuracy, macro_f1 = [], []
    for train, test in image_folds(splits.train.y[: splits.training_images], splits.train.images, folds, seed):
        held_out = splits.train.subset(test)
        y, predicted = held_out.y, predictions(fit(clone(estimator), splits.train.subset(train)), held_out)[0]
        accuracy.append(metrics.accuracy_score(y, predicted))
        macro_f1.append(metrics.f1_score(y, predicted, average="macro"))
    return {
        "folds": folds,
        "accuracy_mean": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy)),
        "macro_f1_mean": float(np.mean(macro_f1)),
        "macro_f1_std": float(np.std(macro_f1)),
    }


def _head_names(head: str) -> list[str]:
    if head == "all":
        return list(HEADS)
    if head not in HEADS:
        raise UsageError(f"Expected --head to be one of {', '.join(HEADS)} or all; received {head!r}.")
    return [head]
