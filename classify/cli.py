"""The stage-2 commands: `train-head` (calls `classify.train_head`) and `score-images`
(calls `classify.score_images`). Each parses, calls the library, prints."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import sys
import tempfile
import unicodedata
import warnings
from pathlib import Path

from classify.evaluation import format_scores
from classify.export import EXPORTABLE, export_model, labels_path
from classify.heads import HEADS
from classify.report import MISTAKES
from classify.artifacts import load_head, spreadsheet_cell
from classify.scoring import score_images
from classify.training import HeadWarning, Training, train_head
from extract import DEFAULT_CACHE, ENGINES, CacheError, ExtractError, UsageError, describe, list_configs, version
from extract.cli import OneLineParser

MLP_OPTIONS = ("hidden_units", "dropout_rate", "epochs", "learning_rate", "early_stopping", "standardize")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="train-head",
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
    mlp = parser.add_argument_group("mlp head (defaults are the blog recipe's, but its input is standardized)")
    mlp.add_argument("--hidden-units", type=int, help="units of the hidden layer (256)")
    mlp.add_argument("--dropout-rate", type=float, help="dropout after the hidden layer (0)")
    mlp.add_argument("--epochs", type=int, help="training epochs (10)")
    mlp.add_argument("--learning-rate", type=float, help="Adam's learning rate (0.001)")
    mlp.add_argument("--early-stopping", action="store_true", default=None,
                     help="stop when the validation loss stops improving; keep the best weights")
    mlp.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                     help="the blog recipe's exact head: features as they are, not standardized inside the model")
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
    if args.export and args.head == "all":
        return _fail("--export needs one head (e.g. --head logreg), not --head all.", 2)
    if args.export and args.head not in EXPORTABLE:
        return _fail(f"A {args.head} head cannot be exported as one Keras model; export works for "
                     f"{', '.join(EXPORTABLE)}.", 2)
    if args.export and (not args.export.endswith(".keras") or Path(args.export).is_dir()):
        return _fail(f"Expected --export to name a .keras file; received {args.export!r}.", 2)
    if args.export and labels_path(args.export).is_dir():
        return _fail(f"Expected {str(labels_path(args.export))!r}, where --export writes the class names, not to be "
                     f"a folder; name another .keras file.", 2)
    options = {name: getattr(args, name) for name in MLP_OPTIONS if getattr(args, name) is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HeadWarning)
        try:
            training = train_head(
                args.cache, args.head, config=args.config, out=args.out, search=args.search, cv=args.cv,
                class_weight=args.class_weight, seed=args.seed, validation_fraction=args.validation_fraction,
                augment=args.augment, memory_budget=args.memory_budget, report=args.report, mistakes=args.mistakes,
                progress=not (args.quiet or args.json), **options,
            )
        except (UsageError, CacheError) as error:
            return _fail(error, 2)
        except ExtractError as error:
            return _fail(error, 1)
        except OSError as error:
            return _fail(f"cannot write the head ({_why(error)}); nothing was saved.", 1)
        except KeyboardInterrupt:
            return _fail("interrupted; nothing was saved.", 130)
        finally:
            for warning in caught:
                if issubclass(warning.category, HeadWarning) and not args.quiet:
                    print(f"train-head: warning: {_printable(str(warning.message))}", file=sys.stderr)
    if args.export:
        try:
            export_model(training.results[0].folder, args.export)
        except (UsageError, CacheError) as error:
            return _fail(f"{error} The head is saved in {str(training.folder)!r}.", 2)
        except (ExtractError, OSError) as error:
            return _fail(f"cannot write --export {args.export!r} ({_why(error)}); nothing was written there. "
                         f"The head is saved in {str(training.folder)!r}.", 1)
        except KeyboardInterrupt:
            return _fail(f"interrupted; --export was not written. The head is saved in {str(training.folder)!r}.", 130)
        if not (args.json or args.quiet):
            print(f"exported to {_printable(args.export)} (class names in {_printable(str(labels_path(args.export)))})",
                  file=sys.stderr)
    if args.json:
        _print(json.dumps(to_dict(training), indent=2))
    elif not args.quiet:
        _print(_printable(format_training(training, features_line(args.cache, training.fingerprint)), keep="\n"))
    return 0


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
        "report": training.report and str(training.report),
        "leaderboard": training.leaderboard(),
        "results": {result.head: {"scores": result.scores, "params": result.params, "search": result.search,
                                  "cross_validation": result.cross_validation} for result in training.results},
    }


def format_training(training: Training, features: str = "") -> str:
    """The results in words, under `features` (a line saying which features they are)."""
    lines = [features]
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


def build_score_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="score-images",
        description="Label images with a trained head; one row per image, in input order.",
        epilog="example: score-images new_photos/ --head heads/20260101-120000-logreg --output scores.csv",
    )
    add = parser.add_argument
    add("paths", nargs="+", metavar="PATH", help="image files, folders (recursive), or @list.txt (a path a line)")
    add("--head", required=True, metavar="DIR", help="a head folder written by train-head")
    add("--cache", metavar="PATH",
        help=f"reuse features of images already in this cache (default: {DEFAULT_CACHE}, where it exists "
             f"and holds the head's configuration)")
    add("--weights", metavar="PATH", help="a local copy of the weights the head's features were made with")
    add("--top-k", type=int, default=3, metavar="K",
        help="the K most probable labels per image: the prediction, then the runners-up (default 3)")
    add("--output", metavar="FILE", help="write rows to FILE.csv or FILE.jsonl (default: CSV on stdout)")
    add("--format", choices=("csv", "jsonl"), help="output format (default: from --output's extension, else csv)")
    add("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    add("--engine", choices=ENGINES, default="local",
        help="local: threads and one model here (default); ray: a Ray Data job over a Ray cluster")
    add("--ray-address", metavar="ADDRESS",
        help="with --engine ray: the cluster to join (default: RAY_ADDRESS, else Ray is started here)")
    add("--quiet", action="store_true", help="no progress bar and no summary")
    add("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def score_main(argv=None) -> int:
    args = build_score_parser().parse_args(argv)
    kind = args.format or ("jsonl" if args.output and args.output.endswith(".jsonl") else "csv")
    counts = {"ok": 0, "error": 0}
    aside = None
    stdout = sys.stdout  # the rows go here; what libraries print meanwhile (Ray: "a worker died") to stderr
    try:  # everything is checked before --output is touched
        with contextlib.redirect_stdout(sys.stderr):
            if not args.output and stdout is None:
                raise UsageError("stdout is closed; pass --output FILE.")
            head = load_head(args.head)
            rows = score_images(args.paths, head, cache=args.cache or DEFAULT_CACHE,
                                cache_required=args.cache is not None, weights=args.weights, top_k=args.top_k,
                                batch_size=args.batch_size, engine=args.engine, ray_address=args.ray_address,
                                progress=not args.quiet)
            aside = _aside(args.output) if args.output else None
            stream = open(aside, "w", newline="", encoding="utf-8") if aside else stdout
            with stream if aside else _kept_open(stream):
                write = _row_writer(stream, kind, min(args.top_k, len(head.classes)), terminal=_is_terminal(stream))
                for row in rows:
                    write(row)
                    counts[row.status] += 1
            if aside:
                os.replace(aside, args.output)
                aside = None
    except (UsageError, CacheError) as error:
        return _fail(error, 2, "score-images")
    except ExtractError as error:
        return _fail(error, 1, "score-images")
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        _silence_stdout()
        return 0
    except OSError as error:
        where = f"--output {args.output!r}" if args.output else "stdout"
        kept = "; it is unchanged" if args.output and os.path.exists(args.output) else ""
        return _fail(f"cannot write {where} ({_why(error)}){kept}.", 1, "score-images")
    except KeyboardInterrupt:
        return _fail("interrupted" + (f"; --output {args.output!r} was not written." if args.output else "."),
                     130, "score-images")
    finally:
        if aside:
            _remove(aside)
    if not args.quiet:
        print(f"scored {counts['ok']} images, {counts['error']} errors", file=sys.stderr)
    if counts["ok"] == 0:
        return _fail("no image could be scored.", 1, "score-images")
    return 0


class _kept_open:
    """`with` for a stream the command does not own (stdout): flushed, never closed."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        self.stream.flush()


