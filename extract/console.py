"""The console side the commands share (extract-features, train-head, score-images, check-data):
the argument parser, text safe for a terminal, the failure line, the exit statuses and the
console-script entry point. docs/exit-status.md is the table in words:

    0    done (images that could not be read are recorded failures, unless --strict)
    1    ran but failed: nothing could be done, --strict with failures, or an error met
         while working (a cache error, weights unavailable, a write that failed, Ray)
    2    usage or bad input, refused before any work (argparse, `UsageError`)
    130  interrupted (Ctrl-C, SIGTERM); what was done is kept

A reader of stdout that goes away (`| head`) is a quiet exit with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import unicodedata
from typing import Callable

from extract.errors import UsageError

DONE, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})  # Unicode categories printable() escapes


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {printable(message)} (see --help)\n")


def printable(text: str, keep: str = "") -> str:
    """`text` safe to show on a terminal: control characters (an escape sequence, a newline),
    format characters (a bidi override), line separators and bytes that were not UTF-8
    (surrogate escapes) written as Python escapes (\\x1b, \\n, \\u202e, \\udcff), but for those
    in `keep`; everything else, letters of any script included, as it is."""
    if text.isprintable():
        return text
    return "".join(char if char in keep or unicodedata.category(char) not in _ESCAPED else ascii(char)[1:-1]
                   for char in text)


def terminal_line(line: str) -> None:
    """A line of progress on stderr where it is a terminal, as tqdm's bars (disable=None):
    in a log, or under a test, errors stay one line."""
    stream = sys.stderr
    if stream is not None and getattr(stream, "isatty", lambda: False)():
        print(printable(line), file=stream, flush=True)


def why(error: Exception) -> str:
    """What went wrong with a write or read, in a few words: the OS's reason (`strerror`) where
    there is one, else the error's own text on one line, cut to 200 characters."""
    return getattr(error, "strerror", None) or " ".join(str(error).split())[:200] or type(error).__name__


def status_of(error: BaseException) -> int:
    """The exit status an error ends a command with: 2 for a `UsageError`, else 1."""
    return USAGE if isinstance(error, UsageError) else FAILED


def fail(prog: str, error, status: int | None = None) -> int:
    """Print `<prog>: error: <error>` on stderr, one line; return `status`, by default the
    error's (`status_of`)."""
    print(f"{prog}: error: {printable(str(error))}", file=sys.stderr)
    return status_of(error) if status is None else status


def interrupted(prog: str, kept: str = "") -> int:
    """Print `<prog>: interrupted` and what `kept` says was kept (or not); return 130."""
    print(f"{prog}: interrupted{'; ' + kept if kept else '.'}", file=sys.stderr)
    return INTERRUPTED


def run(main: Callable[[], int], prog: str) -> int:
    """A command's console-script entry point, up to its exit: returns the status of
    `main()`, except that SIGTERM (a batch scheduler's stop) is Ctrl-C, Ctrl-C that `main`
    does not handle is one line and 130, and a reader of stdout that went away ends
    quietly with 0. TensorFlow's start-up and retracing notes are kept off stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = main()
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return DONE
    except KeyboardInterrupt:
        return interrupted(prog)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _silence_stdout() -> None:
    """After a broken pipe: stdout to /dev/null, so that the flush at exit fails no more
    (Python's docs on SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass
