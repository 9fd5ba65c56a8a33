"""Hostile input and faults for stage 2, on the real commands: a head folder changed under
the loader, concurrent runs, bad options, interrupts, a full disk, odd files and names. Each
error is one line on stderr, without a traceback, and destroys nothing. A command's main()
runs in this process, or in a process of its own where the process is the subject (signals,
two at once, a full disk, a terminal, a closed stdout) or a FIFO could hang it."""

import csv
import hashlib
import json
import os
import pickle
import pty
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from classify import train_head
from conftest import SIZE, make_dataset, make_image, write_synthetic_cache
from extract import extract_features
from helpers import SCORE, TRAIN, command_line as command, listing, one_line, wait_for


def train(*args, cwd=None) -> subprocess.CompletedProcess:
    """train-head's main() in this process."""
    return helpers.call(TRAIN, *args, cwd=cwd)


def score(*args, cwd=None) -> subprocess.CompletedProcess:
    """score-images' main() in this process."""
    return helpers.call(SCORE, *args, cwd=cwd)


def score_apart(*args, timeout=60) -> subprocess.CompletedProcess:
    """score-images in a process of its own, ended after `timeout` (where a FIFO could hang it)."""
    return helpers.run(SCORE, *args, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory, weights_file):
    """A real extraction of 3 classes at 32 px, a logreg head on it, a synthetic cache, and
    a few new images."""
    root = tmp_path_factory.mktemp("hostile")
    make_dataset(root / "data", per_class=4, classes=("cat", "dog", "fox"))
    extract_features(root / "data", root / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    train_head(root / "c.h5", "logreg", out=root / "head")
    for i in range(3):
        make_image(root / "new" / f"{i}.png", seed=700 + i)
    write_synthetic_cache(root / "s.h5", {"train": (("a", "b"), 20), "validation": (("a", "b"), 6)})
    write_synthetic_cache(root / "d.h5", {"train": (("a", "b", "c"), 6)})  # no validation split: one is drawn
    return root


def copy_head(world: Path, target: Path) -> Path:
    shutil.copytree(world / "head", target)
    return target


def rewrite_sums(folder: Path) -> None:
    """What someone who rewrites the whole folder does: SHA256SUMS made to match."""
    names = sorted(path.name for path in folder.iterdir() if path.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in names)
        + "".join(f"# size {(folder / name).stat().st_size}  {name}\n" for name in names))


def score_new(world: Path, head: Path, *extra) -> subprocess.CompletedProcess:
    return score(world / "new", "--head", head, "--quiet", *extra)


# 1. head.joblib read once: checked bytes are the unpickled bytes

class Plant:
    """A pickle that, when loaded, creates the file at `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_head_joblib_swapped_after_its_check_is_never_unpickled(world, tmp_path):
    """An audit hook swaps head.joblib for a foreign pickle when the loader opens the next
    file after it (by then it has hashed it): the loader must unpickle the bytes it checked,
    never open the file again."""
    head, marker = copy_head(world, tmp_path / "head"), tmp_path / "planted"
    foreign = pickle.dumps(Plant(str(marker)))
    script = f"""
import sys
from pathlib import Path
from classify.score_cli import run as run_score
target, foreign, state = {str(head / 'head.joblib')!r}, {foreign!r}, {{"seen": False, "busy": False}}
def hook(event, args):
    if event != "open" or state["busy"] or isinstance(args[0], int):
        return
    if state["seen"] and str(args[0]) != target:
        state["busy"] = True
        Path(target).write_bytes(foreign)
        state["swapped"] = True
    elif str(args[0]) == target:
        state["seen"] = True
sys.addaudithook(hook)
run_score()
"""
    result = subprocess.run([sys.executable, "-c", script, world / "new", "--head", head, "--quiet"], capture_output=True,
                            text=True, timeout=180)  # a plain subprocess: an audit hook stays for the process's life
    assert not marker.exists(), "a pickle other than the checked one was loaded"
    assert result.returncode == 0, result.stderr


# 2. head.json covered, its classes and schema checked

def test_rotated_classes_in_head_json_are_refused(world, tmp_path):
    head = copy_head(world, tmp_path / "head")
    info = json.loads((head / "head.json").read_text())
    info["classes"] = info["classes"][1:] + info["classes"][:1]
    (head / "head.json").write_text(json.dumps(info))
    one_line(score_new(world, head), 2, "head.json", "changed after training")
    rewrite_sums(head)  # the checksums made to match: the classes are still the model's
    one_line(score_new(world, head), 2, "refusing to relabel")


@pytest.mark.parametrize("content", ["[]", "drop feature_config", "not json", "bare feature_config", "bad input_size"])
def test_a_malformed_head_json_is_one_line(world, tmp_path, content):
    head = copy_head(world, tmp_path / "head")
    info = json.loads((head / "head.json").read_text())
    if content == "drop feature_config":
        del info["feature_config"]
        content = json.dumps(info)
    elif content == "bare feature_config":
        info["feature_config"] = {"feature_shape": info["feature_config"]["feature_shape"]}
        content = json.dumps(info)
    elif content == "bad input_size":
        info["feature_config"]["input_size"] = "big"
        content = json.dumps(info)
    (head / "head.json").write_text(content)
    rewrite_sums(head)
    one_line(score_new(world, head), 2, "retrain")


def test_a_head_without_sha256sums_is_told_to_retrain(world, tmp_path):
    head = copy_head(world, tmp_path / "head")
    (head / "SHA256SUMS").unlink()
    one_line(score_new(world, head), 2, "no SHA256SUMS", "retrain")


def test_a_fifo_in_a_head_folder_is_refused_not_waited_on(world, tmp_path):
    head = copy_head(world, tmp_path / "head")
    (head / "head.joblib").unlink()
    os.mkfifo(head / "head.joblib")
    one_line(score_apart(world / "new", "--head", head, "--quiet"), 2, "not a regular file")


# 4. concurrent train-head runs to one --out

def test_two_runs_to_one_out_never_lose_a_result_silently(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty folder may be --out: both runs pass the first check
    arguments = ("--cache", world / "s.h5", "--head", "knn", "--out", out, "--quiet")
    runs = [helpers.start(TRAIN, *arguments) for _ in range(2)]
    results = [process.communicate(timeout=180) + (process.returncode,) for process in runs]
    assert sorted(status for _, _, status in results) == [0, 2], results
    (loser,) = [err for _, err, status in results if status == 2]
    assert loser.count("\n") == 1 and "Traceback" not in loser and "--out" in loser
    listed = [line for line in (out / "SHA256SUMS").read_text().splitlines() if not line.startswith("#")]
    for line in listed:
        digest, name = line.split("  ")
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert not list(tmp_path.glob("run.partial-*"))


# 5. score-images validates before touching --output

@pytest.mark.parametrize("bad", [["--head", "nope"], ["--top-k", "0"], ["--batch-size", "0"], ["@missing.txt"]])
def test_bad_arguments_leave_output_as_it_was(world, tmp_path, bad):
    previous = tmp_path / "prev.csv"
    previous.write_text("precious\n")
    arguments = [world / "new", "--head", world / "head", *bad, "--output", previous, "--quiet"]
    result = helpers.run(SCORE, *arguments, cwd=tmp_path)  # through the console entry point, as installed
    one_line(result, 2)
    assert previous.read_text() == "precious\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prev.csv"]


# 6. one line, no traceback

def test_a_list_that_includes_itself_is_one_line(world, tmp_path):
    (tmp_path / "a.txt").write_text(f"{world / 'new' / '0.png'}\n@{tmp_path / 'b.txt'}\n")
    (tmp_path / "b.txt").write_text(f"@{tmp_path / 'a.txt'}\n")
    one_line(score(f"@{tmp_path / 'a.txt'}", "--head", world / "head", "--quiet"), 2, "includes itself")


def test_a_list_that_is_not_utf8_is_one_line(world, tmp_path):
    (tmp_path / "list.txt").write_bytes(b"caf\xe9.png\n")
    one_line(score(f"@{tmp_path / 'list.txt'}", "--head", world / "head", "--quiet"), 2, "not UTF-8", "0xe9")


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "Expected --seed between 0 and 4294967295; received -1."),
    ("--hidden-units", "0", "Expected --hidden-units between 1 and 65536; received 0."),
    ("--dropout-rate", "1.0", "Expected --dropout-rate between 0 and 1 (1 excluded); received 1.0."),
    ("--epochs", "0", "Expected --epochs between 1 and 10000; received 0."),
    ("--learning-rate", "-1", "Expected --learning-rate between 0 and 10 (0 excluded); received -1.0."),
    ("--cv", "1000", "Expected --cv between 2 and 100; received 1000."),
    ("--validation-fraction", "0.01", "--validation-fraction 0.01 holds out 1 of 18 training images"),
])
def test_numeric_options_out_of_bounds_are_refused(world, tmp_path, option, value, message):
    result = train("--cache", world / "d.h5", "--head", "mlp", option, value, "--out", tmp_path / "run", "--quiet")
    one_line(result, 2, message)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run.partial-*"))


def test_an_out_that_is_a_file_or_unwritable_is_one_line(world, tmp_path):
    (tmp_path / "file").write_text("mine")
    one_line(train("--cache", world / "s.h5", "--head", "knn", "--out", tmp_path / "file", "--quiet"), 2, "not a folder")
    assert (tmp_path / "file").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    try:
        result = subprocess.run([*prefix, *command(TRAIN, "--cache", world / "s.h5", "--head", "knn", "--out", locked / "run",
                                                   "--quiet")], capture_output=True, text=True, timeout=180)
    finally:
        locked.chmod(0o755)
    one_line(result, 2, "Cannot write")
    assert not list(locked.iterdir())


def test_a_full_disk_under_out_leaves_nothing(world, tmp_path):
    result = helpers.run(TRAIN, "--cache", world / "s.h5", "--head", "logreg", "--out", tmp_path / "run", "--quiet",
                         file_size_limit=2000)
    one_line(result, 1, "File too large", "nothing was saved")
    assert sorted(tmp_path.iterdir()) == []


def test_a_full_disk_under_export_keeps_the_old_model(world, tmp_path):
    model = tmp_path / "m.keras"
    model.write_bytes(b"the old model")
    result = helpers.run(TRAIN, "--cache", world / "c.h5", "--head", "logreg", "--out", tmp_path / "run",
                         "--export", model, "--quiet", file_size_limit=2_000_000)
    one_line(result, 1, "File too large", "The head is saved in")
    assert model.read_bytes() == b"the old model"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.keras", "run"]
    assert score(world / "new", "--head", tmp_path / "run", "--quiet").returncode == 0


def test_an_export_name_that_is_not_keras_is_refused_before_training(world, tmp_path):
    result = train("--cache", world / "c.h5", "--head", "logreg", "--out", tmp_path / "run", "--export", tmp_path / "m.h5",
                   "--quiet")
    one_line(result, 2, "Expected --export to name a .keras file")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_train_head_is_one_line_and_leaves_nothing(world, tmp_path):
    process = helpers.start(TRAIN, "--cache", world / "s.h5", "--head", "mlp", "--epochs", "10000",
                            "--out", tmp_path / "run", "--quiet")
    # 3 s after the run's folder appears: into the epochs even on loaded cores (at 0.5 s a loaded suite
    # interrupted TensorFlow's first trace of the model: a TypeError once, a process that hung once)
    helpers.ctrl_c(process, tmp_path, "run.partial-*", 3)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_score_images_is_one_line_and_keeps_the_output(world, tmp_path):
    for i in range(300):
        make_image(tmp_path / "many" / f"{i:03d}.png", seed=i, size=(12, 12))
    output = tmp_path / "out.csv"
    output.write_text("precious\n")
    process = helpers.start(SCORE, tmp_path / "many", "--head", world / "head", "--batch-size", "1",
                            "--output", output, "--quiet")
    helpers.ctrl_c(process, tmp_path, ".out.csv.partial-*", 0.3)
    assert output.read_text() == "precious\n" and not list(tmp_path.glob(".out.csv.partial-*"))


@pytest.mark.parametrize("entry", ["train", "score"])
def test_a_reader_that_went_away_is_a_quiet_exit(world, tmp_path, entry):
    """stdout a pipe whose reader has gone (as `| head -c10` leaves it): no traceback."""
    if entry == "train":
        arguments = command(TRAIN, "--cache", world / "s.h5", "--head", "knn", "--json", "--out", tmp_path / "run")
    else:
        arguments = command(SCORE, world / "new", "--head", world / "head", "--quiet", "--format", "jsonl")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(arguments, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=180)
    finally:
        os.close(writer)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_closed_stdout_is_one_line(world):
    result = subprocess.run(command(SCORE, world / "new", "--head", world / "head", "--quiet"), capture_output=True,
                            text=True, timeout=180, preexec_fn=lambda: os.close(1))
    one_line(result, 2, "stdout is closed")


# 7. --head all with heads that cannot be trained on the data

def test_head_all_on_two_images_a_class_trains_what_it_can(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 2), "validation": (("a", "b"), 2)})
    result = train("--cache", cache, "--head", "all", "--epochs", "1", "--out", tmp_path / "run", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warned = [line for line in result.stderr.splitlines() if "cannot be trained" in line]
    assert any(line.startswith("train-head: warning: linear-svm cannot be trained") for line in warned), result.stderr
    board = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    trained = {row["head"] for row in board}
    assert "linear-svm" not in trained and {"mlp", "logreg", "knn", "random-forest"} <= trained
    assert len(trained) + len(warned) == 8
    assert json.loads(result.stdout)["leaderboard"] == board


# 8. names: safe on a terminal, defended in CSV, verbatim in JSONL

@pytest.fixture(scope="module")
def odd_names(world):
    folder = world / "odd"
    names = ["\x1b]0;owned\x07\x1b[31mred.png", "=HYPERLINK(\"http:x\").png", "+1.png", "-1.png"]
    for i, name in enumerate(names):
        make_image(folder / name, seed=800 + i)
    (folder / "list.txt").write_text("".join(f"{name}\n" for name in names))  # relative: each path is the name
    return folder, names


def test_escape_sequences_in_names_never_reach_the_terminal(world, odd_names):
    folder, names = odd_names
    leader, follower = pty.openpty()
    process = subprocess.Popen(command(SCORE, "@list.txt", "--head", world / "head", "--quiet"), cwd=folder,
                               stdout=follower, stderr=subprocess.PIPE)  # a plain subprocess: its stdout a terminal
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        shown += chunk
    process.wait(timeout=120)
    os.close(leader)
    assert process.returncode == 0
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"\\x1b]0;owned\\x07\\x1b[31mred.png" in shown


def test_csv_cells_cannot_become_formulas_and_jsonl_is_verbatim(world, odd_names, tmp_path):
    folder, names = odd_names
    result = score("@list.txt", "--head", world / "head", "--quiet", "--output", tmp_path / "s.csv", cwd=folder)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "s.csv", newline="") as file:
        paths = [row["path"] for row in csv.DictReader(file)]
    assert paths == [names[0], "'" + names[1], "'" + names[2], "'" + names[3]]
    result = score("@list.txt", "--head", world / "head", "--quiet", "--format", "jsonl", cwd=folder)
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == names


# 9. a FIFO or a device named as an image

def test_a_fifo_or_a_device_is_an_error_row(world, tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    result = score_apart(tmp_path / "x.jpg", tmp_path / "zero.jpg", world / "new" / "0.png", "--head", world / "head",
                         "--quiet", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["status"] for row in rows] == ["error", "error", "ok"]


def test_a_cache_that_is_a_fifo_is_not_waited_on(world, tmp_path):
    os.mkfifo(tmp_path / "c.h5")
    result = score_apart(world / "new", "--head", world / "head", "--cache", tmp_path / "c.h5", "--quiet")
    one_line(result, 1, "No feature cache")  # a cache error, as in every command (docs/exit-status.md)


def test_a_list_that_is_a_fifo_is_one_line(world, tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    one_line(score_apart(f"@{tmp_path / 'list.txt'}", "--head", world / "head", "--quiet"), 2, "not a regular file")


# the hostile pass

@pytest.mark.parametrize("option, value", [("--top-k", "1000000000"), ("--batch-size", "1000000000")])
def test_absurd_sizes_are_refused(world, option, value):
    one_line(score_new(world, world / "head", option, value), 2, f"Expected {option} between 1 and")


def test_top_k_beyond_the_classes_lists_the_classes(world, tmp_path):
    result = score_new(world, world / "head", "--top-k", "50", "--output", tmp_path / "s.csv")
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["label_3", "probability_3", "error"]


def test_an_output_that_is_a_folder_is_refused_before_work(world, tmp_path):
    one_line(score_new(world, world / "head", "--output", tmp_path), 2, "is a folder")


def test_two_scorers_to_one_output_leave_one_whole_file(world, tmp_path):
    output = tmp_path / "s.jsonl"
    inputs = [[world / "new"], [world / "data" / "train"]]
    runs = [helpers.start(SCORE, *paths, "--head", world / "head", "--quiet", "--output", output) for paths in inputs]
    assert [process.wait(timeout=180) for process in runs] == [0, 0]
    rows = sorted(json.loads(line)["path"] for line in output.read_text().splitlines())
    assert rows in [sorted(map(str, paths[0].rglob("*.png"))) for paths in inputs]
    assert not list(tmp_path.glob(".s.jsonl.partial-*"))


def test_an_output_keeps_the_usual_permissions(world, tmp_path):
    result = score_new(world, world / "head", "--output", tmp_path / "s.csv")
    assert result.returncode == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "s.csv").stat().st_mode & 0o777 == 0o666 & ~mask


# 9. score-images --output never writes over what the run reads (issue 29, 2)

def copy_cache(world: Path, catalog: Path) -> Path:
    """The real cache, catalog and shards, under another name (the shards' paths are relative)."""
    shutil.copyfile(world / "c.h5", catalog)
    shutil.copytree(world / "c.h5.shards", catalog.with_name(f"{catalog.name}.shards"))
    return catalog


def snapshot(folder: Path) -> dict:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}


