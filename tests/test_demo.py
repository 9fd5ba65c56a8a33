"""`make demo` (demo/run.py), small: 32 px and the test's weights, in a folder of its own.

The demo hands over to the commands: every command it prints runs as printed. A second run
on an unchanged cache computes nothing and says so; an image more changes what it compares.
The demo runs once for the module (about a minute on two cores), as the first test needs it.
"""

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest

from conftest import SIZE, make_image
from helpers import CHECK, EXTRACT, SCORE, TRAIN, call

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {"train-head": TRAIN, "score-images": SCORE, "check-data": CHECK}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, weights_file):
    """demo.run's main, run in a folder of its own; a function running it again there and
    returning its stdout, with the folder as `demo.folder`."""
    folder = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        from demo import run

        def again() -> str:
            out = io.StringIO()
            with patch.context() as inside, contextlib.redirect_stdout(out):
                inside.chdir(folder)
                assert run.main(["--input-size", str(SIZE), "--weights", str(weights_file)]) == 0
            return out.getvalue()

        again.folder, again.first, again.run = folder, again(), run
        yield again


def printed_commands(output: str) -> list[list[str]]:
    """The commands under the demo's closing "Next, ..." line, split as a shell splits them."""
    tail = output.split("\nNext, ", 1)[1].splitlines()[1:]
    return [shlex.split(line) for line in tail if line.startswith("  ")]


def test_the_commands_the_demo_prints_run_as_printed(demo):
    commands = printed_commands(demo.first)
    assert [command[0] for command in commands] == ["train-head", "score-images", "check-data"]
    for command in commands:
        assert command[command.index("--cache") + 1] == "cache/demo.h5", command
    assert commands[2][commands[2].index("--near-threshold") + 1] == "0.998"  # random weights at 32 px
    for command in commands:
        done = call(ENTRIES[command[0]], *command[1:], cwd=demo.folder)
        assert done.returncode == 0, (command, done.stderr)
    assert (demo.folder / "scores.csv").read_text().count("\n") == 361  # a header and the 360 test images


def test_a_rerun_on_an_unchanged_cache_computes_nothing_and_says_so(demo):
    state = (demo.folder / "heads/demo/state.json").read_text()
    second = demo()
    assert "Nothing new to compute" in second
    assert (demo.folder / "heads/demo/state.json").read_text() == state  # the heads were not trained again
    assert printed_commands(second) == printed_commands(demo.first)


def test_an_image_more_changes_the_cache_state_a_rerun_compares(demo, weights_file):
    """What makes a re-run train again (its training is the first run's, tested above)."""
    recorded = json.loads((demo.folder / "heads/demo/state.json").read_text())["cache"]
    assert demo.run.cache_state(demo.folder / "cache/demo.h5") == recorded
    make_image(demo.folder / "data/demo/train/3/new.png")
    done = call(EXTRACT, "data/demo", "--cache", "cache/demo.h5", "--input-size", str(SIZE), "--pooling", "avg",
                "--weights", str(weights_file), cwd=demo.folder)
    assert done.returncode == 0, done.stderr
    assert demo.run.cache_state(demo.folder / "cache/demo.h5") != recorded


def test_the_random_weights_note_keeps_the_url_whole(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from demo.run import random_weights_note

    url = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    note = random_weights_note(f"cannot download {url}: no network.")
    assert any(url in line for line in note.splitlines())


def test_the_report_picture_script_follows_the_demo():
    """demo/report_png.py (docs/report.png) takes the demo's data, cache and options from
    demo/run.py: it must still import when the demo changes (it once asked for a name the
    demo no longer had)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import demo.report_png as r; print(r.OPTIONS, r.CACHE)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'input_size': 64" in done.stdout and "cache/demo.h5" in done.stdout