def _aside(output: str) -> str:
    """A new file beside --output to write into; renamed over --output when complete, so
    a failed or interrupted run leaves --output as it was, and two runs never interleave."""
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"--output {output!r} is a folder; name a file.")
    try:
        descriptor, path = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    except OSError as error:
        raise UsageError(f"Cannot write --output {output!r} ({_why(error)}).") from None
    os.close(descriptor)
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)  # as a file made by open() would be
    return path


def _row_writer(stream, kind: str, top_k: int, terminal: bool = False):
    """Rows as JSON lines (`label` and `probability`, the prediction, and `top`: the `top_k`
    most probable [label, probability] pairs, the prediction first; verbatim: JSON escapes
    what it must), or CSV (`label`, `probability`, then the runners-up as `label_2`,
    `probability_2` ... to rank `top_k`) with every text cell defended against spreadsheet
    formulas (OWASP: a cell starting with = + - @, tab or carriage return gets a leading '),
    and, on a terminal, control characters escaped."""
    if kind == "jsonl":
        def write(row):
            stream.write(json.dumps(row.to_dict()) + "\n")
        return write
    columns = ["path", "status", "label", "probability"]  # the prediction: rank 1
    for rank in range(2, top_k + 1):  # the runners-up
        columns += [f"label_{rank}", f"probability_{rank}"]
    writer = csv.writer(stream)
    writer.writerow(columns + ["error"])

    def cell(text: str | None) -> str:
        text = spreadsheet_cell(text or "")
        return _printable(text) if terminal else text

    def write(row):
        ranked = [value for label, probability in row.top[1:] for value in (cell(label), f"{probability:.6f}")]
        ranked += [""] * (2 * (top_k - 1) - len(ranked))
        probability = "" if row.probability is None else f"{row.probability:.6f}"
        writer.writerow([cell(row.path), row.status, cell(row.label), probability, *ranked, cell(row.error)])
    return write


