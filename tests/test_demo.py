"""`make demo` (demo/run.py), small: 32 px and the test's weights, in a folder of its own.

The demo hands over to the commands: every command it prints runs as printed. A second run
on an unchanged cache computes nothing and says so; a changed cache trains again.
"""

import contextlib
import io
import shlex
from pathlib import Path

import pytest

from conftest import make_image
from helpers import CHECK, SCORE, TRAIN, call

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {"train-head": TRAIN, "score-images": SCORE, "check-data": CHECK}


@pytest.fixture
def demo(tmp_path, weights_file, monkeypatch):
    """demo.run's main in tmp_path, small; returns a function that runs it and gives its stdout."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(tmp_path)
    from demo import run

    def once() -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert run.main(["--input-size", "32", "--weights", str(weights_file)]) == 0
        return out.getvalue()

    return once


def printed_commands(output: str) -> list[list[str]]:
    """The commands under the demo's closing "Next, ..." line, split as a shell splits them."""
    tail = output.split("\nNext, ", 1)[1].splitlines()[1:]
    return [shlex.split(line) for line in tail if line.startswith("  ")]


def test_the_commands_the_demo_prints_run_as_printed_and_a_rerun_computes_nothing(demo, tmp_path):
    first = demo()
    commands = printed_commands(first)
    assert [command[0] for command in commands] == ["train-head", "score-images", "check-data"]
    for command in commands:
        assert command[command.index("--cache") + 1] == "cache/demo.h5", command
    assert commands[2][commands[2].index("--near-threshold") + 1] == "0.998"  # the test's weights are random
    for command in commands:
        done = call(ENTRIES[command[0]], *command[1:], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
    assert (tmp_path / "scores.csv").read_text().count("\n") == 361  # a header and the 360 test images

    state = (tmp_path / "heads/demo/state.json").read_text()
    second = demo()
    assert "Nothing new to compute" in second
    assert (tmp_path / "heads/demo/state.json").read_text() == state  # the heads were not trained again
    assert printed_commands(second) == commands


def test_a_changed_cache_trains_the_demo_heads_again(demo, tmp_path):
    demo()
    before = (tmp_path / "heads/demo/state.json").read_text()
    make_image(tmp_path / "data/demo/train/3/new.png")  # one image more
    again = demo()
    assert "Nothing new to compute" not in again
    assert "Training every head" in again
    assert (tmp_path / "heads/demo/state.json").read_text() != before


def test_the_random_weights_note_keeps_the_url_whole(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from demo.run import random_weights_note

    url = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    note = random_weights_note(f"cannot download {url}: no network.")
    assert any(url in line for line in note.splitlines())