OVERWRITES = {  # --output chosen as: what the refusal names
    "an image": ("x.png", "one of the images to score"),
    "a hard link to an image": ("hard.png", "one of the images to score"),
    "a symbolic link to an image": ("soft.png", "one of the images to score"),
    "a file of the head": ("head/predictions.csv", "in the head folder"),
    "a new file in the head, through a link to its folder": ("linked/new.csv", "in the head folder"),
    "the cache's catalog": ("c.h5", "the feature cache"),
    "a hard link to a shard": ("shard.h5", "in the feature cache's shards folder"),
    "a list": ("l.csv", "the list"),
    "a list named in a list": ("inner.txt", "the list"),
}


@pytest.mark.parametrize("case", OVERWRITES)
def test_an_output_that_is_an_input_is_refused_before_any_work(world, tmp_path, case, monkeypatch):
    output, named = OVERWRITES[case]
    copy_head(world, tmp_path / "head")
    copy_cache(world, tmp_path / "c.h5")
    shutil.copyfile(world / "new" / "0.png", tmp_path / "x.png")
    os.link(tmp_path / "x.png", tmp_path / "hard.png")
    os.symlink(tmp_path / "x.png", tmp_path / "soft.png")
    os.symlink(tmp_path / "head", tmp_path / "linked")
    os.link(next((tmp_path / "c.h5.shards").rglob("*.h5")), tmp_path / "shard.h5")
    (tmp_path / "inner.txt").write_text(f"{world / 'new' / '1.png'}\n")
    (tmp_path / "l.csv").write_text(f"{world / 'new' / '2.png'}\n@{tmp_path / 'inner.txt'}\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr("classify.scoring.image_features", lambda *args: pytest.fail("work started"))
    result = score("x.png", f"@{tmp_path / 'l.csv'}", "--head", "head", "--cache", "c.h5", "--output", output,
                   "--quiet", cwd=tmp_path)
    one_line(result, 2, f"--output '{output}' is {named}", "name another file")
    assert snapshot(tmp_path) == before


def test_an_output_beside_its_inputs_is_written(world, tmp_path):
    shutil.copyfile(world / "new" / "0.png", tmp_path / "x.png")
    result = score(tmp_path / "x.png", "--head", world / "head", "--output", tmp_path / "x.csv", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.csv").read_text().splitlines()[1].startswith(f"{tmp_path / 'x.png'},ok,")


@pytest.mark.parametrize("cache, export", [("c.keras", "c.keras"), ("m.labels.txt", "m.keras")])
def test_an_export_over_the_cache_is_refused_before_training(world, tmp_path, weights_file, cache, export):
    """train-head writes --export (and its .labels.txt) aside and renames it over that name:
    a cache so named would be replaced by the model."""
    extract_features(world / "data", tmp_path / cache, input_size=SIZE, weights=weights_file, progress=False)
    before = snapshot(tmp_path)
    result = train("--cache", cache, "--head", "logreg", "--out", "run", "--export", export, "--quiet", cwd=tmp_path)
    one_line(result, 2, f"is the feature cache '{cache}'", "name another .keras file")
    assert snapshot(tmp_path) == before


def test_an_export_named_like_out_is_refused_before_training(world, tmp_path):
    result = train("--cache", world / "c.h5", "--head", "logreg", "--out", tmp_path / "m.keras",
                   "--export", tmp_path / "m.keras", "--quiet")
    one_line(result, 2, "is --out")
    assert list(tmp_path.iterdir()) == []


# 10. what a kill -9 leaves beside --out and --output, removed by the next run (issue 29, 8)

def killed(process, folder: Path, pattern: str) -> list[str]:
    """SIGKILL `process` once it has made a file matching `pattern` in `folder`; what it left."""
    assert wait_for(folder, pattern, process), process.communicate()
    process.kill()
    process.wait(60)
    return listing(folder, pattern)


def paused(process, folder: Path, pattern: str, other: str) -> str:
    """SIGSTOP `process` once it has made a file matching `pattern` in `folder` other than
    `other`: alive, for sure, while the test goes on; that file."""
    while not (mine := [path for path in listing(folder, pattern) if path != other]):
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGSTOP)
    return mine[0]


def test_a_killed_train_heads_partial_folder_is_removed_by_the_next_run_never_a_live_ones(world, tmp_path):
    epochs = ("--cache", world / "s.h5", "--head", "mlp", "--epochs", "10000", "--quiet")
    (dead,) = killed(helpers.start(TRAIN, *epochs, "--out", tmp_path / "dead"), tmp_path, "dead.partial-*")
    assert Path(dead).is_dir()
    live = helpers.start(TRAIN, *epochs, "--out", tmp_path / "live")
    try:
        mine = paused(live, tmp_path, "*.partial-*", dead)
        assert not os.path.exists(dead)  # the next run in that folder, whatever its --out, removed it
        done = train("--cache", world / "s.h5", "--head", "knn", "--out", tmp_path / "next", "--quiet")
        assert done.returncode == 0, done.stderr
        assert listing(tmp_path, "*.partial-*") == [mine]
    finally:
        live.kill()
        live.wait(60)


def test_a_killed_scorers_partial_output_is_removed_by_the_next_run_never_a_live_ones(world, tmp_path):
    for i in range(300):
        make_image(tmp_path / "many" / f"{i:03d}.png", seed=i, size=(12, 12))
    output = tmp_path / "out.csv"
    slow = (tmp_path / "many", "--head", world / "head", "--batch-size", "1", "--output", output, "--quiet")
    (dead,) = killed(helpers.start(SCORE, *slow), tmp_path, ".out.csv.partial-*")
    live = helpers.start(SCORE, *slow)
    try:
        mine = paused(live, tmp_path, ".out.csv.partial-*", dead)
        assert not os.path.exists(dead)  # the next run to that --output removed it
        assert score_new(world, world / "head", "--output", output).returncode == 0
        assert listing(tmp_path, ".out.csv.partial-*") == [mine] and output.read_text().count("\n") == 4
    finally:
        live.kill()
        live.wait(60)


# 11. a head file is refused on its size, before it is read (issue 29, 9)

class _Asked:
    """An open file that refuses to be asked for more than `most` bytes at once."""

    def __init__(self, file, most):
        self.file, self.most = file, most

    def read(self, size=-1):
        assert 0 <= size <= self.most, f"asked to read {size} bytes"
        return self.file.read(size)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("sizes", [True, False])
def test_a_sparse_file_in_a_head_is_refused_without_reading_it_whole(world, tmp_path, monkeypatch, sizes):
    """With sizes in SHA256SUMS, refused on a stat; in an older folder without them, hashed a
    MiB at a time (it is not head.json or head.joblib, whose bytes are kept)."""
    from extract import files

    head = copy_head(world, tmp_path / "head")
    (head / "predictions.csv").unlink()
    subprocess.run(["truncate", "-s", "2G" if sizes else "512M", head / "predictions.csv"], check=True)
    if not sizes:
        lines = (head / "SHA256SUMS").read_text().splitlines()
        (head / "SHA256SUMS").write_text("".join(line + "\n" for line in lines if not line.startswith("#")))
    opened = files.open_regular
    monkeypatch.setattr(files, "open_regular", lambda path: _Asked(opened(path), 2**20 + 1))
    why = ("not the", "recorded in SHA256SUMS") if sizes else ("does not match the SHA-256",)
    one_line(score_new(world, head), 2, "predictions.csv", *why, "retrain")


def test_a_head_written_before_sizes_were_recorded_still_loads(world, tmp_path):
    head = copy_head(world, tmp_path / "head")
    sums = (head / "SHA256SUMS").read_text()
    assert "# size " in sums
    (head / "SHA256SUMS").write_text("".join(line + "\n" for line in sums.splitlines() if not line.startswith("#")))
    assert subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=head, capture_output=True).returncode == 0
    assert score_new(world, head).returncode == 0


