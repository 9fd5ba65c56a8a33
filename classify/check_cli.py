"""The `check-data` command: parse, call `classify.check.check_data` (or `nearest`), print.
Its exit statuses are every command's (`extract.console`, docs/exit-status.md)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from classify.check import LABEL_HEADS, NEAR_THRESHOLD, check_data, nearest
from classify.findings import DUPLICATES, LABEL_ISSUES, OUTLIERS, PAGE, Check
from extract import DEFAULT_CACHE, ExtractError, console, version

PROG = "check-data"


def build_parser() -> console.OneLineParser:
    parser = console.OneLineParser(
        prog=PROG,
        description="Check the data behind a feature cache, from the cached features alone: labels that look "
                    "wrong, exact and near duplicates (leaks between splits), outliers; or the images most like one.",
        epilog="example: check-data    (the cache train-head would use; writes checks/<time>-check/)",
    )
    add = parser.add_argument
    add("--cache", default=DEFAULT_CACHE, metavar="PATH", help=f"feature cache (default {DEFAULT_CACHE})")
    add("--config", metavar="FINGERPRINT", help="feature configuration in the cache (default: the last written)")
    add("--out", metavar="DIR", help="new folder for the CSVs and check.html (default: a new folder under checks/)")
    add("-k", type=int, default=10, metavar="K", help="nearest neighbours per image (default 10)")
    add("--near-threshold", type=float, default=NEAR_THRESHOLD, metavar="T",
        help=f"cosine similarity from which two images are near duplicates (default {NEAR_THRESHOLD})")
    add("--head", default="logreg", metavar="NAME",
        help=f"the head whose out-of-fold probabilities find label issues: {', '.join(LABEL_HEADS)} (default logreg)")
    add("--folds", type=int, default=5, metavar="F", help="folds of the out-of-fold probabilities (default 5)")
    add("--seed", type=int, default=0, help="makes the folds and the index reproducible (default 0)")
    add("--memory-budget", metavar="SIZE",
        help="features needing more than a quarter of this (8G, 512M ...) are read from the cache a block at a "
             "time (default: half the memory available)")
    add("--similar-to", metavar="IMAGE",
        help="instead: print the K cached images most like IMAGE (its features computed once, as the cache's were)")
    add("--weights", metavar="PATH", help="with --similar-to: where the weights the cache was made with are now, if moved")
    add("--json", action="store_true", help="print the results as JSON on stdout")
    add("--quiet", action="store_true", help="print nothing but errors")
    add("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.similar_to is not None and args.out is not None:  # else the files looked for are never written
        parser.error("--out is for the check's files; --similar-to prints its neighbours and writes nothing "
                     "(--json > FILE keeps them)")
    try:
        if args.similar_to is not None:
            found = nearest(args.similar_to, args.cache, config=args.config, k=args.k, weights=args.weights,
                            memory_budget=args.memory_budget)
        else:
            check = check_data(args.cache, config=args.config, out=args.out, k=args.k,
                               near_threshold=args.near_threshold, head=args.head, folds=args.folds,
                               memory_budget=args.memory_budget, seed=args.seed,
                               progress=not (args.quiet or args.json))
    except ExtractError as error:
        return console.fail(PROG, error)
    except OSError as error:
        return console.fail(PROG, f"cannot write the check ({console.why(error)}); nothing was saved.", console.FAILED)
    except KeyboardInterrupt:
        return console.interrupted(PROG, "nothing was saved.")
    if args.similar_to is not None:
        if args.json:
            print(json.dumps([asdict(neighbour) for neighbour in found], indent=2))
        elif not args.quiet:
            print(console.printable(format_neighbours(found), keep="\n"))
    elif args.json:
        print(json.dumps(to_dict(check), indent=2))
    elif not args.quiet:
        print(console.printable(summary(check), keep="\n"))
    return console.DONE


def to_dict(check: Check) -> dict:
    found = asdict(check)
    found["out"] = str(check.out)
    found["files"] = {name: str(check.out / name) for name in (LABEL_ISSUES, DUPLICATES, OUTLIERS, PAGE)
                      if (check.out / name).exists()}
    return found


def summary(check: Check) -> str:
    """One paragraph: what was checked, how many of each kind were found, where they are."""
    counts = check.counts
    classes = {label for split in check.classes.values() for label in split if label}
    labels = (f"{counts['label_issues']} label issue{'s' * (counts['label_issues'] != 1)} "
              f"({check.label_head} out-of-fold over {check.folds} folds, cleanlab); " if check.label_head else "")
    pairs = counts["exact"] + counts["near"]
    sentences = [
        f"Checked {check.images} images of configuration {check.fingerprint} ({len(classes)} classes).",
        f"Found {labels}{pairs} duplicate pair{'s' * (pairs != 1)}: {counts['exact']} exact, {counts['near']} near "
        f"(cosine >= {check.near_threshold:g}), {counts['leaks']} of them between train and validation or test "
        f"(leaks); {counts['outliers']} outlier{'s' * (counts['outliers'] != 1)} (mean distance to {check.k} "
        f"neighbours beyond the far fence).",
        *check.notes,
        f"Written to {check.out}/: {LABEL_ISSUES}, {DUPLICATES}, {OUTLIERS}"
        + (f", {PAGE} (open it in a browser)." if (check.out / PAGE).exists() else "."),
    ]
    return " ".join(sentences)


def format_neighbours(found) -> str:
    """One line per neighbour: its path and label escaped (`console.printable`), so that a
    file name holding a newline cannot break the table or forge a row of it."""
    show = console.printable
    lines = [f"{'similarity':>10}  {'split':<10} {'label':<12} path"]
    lines += [f"{n.similarity:>10.4f}  {show(n.split):<10} {show(n.label) or '-':<12} {show(n.path)}" for n in found]
    return "\n".join(lines)


def run() -> None:
    """Console-script entry point (`console.run`: SIGTERM as Ctrl-C, a closed stdout ...)."""
    sys.exit(console.run(main, PROG))


if __name__ == "__main__":
    run()
