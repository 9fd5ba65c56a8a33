"""Issue 33, a newcomer's first hour: long steps show life on a terminal, the commands name
what they work on, and the small errors say what was typed and what to do."""

import io
import json
import subprocess
import sys

import pytest

import helpers
from conftest import SIZE, blobs, make_dataset, write_synthetic_cache
from classify import load_head
from classify.data import Rows
from classify.keras_head import KerasMLPClassifier
from classify.score_cli import main as score_main
from classify.train_cli import main as train_main
from classify.training import train_head
from extract import UsageError, extract_features
from extract.cli import main as extract_main

SPLITS = {"train": (("a", "b"), 20), "validation": (("a", "b"), 6)}


class Terminal(io.StringIO):
    """stderr as a terminal (tqdm's disable=None shows its bars on one)."""

    def isatty(self):
        return True


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "c.h5", SPLITS)


def _fit_mlp(progress):
    X, y = blobs(("a", "b"), 10, 8)
    validation = blobs(("a", "b"), 4, 8, seed=1)
    return KerasMLPClassifier(hidden_units=4, epochs=3, random_state=0).fit_rows(
        Rows.from_arrays(X, y), Rows.from_arrays(*validation), progress=progress)


def test_mlp_shows_each_epoch_with_its_loss_and_validation_accuracy_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    _fit_mlp("mlp")
    shown = sys.stderr.getvalue()
    assert "mlp" in shown and "3/3" in shown and "loss " in shown and "val acc " in shown


def test_epochs_are_silent_off_a_terminal(capsys):
    _fit_mlp("mlp")
    assert capsys.readouterr().err == ""


def test_finetune_shows_the_epochs_of_each_of_its_steps_on_a_terminal(tmp_path, weights_file, monkeypatch):
    make_dataset(tmp_path / "data", per_class=4)
    extract_features(tmp_path / "data", tmp_path / "b4.h5", input_size=48, weights=weights_file, layer="block4_pool",
                     progress=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    train_head(tmp_path / "b4.h5", "finetune", out=tmp_path / "head", epochs=2, head_epochs=3, early_stopping=False,
               report=False, progress=True)
    shown = sys.stderr.getvalue()
    assert "finetune, head alone" in shown and "3/3" in shown
    assert "finetune, block5 and head" in shown and "2/2" in shown


def test_train_head_names_the_cache_configuration_and_rows_first(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert train_main(["--cache", str(cache), "--head", "logreg", "--no-report", "--out", str(tmp_path / "run")]) == 0
    first = sys.stderr.getvalue().splitlines()[0]
    assert f"training on {str(cache)!r}" in first and "configuration synthetic0000001" in first
    assert "input size 32" in first and "40 training images, 12 validation" in first


def test_extract_features_and_score_images_name_what_they_work_on(tmp_path, weights_file, monkeypatch):
    make_dataset(tmp_path / "data", per_class=3)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert extract_main([str(tmp_path / "data"), "--cache", str(tmp_path / "c.h5"), "--weights", str(weights_file),
                         "--input-size", str(SIZE), "--pooling", "avg"]) == 0
    assert sys.stderr.getvalue().startswith(f"extracting {tmp_path / 'data'} into {tmp_path / 'c.h5'}: weights ")
    assert f"input size {SIZE}, pooling avg" in sys.stderr.getvalue().splitlines()[0]
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert train_main(["--cache", str(tmp_path / "c.h5"), "--head", "logreg", "--no-report",
                       "--out", str(tmp_path / "head")]) == 0
    assert f"extracted from {str(tmp_path / 'data')!r}" in sys.stderr.getvalue().splitlines()[0]
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert score_main([str(tmp_path / "data"), "--head", str(tmp_path / "head"), "--cache", str(tmp_path / "c.h5"),
                       "--output", str(tmp_path / "s.csv")]) == 0
    first = sys.stderr.getvalue().splitlines()[0]
    assert first.startswith(f"scoring with {tmp_path / 'head'} (logreg head on configuration ")
    assert f"features reused from --cache {tmp_path / 'c.h5'}" in first


def test_train_head_quiet_names_nothing_even_on_a_terminal(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert train_main(["--cache", str(cache), "--head", "mlp", "--epochs", "2", "--quiet",
                       "--out", str(tmp_path / "run")]) == 0
    assert sys.stderr.getvalue() == ""


def test_a_line_says_the_report_is_being_drawn_on_a_terminal(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    train_head(cache, "logreg", out=tmp_path / "run", progress=True)
    assert "drawing report.html" in sys.stderr.getvalue()


def _head(cache, folder):
    done = helpers.call(helpers.TRAIN, "--cache", cache, "--head", "logreg", "--no-report", "--quiet", "--out", folder)
    assert done.returncode == 0
    return folder


def test_a_run_folder_of_heads_names_them_and_the_best(cache, tmp_path):
    run = tmp_path / "run"
    _head(cache, run / "logreg")
    _head(cache, run / "knn")  # a logreg as well: only its folder's name matters here
    (run / "leaderboard.json").write_text(json.dumps([{"head": "knn"}, {"head": "logreg"}]))
    with pytest.raises(UsageError) as error:
        load_head(run)
    message = str(error.value)
    assert "2 heads (knn, logreg)" in message and repr(str(run / "knn")) in message and "best" in message
    assert "SHA256SUMS" not in message


def test_score_images_with_a_missing_cache_says_it_can_be_left_out(tmp_path, weights_file):
    make_dataset(tmp_path / "data", per_class=3)
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "head", report=False)
    done = helpers.call(helpers.SCORE, tmp_path / "data", "--head", tmp_path / "head", "--cache", tmp_path / "missing.h5")
    assert done.returncode == 2
    assert "missing.h5" in done.stderr and "leave out --cache" in done.stderr
    assert "extract-features" not in done.stderr


def test_an_empty_folder_lists_the_image_extensions_in_words(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    done = helpers.call(helpers.EXTRACT, tmp_path / "data", "--cache", tmp_path / "c.h5")
    assert done.returncode == 2
    assert ".jpg" in done.stderr and ".webp" in done.stderr and ".tiff" in done.stderr
    assert "notes.txt" in done.stderr and "IMAGE_EXTENSIONS" not in done.stderr


@pytest.mark.parametrize("module", ["classify.train_cli", "classify.score_cli", "classify.check_cli", "extract.cli"])
def test_version_does_not_import_tensorflow(module):
    code = (f"import sys\nfrom {module} import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            f"print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-2:] == ["False", "False"]