def test_sizes_that_do_not_cover_every_file_are_refused(world, tmp_path):
    head = copy_head(world, tmp_path / "head")
    lines = (head / "SHA256SUMS").read_text().splitlines()
    (head / "SHA256SUMS").write_text("".join(line + "\n" for line in lines if "# size" not in line or "head.json" not in line))
    one_line(score_new(world, head), 2, "does not record a size for each file")


# 12. what a third look at 9, 10 and 11 found (issue 29, follow-up of 2, 8, 9)

@pytest.fixture
def linked(world, tmp_path) -> Path:
    """A copy of the cache in real/c.h5, named through the link c.h5 in tmp_path: the real catalog."""
    (tmp_path / "real").mkdir()
    real = copy_cache(world, tmp_path / "real" / "c.h5")
    (tmp_path / "c.h5").symlink_to(real)
    return real


def test_a_shard_of_a_cache_named_through_a_link_is_not_an_output(world, tmp_path, linked):
    """The cache is read from its real path, so its shards are those beside the real file."""
    shard = next((tmp_path / "real" / "c.h5.shards").rglob("*.h5"))
    before = snapshot(tmp_path)
    result = score(world / "new" / "0.png", "--head", world / "head", "--cache", "c.h5", "--output", shard,
                   "--quiet", cwd=tmp_path)
    one_line(result, 2, "is in the feature cache's shards folder", "name another file")
    assert snapshot(tmp_path) == before


def test_an_export_into_the_shards_of_a_cache_named_through_a_link_is_refused(world, tmp_path, linked):
    export = tmp_path / "real" / "c.h5.shards" / "m.keras"
    result = train("--cache", "c.h5", "--head", "logreg", "--out", "run", "--export", export, "--quiet", cwd=tmp_path)
    one_line(result, 2, "in the feature cache's shards folder", "name another .keras file")
    assert not export.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("cache", ["c.h5", "real/c.h5"])
def test_the_caches_lock_file_is_not_an_output(world, tmp_path, linked, cache):
    """Replaced, the lock file would let a second writer in beside one holding the old one's lock."""
    lock = tmp_path / "real" / "c.h5.lock"
    lock.write_text("process 1")
    result = score(world / "new" / "0.png", "--head", world / "head", "--cache", cache, "--output", lock,
                   "--quiet", cwd=tmp_path)
    one_line(result, 2, "is the feature cache's lock file", "name another file")
    assert lock.read_text() == "process 1"


def test_a_fifo_as_output_is_written_into_not_replaced(world, tmp_path):
    fifo = tmp_path / "f.csv"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", fifo], stdout=subprocess.PIPE)
    try:
        result = score_new(world, world / "head", "--output", fifo)
        assert result.returncode == 0, result.stderr
        assert fifo.is_fifo()
        assert reader.communicate(timeout=60)[0].decode().count(",ok,") == 3
    finally:
        reader.kill()
        reader.wait()


def test_a_character_device_as_output_is_written_into_not_replaced(world, tmp_path):
    """A copy of /dev/null (made where a test may: run as root, the real one stays)."""
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device needs root")
    assert score_new(world, world / "head", "--output", null).returncode == 0
    assert stat.S_ISCHR(null.stat().st_mode) and null.read_bytes() == b""


def test_a_block_device_as_output_is_refused(world, tmp_path):
    disk = tmp_path / "disk"
    try:
        os.mknod(disk, stat.S_IFBLK | 0o600, os.makedev(7, 250))
    except PermissionError:
        pytest.skip("making a device needs root")
    one_line(score_new(world, world / "head", "--output", disk), 2, "is not a regular file (a block device)")
    assert stat.S_ISBLK(disk.stat().st_mode)


def test_a_descriptor_as_output_is_written_into(world, tmp_path):
    """/dev/fd/1 (bash's >(...) names such a path) is the scorer's stdout: a file here, which
    cannot be renamed over through /proc."""
    result = score_apart(world / "new", "--head", world / "head", "--output", "/dev/fd/1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("path,status,label,probability") and result.stdout.count(",ok,") == 3


def test_a_descriptor_that_cannot_be_opened_is_refused_before_work(world):
    """/dev/fd/N of a socket: the kernel will not open it again by name."""
    import socket

    mine, theirs = socket.socketpair()
    with mine, theirs:
        output = f"/dev/fd/{mine.fileno()}"
        result = subprocess.run(command(SCORE, world / "new", "--head", world / "head", "--output", output, "--quiet"),
                                pass_fds=(mine.fileno(),), capture_output=True, timeout=120)
    one_line(result, 2, f"Cannot write --output '{output}'", "No such device or address")


def test_a_dash_as_output_is_stdout(world, tmp_path):
    result = score(world / "new", "--head", world / "head", "--output", "-", "--format", "jsonl", "--quiet",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["status"] for line in result.stdout.splitlines()] == ["ok"] * 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, size, sizes", [("head.joblib", "1T", True), ("head.json", "1G", True),
                                               ("head.json", "1G", False)])
