"""The `score-images` command: parse, call `classify.score_images`, write the rows. Its exit
statuses are every command's (`extract.console`, docs/exit-status.md)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys

from classify.artifacts import load_head, spreadsheet_cell
from classify.scoring import score_images
from extract import (
    DEFAULT_CACHE, ENGINES, ExtractError, UsageError, console, describe, parse_storage_options, streamed, version,
    write_aside,
)

PROG = "score-images"


def build_parser() -> console.OneLineParser:
    parser = console.OneLineParser(
        prog=PROG,
        description="Label images with a trained head; one row per image, in input order.",
        epilog="example: score-images new_photos/ --head heads/20260101-120000-logreg --output scores.csv",
    )
    add = parser.add_argument
    add("paths", nargs="+", metavar="PATH",
        help="image files, shards (WebDataset .tar, .parquet: a row per sample), folders of them (recursive), "
             "s3:// gs:// https:// URLs of any of these, or @list.txt (a path a line)")
    add("--storage-options", metavar="JSON",
        help="fsspec options for URL inputs, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    add("--head", required=True, metavar="DIR", help="a head folder written by train-head")
    add("--cache", metavar="PATH",
        help=f"reuse features of images already in this cache (default: {DEFAULT_CACHE}, where it exists "
             f"and holds the head's configuration)")
    add("--weights", metavar="PATH", help="a local copy of the weights the head's features were made with")
    add("--top-k", type=int, default=3, metavar="K",
        help="the K most probable labels per image: the prediction, then the runners-up (default 3)")
    add("--output", metavar="FILE",
        help="write rows to FILE.csv or FILE.jsonl; '-' is stdout (default: CSV on stdout). A FIFO or a "
             "device such as /dev/stdout is written straight into, a file written aside and renamed over FILE")
    add("--format", choices=("csv", "jsonl"), help="output format (default: from --output's extension, else csv)")
    add("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    add("--engine", choices=ENGINES, default="local",
        help="local: threads and one model here (default); ray: a Ray Data job over a Ray cluster")
    add("--ray-address", metavar="ADDRESS",
        help="with --engine ray: the cluster to join (default: RAY_ADDRESS, else Ray is started here)")
    add("--quiet", action="store_true", help="no progress bar and no summary")
    add("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.output == "-":  # the usual name for stdout, never a file named '-' (that is ./-)
        args.output = None
    kind = args.format or ("jsonl" if args.output and args.output.endswith(".jsonl") else "csv")
    counts = {"ok": 0, "error": 0}
    stdout = sys.stdout  # the rows go here; what libraries print meanwhile (Ray: "a worker died") to stderr
    try:  # everything is checked before --output is touched
        with contextlib.redirect_stdout(sys.stderr):
            if not args.output and stdout is None:
                raise UsageError("stdout is closed; pass --output FILE.")
            storage_options = None if args.storage_options is None else parse_storage_options(args.storage_options)
            head = load_head(args.head)
            if not args.quiet:
                console.terminal_line(start_line(head, args.cache))
            rows = score_images(args.paths, head, cache=args.cache or DEFAULT_CACHE,
                                cache_required=args.cache is not None, weights=args.weights, top_k=args.top_k,
                                batch_size=args.batch_size, engine=args.engine, ray_address=args.ray_address,
                                storage_options=storage_options, progress=not args.quiet, output=args.output)
            with _destination(args.output, stdout) as stream:
                write = row_writer(stream, kind, min(args.top_k, len(head.classes)), terminal=_is_terminal(stream))
                for row in rows:
                    write(row)
                    counts[row.status] += 1
    except ExtractError as error:
        return console.fail(PROG, error)
    except BrokenPipeError:  # the reader of stdout went away: console.run ends quietly
        raise
    except OSError as error:
        where = f"--output {args.output!r}" if args.output else "stdout"
        kept = "; it is unchanged" if args.output and os.path.exists(args.output) and not streamed(args.output) else ""
        return console.fail(PROG, f"cannot write {where} ({console.why(error)}){kept}.", console.FAILED)
    except KeyboardInterrupt:
        return console.interrupted(PROG, _interrupted(args.output))
    if not args.quiet:
        print(f"scored {counts['ok']} images, {counts['error']} errors", file=sys.stderr)
    if counts["ok"] == 0:
        return console.fail(PROG, "no image could be scored.", console.FAILED)
    return console.DONE


def start_line(head, cache: str | None) -> str:
    """What the run works on, said before it starts: the head, its features, the cache reused."""
    reused = f"--cache {cache}" if cache else f"{DEFAULT_CACHE}, where it holds them"
    return (f"scoring with {head.folder} ({head.info['head']} head on configuration {head.fingerprint}: "
            f"{describe(head.info['feature_config'])}); features reused from {reused}")


def _interrupted(output: str | None) -> str:
    if not output:
        return ""
    if streamed(output):
        return f"--output {output!r} has the rows written so far."
    return f"--output {output!r} was not written."


@contextlib.contextmanager
def _destination(output: str | None, stdout):
    """The stream the rows go to: stdout (flushed, never closed), or a file written aside
    and renamed over --output when complete, so a failed or interrupted run leaves --output
    as it was, and two runs never interleave; a FIFO or device --output is written straight
    into (`extract.write_aside`)."""
    if not output:
        yield stdout
        stdout.flush()
        return
    with contextlib.ExitStack() as stack:
        try:  # its folder cannot hold it, or a stream cannot be opened: refused before any image is read
            aside = stack.enter_context(write_aside(output, f"--output {output!r}"))
            stream = stack.enter_context(open(aside, "w", newline="", encoding="utf-8"))
        except OSError as error:
            raise UsageError(f"Cannot write --output {output!r} ({console.why(error)}).") from None
        yield stream


def row_writer(stream, kind: str, top_k: int, terminal: bool = False):
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
        return console.printable(text) if terminal else text

    def write(row):
        ranked = [value for label, probability in row.top[1:] for value in (cell(label), f"{probability:.6f}")]
        ranked += [""] * (2 * (top_k - 1) - len(ranked))
        probability = "" if row.probability is None else f"{row.probability:.6f}"
        writer.writerow([cell(row.path), row.status, cell(row.label), probability, *ranked, cell(row.error)])
    return write


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run() -> None:
    """Console-script entry point (`console.run`: SIGTERM as Ctrl-C, a closed stdout ...)."""
    sys.exit(console.run(main, PROG))


if __name__ == "__main__":
    run()
