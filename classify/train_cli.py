"""The `train-head` command: parse, call `classify.train_head` (and `export_model`), print.
Its exit statuses are every command's (`extract.console`, docs/exit-status.md)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from classify.evaluation import format_scores
from classify.export import EXPORTABLE, export_model, labels_path
from classify.heads import HEADS
from classify.report import MISTAKES
from classify.scoring import cache_files
from classify.splits import leak_note
from classify.training import HeadWarning, Training, train_head
from extract import (
    DEFAULT_CACHE, ExtractError, UsageError, console, describe, list_configs, overwrites, version,
)

PROG = "train-head"
MLP_OPTIONS = ("hidden_units", "dropout_rate", "epochs", "learning_rate", "early_stopping", "standardize", "head_epochs")


def build_parser() -> console.OneLineParser:
    parser = console.OneLineParser(
        prog=PROG,
        description="Train a classifier head on cached VGG16 features, score it, and save it.",
        epilog="example: train-head --head all    (uses what the last extract-features wrote)",
    )
    add = parser.add_argument
    add("--cache", default=DEFAULT_CACHE, metavar="PATH", help=f"feature cache (default {DEFAULT_CACHE})")
    add("--config", metavar="FINGERPRINT", help="feature configuration in the cache (default: the last written)")
    add("--head", default="mlp", metavar="NAME", help=f"{', '.join(HEADS)}, or all (default mlp)")
    add("--search", action="store_true", help="try a small grid of each head's key hyperparameter, chosen on validation")
    add("--cv", type=int, metavar="K", help="also report stratified K-fold accuracy on the training split")
    add("--class-weight", choices=("balanced",), help="weight classes inversely to their frequency")
    add("--seed", type=int, default=0, help="makes every head reproducible (default 0)")
    add("--no-augment", dest="augment", action="store_false",
        help="ignore the cached augmented views (extract-features --augment) and train on the images alone")
    add("--validation-fraction", type=float, default=0.2, metavar="F",
        help="with no validation split in the cache: stratified share of training images held out (default 0.2)")
    add("--memory-budget", metavar="SIZE",
        help="features needing more memory than this (8G, 512M ...) are streamed from the cache, and only heads "
             "that stream train (default: half the memory available)")
    mlp = parser.add_argument_group(
        "mlp and finetune heads (defaults are the blog recipe's, but the input is standardized; finetune: "
        "docs/finetune.md)")
    mlp.add_argument("--hidden-units", type=int, help="units of the hidden layer (256)")
    mlp.add_argument("--dropout-rate", type=float, help="dropout after the hidden layer (0)")
    mlp.add_argument("--epochs", type=int, help="training epochs (10; finetune: of block5 and the head together)")
    mlp.add_argument("--learning-rate", type=float,
                     help="Adam's learning rate (0.001); finetune: SGD's, block5 and the head together (0.0001)")
    mlp.add_argument("--head-epochs", type=int,
                     help="finetune: epochs of its first step, the head alone on block5's frozen output (10)")
    mlp.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None,
                     help="stop when the validation loss stops improving; keep the best weights (mlp: off, finetune: on)")
    mlp.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                     help="the blog recipe's exact head: features as they are, not standardized inside the model")
    add("--weights", metavar="PATH",
        help="where the weights the cache was made with are now, if moved (finetune, and the other heads on "
             "--layer block4_pool maps, run block5 with them)")
    add("--out", metavar="DIR", help="folder for the artifacts (default: a new folder under heads/)")
    add("--mistakes", choices=MISTAKES, default="best",
        help="report.html shows the most confident mistakes of the best head (default) or of every head")
    add("--no-report", dest="report", action="store_false", help="do not write report.html (it costs a t-SNE map)")
    add("--export", metavar="FILE.keras",
        help=f"also write one Keras model, raw uint8 RGB images in, probabilities out ({', '.join(EXPORTABLE)})")
    add("--json", action="store_true", help="print the results as JSON on stdout")
    add("--quiet", action="store_true", help="print nothing but errors")
    add("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    refused = _refused_export(args)
    if refused:
        return console.fail(PROG, refused, console.USAGE)
    options = {name: getattr(args, name) for name in MLP_OPTIONS if getattr(args, name) is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HeadWarning)
        try:
            training = train_head(
                args.cache, args.head, config=args.config, out=args.out, search=args.search, cv=args.cv,
                class_weight=args.class_weight, seed=args.seed, validation_fraction=args.validation_fraction,
                augment=args.augment, memory_budget=args.memory_budget, report=args.report, mistakes=args.mistakes,
                progress=not (args.quiet or args.json), weights=args.weights, **options,
            )
        except ExtractError as error:
            return console.fail(PROG, error)
        except OSError as error:
            return console.fail(PROG, f"cannot write the head ({console.why(error)}); nothing was saved.", console.FAILED)
        except KeyboardInterrupt:
            return console.interrupted(PROG, "nothing was saved.")
        finally:
            for warning in caught:
                if issubclass(warning.category, HeadWarning) and not args.quiet:
                    print(f"{PROG}: warning: {console.printable(str(warning.message))}", file=sys.stderr)
    if args.export:
        saved = f"The head is saved in {str(training.folder)!r}."
        try:
            export_model(training.results[0].folder, args.export, weights=args.weights)
        except UsageError as error:
            return console.fail(PROG, f"{error} {saved}", console.status_of(error))
        except (ExtractError, OSError) as error:
            return console.fail(PROG, f"cannot write --export {args.export!r} ({console.why(error)}); nothing was "
                                      f"written there. {saved}", console.FAILED)
        except KeyboardInterrupt:
            return console.interrupted(PROG, f"--export was not written. {saved}")
        if not (args.json or args.quiet):
            names = labels_path(args.export)
            print(f"exported to {console.printable(args.export)} (class names in {console.printable(str(names))})",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(to_dict(training), indent=2))
    elif not args.quiet:
        print(console.printable(format_training(training, features_line(args.cache, training.fingerprint)), keep="\n"))
    return console.DONE


def _refused_export(args) -> str | None:
    """Why --export cannot be written, checked before training; None if it can."""
    if not args.export:
        return None
    if args.head == "all":
        return "--export needs one head (e.g. --head logreg), not --head all."
    if args.head not in EXPORTABLE:
        return f"A {args.head} head cannot be exported as one Keras model; export works for {', '.join(EXPORTABLE)}."
    if not args.export.endswith(".keras") or Path(args.export).is_dir():
        return f"Expected --export to name a .keras file; received {args.export!r}."
    if labels_path(args.export).is_dir():
        return (f"Expected {str(labels_path(args.export))!r}, where --export writes the class names, not to be "
                f"a folder; name another .keras file.")
    protected = (*cache_files(args.cache), ("--out", [args.out] if args.out else [], ()))
    for written in (args.export, labels_path(args.export)):  # the model, then its class names
        for what, files, folders in protected:
            hit = overwrites(written, files, folders)
            if hit is not None:
                return f"--export writes {str(written)!r}, which is {what} {hit!r}; name another .keras file."
    return None


def features_line(cache, fingerprint: str) -> str:
    """Which of the cache's feature configurations the heads trained on, in words, where
    the cache holds more than one ("" where it holds one, or cannot be read again)."""
    try:
        configs = list_configs(cache)
        used = next(config for config in configs if config["fingerprint"] == fingerprint)
    except (ExtractError, OSError, KeyError, StopIteration):  # read once already: changed since
        return ""
    others = len(configs) - 1
    if not others:
        return ""
    return (f"Features: configuration {fingerprint} ({describe(used)}); the cache holds {others} "
            f"other{'s' if others > 1 else ''}: --config FINGERPRINT to choose.")


def to_dict(training: Training) -> dict:
    return {
        "folder": str(training.folder),
        "fingerprint": training.fingerprint,
        "validation_source": training.validation_source,
        "training_images": training.training_images,
        "training_views": training.training_views,
        "streamed": training.streamed,
        "leaks": training.leaks,
        "report": training.report and str(training.report),
        "leaderboard": training.leaderboard(),
        "results": {result.head: {"scores": result.scores, "params": result.params, "search": result.search,
                                  "cross_validation": result.cross_validation} for result in training.results},
    }


def format_training(training: Training, features: str = "") -> str:
    """The results in words, under `features` (a line saying which features they are)."""
    lines = [features]
    if training.leaks:
        lines.append(f"warning: {leak_note(training.leaks)}")
    if training.validation_source == "drawn":
        lines.append("(no validation split in the cache: a stratified share of the training images was held out)")
    if training.streamed:
        lines.append("(the features do not fit in --memory-budget: the heads read them from the cache as they trained)")
    if training.training_views:
        lines.append(f"(trained on {training.training_images} images and {training.training_views} cached views of them; "
                     f"--no-augment ignores the views)")
    if len(training.results) == 1:
        result = training.results[0]
        for split, scores in result.scores.items():
            lines.append(format_scores(result.head, split, scores))
        if result.search:
            best = max(result.search, key=lambda row: row["validation_accuracy"])
            lines.append(f"search: best {best['params']} (validation accuracy {best['validation_accuracy']:.4f})")
        if result.cross_validation:
            lines.append(f"cross-validation ({result.cross_validation['folds']} folds): accuracy {_cv_line(result.summary())}")
        lines.append(f"fit: {result.fit_seconds:.2f} s; saved to {result.folder}")
    else:
        cv = any(result.cross_validation for result in training.results)
        lines.append(f"{'rank':<5}{'head':<15}{'val acc':>9}{'macro-F1':>10}{'log loss':>10}{'fit s':>9}"
                     + ("  cv accuracy" if cv else ""))
        for rank, row in enumerate(training.leaderboard(), 1):
            loss = "n/a" if row["log_loss"] is None else f"{row['log_loss']:.4f}"
            lines.append(f"{rank:<5}{row['head']:<15}{row['validation_accuracy']:>9.4f}{row['macro_f1']:>10.4f}"
                         f"{loss:>10}{row['fit_seconds']:>9.2f}" + (f"  {_cv_line(row)}" if cv else ""))
        lines.append(f"saved to {training.folder}/<head>/ (and leaderboard.json)")
    if training.report:
        lines.append(f"report: {training.report} (mistakes as thumbnails, a map of the features; open it in a browser)")
    return "\n".join(line for line in lines if line)


def _cv_line(row: dict) -> str:
    if "cv_accuracy_mean" not in row:
        return ""
    return f"{row['cv_accuracy_mean']:.4f} ± {row['cv_accuracy_std']:.4f}"


def run() -> None:
    """Console-script entry point (`console.run`: SIGTERM as Ctrl-C, a closed stdout ...)."""
    sys.exit(console.run(main, PROG))


if __name__ == "__main__":
    run()
