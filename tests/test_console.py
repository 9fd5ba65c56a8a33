"""One exit-status table for the three commands (extract/console.py, docs/exit-status.md):
each command, run the same way, ends with the same status and at most one line on stderr.

    0 done; 1 ran but failed (here: a damaged cache); 2 usage or bad input; 130 interrupted;
    a reader of stdout that went away: a quiet 0.

Statuses of main() are asserted in this process; the interrupt and the closed stdout, whose
handling is the console-script entry point's, on the command as a process of its own."""

import importlib
import os
import signal
import time

import pytest

import helpers
from conftest import SIZE, make_dataset, make_image, write_synthetic_cache
from extract.console import printable
from helpers import EXTRACT, SCORE, TRAIN, listing, one_line

COMMANDS = (EXTRACT, TRAIN, SCORE)


@pytest.fixture(scope="module")
def world(tmp_path_factory, weights_file):
    """6 images extracted at 32 px and a logreg head on them, a synthetic cache, 200 tiny
    images (a run long enough to interrupt) and a cache file of garbage bytes."""
    from classify import train_head
    from extract import extract_features

    root = tmp_path_factory.mktemp("console")
    make_dataset(root / "data")
    extract_features(root / "data", root / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    train_head(root / "c.h5", "logreg", out=root / "head", report=False)
    write_synthetic_cache(root / "s.h5", {"train": (("a", "b"), 20), "validation": (("a", "b"), 6)})
    for i in range(200):
        make_image(root / "many" / f"{i:03d}.png", seed=i, size=(12, 12))
    (root / "garbage.h5").write_bytes(os.urandom(4096))
    return root


def arguments(entry, case: str, world, tmp_path, weights_file) -> list:
    """The command line of `entry` for one row of the table."""
    if entry == EXTRACT:
        extract = ["--weights", weights_file, "--input-size", SIZE, "--quiet"]
        return {
            "done": [world / "data", "--cache", tmp_path / "c.h5", *extract],
            "bad input": [tmp_path / "missing", "--cache", tmp_path / "c.h5", *extract],
            "cache error": [world / "data", "--cache", world / "garbage.h5", *extract],
            "busy": [world / "many", "--cache", tmp_path / "c.h5", "--batch-size", "1", *extract],
            "stdout": [world / "data", "--cache", tmp_path / "c.h5", *extract, "--json"],
        }[case]
    if entry == TRAIN:
        out = ["--out", tmp_path / "run", "--quiet"]
        return {
            "done": ["--cache", world / "s.h5", "--head", "logreg", "--no-report", *out],
            "bad input": ["--cache", world / "s.h5", "--head", "nope", *out],
            "cache error": ["--cache", world / "garbage.h5", "--head", "logreg", *out],
            "busy": ["--cache", world / "s.h5", "--head", "mlp", "--epochs", "10000", *out],
            "stdout": ["--cache", world / "s.h5", "--head", "logreg", "--no-report", *out, "--json"],
        }[case]
    head = ["--head", world / "head", "--quiet"]
    return {
        "done": [world / "data", *head],
        "bad input": [world / "data", "--head", tmp_path / "no-head", "--quiet"],
        "cache error": [world / "data", *head, "--cache", world / "garbage.h5"],
        "busy": [world / "many", *head, "--batch-size", "1", "--output", tmp_path / "out.csv"],
        "stdout": [world / "data", *head],
    }[case]


BUSY = {EXTRACT: "c.h5.shards/*/pending/batch-*.npz", TRAIN: "run.partial-*", SCORE: ".out.csv.partial-*"}


@pytest.mark.parametrize("entry", COMMANDS)
def test_done_is_0(world, tmp_path, weights_file, entry):
    done = helpers.call(entry, *arguments(entry, "done", world, tmp_path, weights_file), cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("entry", COMMANDS)
def test_a_usage_error_is_2(world, tmp_path, weights_file, entry):
    done = helpers.call(entry, *arguments(entry, "done", world, tmp_path, weights_file), "--no-such-option",
                        cwd=tmp_path)
    one_line(done, 2, f"{helpers.NAMES[entry]}: error: unrecognized arguments: --no-such-option")


@pytest.mark.parametrize("entry", COMMANDS)
def test_bad_input_is_2(world, tmp_path, weights_file, entry):
    done = helpers.call(entry, *arguments(entry, "bad input", world, tmp_path, weights_file), cwd=tmp_path)
    one_line(done, 2, f"{helpers.NAMES[entry]}: error: ")


@pytest.mark.parametrize("entry", COMMANDS)
def test_a_cache_error_is_1(world, tmp_path, weights_file, entry):
    done = helpers.call(entry, *arguments(entry, "cache error", world, tmp_path, weights_file), cwd=tmp_path)
    one_line(done, 1, f"{helpers.NAMES[entry]}: error: ", "garbage.h5")
    assert (world / "garbage.h5").stat().st_size == 4096  # refused, not replaced


@pytest.mark.parametrize("entry", COMMANDS)
def test_sigterm_is_130(world, tmp_path, weights_file, entry):
    process = helpers.start(entry, *arguments(entry, "busy", world, tmp_path, weights_file), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not listing(tmp_path, BUSY[entry]):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    time.sleep(0.3)  # into the work
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.startswith(f"{helpers.NAMES[entry]}: interrupted") and err.count("\n") == 1, err


def _reader_gone(entry: str):
    """An entry point for helpers.run: stdout a pipe whose reader has gone (as `| head -c10`
    leaves it), then the command's own entry point."""
    def child():
        read, write = os.pipe()
        os.close(read)
        os.dup2(write, 1)
        os.close(write)
        module, name = entry.split(":")
        getattr(importlib.import_module(module), name)()
    return child


GONE = {EXTRACT: "extract_reader_gone", TRAIN: "train_reader_gone", SCORE: "score_reader_gone"}
extract_reader_gone, train_reader_gone, score_reader_gone = (_reader_gone(entry) for entry in COMMANDS)


@pytest.mark.parametrize("entry", COMMANDS)
def test_a_reader_of_stdout_that_went_away_is_a_quiet_0(world, tmp_path, weights_file, entry):
    done = helpers.run(f"test_console:{GONE[entry]}", *arguments(entry, "stdout", world, tmp_path, weights_file),
                       cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("text, shown", [
    ("plain words, 猫 é ß \u00a0", "plain words, 猫 é ß \u00a0"),  # letters of any script, spaces: as they are
    ("a\x1b]0;owned\x07\x1b[2J", "a\\x1b]0;owned\\x07\\x1b[2J"),  # escape sequences, a bell
    ("two\nlines\r\t", "two\\nlines\\r\\t"),
    ("name\u202egnp.exe", "name\\u202egnp.exe"),  # a bidi override (Cf)
    ("para\u2028graph", "para\\u2028graph"),  # a line separator
    ("odd\udcff", "odd\\udcff"),  # a byte that was not UTF-8 (surrogate escape)
])
def test_printable_escapes_what_a_terminal_would_act_on(text, shown):
    assert printable(text) == shown


def test_printable_keeps_what_it_is_told_to():
    assert printable("one\ntwo\x1b", keep="\n") == "one\ntwo\\x1b"