def test_a_kept_head_file_is_capped_whatever_size_is_recorded(world, tmp_path, monkeypatch, name, size, sizes):
    """head.json and head.joblib are read whole (their bytes are loaded): a huge sparse one,
    its size line edited to match or gone (an older folder), is refused on a stat."""
    from extract import files

    head = copy_head(world, tmp_path / "head")
    (head / name).unlink()
    subprocess.run(["truncate", "-s", size, head / name], check=True)
    lines = (head / "SHA256SUMS").read_text().splitlines()
    edited = [f"# size {(head / name).stat().st_size}  {name}" if line.endswith(f"  {name}") and line.startswith("#")
              else line for line in lines if sizes or not line.startswith("#")]
    (head / "SHA256SUMS").write_text("".join(line + "\n" for line in edited))
    opened = files.open_regular
    monkeypatch.setattr(files, "open_regular", lambda path: _Asked(opened(path), 2**20 + 1))
    one_line(score_new(world, head), 2, name, "it is over", "restore it or retrain")


def test_a_partial_of_a_live_run_in_another_pid_namespace_is_kept(world, tmp_path):
    """Containers sharing a host name and a folder: the other run's process ids are not ours to look up."""
    if subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True).returncode != 0:
        pytest.skip("no PID namespace can be made here")
    for i in range(300):
        make_image(tmp_path / "many" / f"{i:03d}.png", seed=i, size=(12, 12))
    output = tmp_path / "out.csv"
    live = helpers.start(SCORE, tmp_path / "many", "--head", world / "head", "--batch-size", "1",
                         "--output", output, "--quiet")
    try:
        mine = paused(live, tmp_path, ".out.csv.partial-*", "")
        other = subprocess.run(["unshare", "-pf", "--mount-proc",
                                *command(SCORE, world / "new", "--head", world / "head", "--output", output, "--quiet")],
                               capture_output=True)
        assert other.returncode == 0, other.stderr
        assert listing(tmp_path, ".out.csv.partial-*") == [mine]
    finally:
        live.kill()
        live.wait(60)


@pytest.mark.parametrize("command_name", ["score-images", "train-head"])
def test_a_long_but_valid_output_name_has_room_for_its_partial(world, tmp_path, command_name):
    """A name of 230 bytes is valid (NAME_MAX is 255); its temporary's name must be too."""
    if command_name == "score-images":
        output = tmp_path / ("s" * 226 + ".csv")
        result = score_new(world, world / "head", "--output", output)
    else:
        output = tmp_path / ("h" * 230)
        result = train("--cache", world / "s.h5", "--head", "knn", "--out", output, "--no-report", "--quiet")
    assert result.returncode == 0, result.stderr
    assert output.exists() and listing(tmp_path, "*.partial-*") == []