def _printable(text: str, keep: str = "") -> str:
    """Text safe to show on a terminal: control characters (escape sequences, bidi
    overrides) as \\x.. / \\u.... escapes, except those in `keep`."""
    return "".join(
        char if char in keep or unicodedata.category(char) not in ("Cc", "Cf") else
        (f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")
        for char in text
    )


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _print(text: str) -> None:
    if sys.stdout is not None:
        print(text)
        sys.stdout.flush()


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the flush at exit fails no more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _why(error: Exception) -> str:
    return getattr(error, "strerror", None) or " ".join(str(error).split())[:200] or type(error).__name__


def _fail(error, status: int, prog: str = "train-head") -> int:
    kind = "" if status == 130 else "error: "  # an interrupt is no error: as extract-features says it
    print(f"{prog}: {kind}{error}", file=sys.stderr)
    return status


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # e.g. retracing notes when a search refits


def run() -> None:
    """Console-script entry point of train-head."""
    sys.exit(_entry(main, "train-head"))


def run_score() -> None:
    """Console-script entry point of score-images."""
    sys.exit(_entry(score_main, "score-images"))


def _entry(command, prog: str) -> int:
    """Run a command: SIGTERM as Ctrl-C, Ctrl-C outside the command's own handling one
    line and 130, a reader of stdout that went away (`| head`) a quiet exit."""
    _quiet_tensorflow()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = command()
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt
