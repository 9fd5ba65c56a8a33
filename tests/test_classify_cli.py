import json

import pytest

import helpers
from conftest import write_synthetic_cache

SPLITS = {"train": (("a", "b"), 20), "validation": (("a", "b"), 6)}


def cli(*args):
    """main() in this process: (exit status, stdout, stderr)."""
    done = helpers.call(helpers.TRAIN, *args)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "c.h5", SPLITS)


def test_one_head_prints_its_scores(cache, tmp_path):
    status, out, _ = cli("--cache", cache, "--head", "logreg", "--cv", "3", "--out", tmp_path / "run")
    assert status == 0
    assert "logreg on validation (12 images): accuracy" in out and "cross-validation (3 folds)" in out
    assert f"saved to {tmp_path / 'run'}" in out


def test_all_heads_print_a_leaderboard_as_json(cache, tmp_path):
    status, out, _ = cli("--cache", cache, "--head", "all", "--epochs", "2", "--json", "--out", tmp_path / "run")
    board = json.loads(out)["leaderboard"]
    assert status == 0 and len(board) == 8
    assert board[0]["validation_accuracy"] >= board[-1]["validation_accuracy"]


def test_mlp_options_reach_the_head(cache, tmp_path):
    status, out, _ = cli("--cache", cache, "--hidden-units", "16", "--dropout-rate", "0.2", "--epochs", "3",
                         "--learning-rate", "0.01", "--early-stopping", "--json", "--out", tmp_path / "run")
    params = json.loads(out)["results"]["mlp"]["params"]
    assert status == 0
    assert (params["hidden_units"], params["dropout_rate"], params["epochs"], params["learning_rate"],
            params["early_stopping"]) == (16, 0.2, 3, 0.01, True)
    assert params["standardize"] is True  # the default


def test_no_standardize_is_the_seeds_exact_head(cache, tmp_path):
    status, out, _ = cli("--cache", cache, "--epochs", "2", "--no-standardize", "--json", "--out", tmp_path / "run")
    assert status == 0 and json.loads(out)["results"]["mlp"]["params"]["standardize"] is False
    from classify import load_head

    layers = [type(layer).__name__ for layer in load_head(tmp_path / "run").estimator.model_.layers]
    assert layers == ["Flatten", "Dense", "Dense"]
    status, _, err = cli("--cache", cache, "--head", "knn", "--no-standardize")
    assert status == 2 and "Expected --head mlp" in err


def test_export_needs_one_head(cache, tmp_path):
    status, _, err = cli("--cache", cache, "--head", "all", "--export", tmp_path / "m.keras")
    assert status == 2 and "--export needs one head" in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--head", "nope"], "Expected --head to be one of"),
        (["--head", "knn", "--export", "{missing}.keras"], "knn head cannot be exported"),
        (["--head", "knn", "--epochs", "3"], "Expected --head mlp"),
        (["--class-weight", "heavy"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_status_2(cache, tmp_path, arguments, message):
    arguments = [argument.format(missing=tmp_path / "missing.h5") for argument in arguments]
    if "--cache" not in arguments:
        arguments = ["--cache", cache, *arguments]
    status, _, err = cli(*arguments, "--out", tmp_path / "run")
    assert status == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--cache", "{missing}"], "run extract-features first"),
        (["--config", "zzz"], "received 'zzz'"),
    ],
)
def test_a_cache_error_is_one_line_and_status_1(cache, tmp_path, arguments, message):
    """A CacheError, as in every command (docs/exit-status.md)."""
    arguments = [argument.format(missing=tmp_path / "missing.h5") for argument in arguments]
    if "--cache" not in arguments:
        arguments = ["--cache", cache, *arguments]
    status, _, err = cli(*arguments, "--out", tmp_path / "run")
    assert status == 1 and message in err and err.count("\n") == 1


def test_warnings_are_one_line_each(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 4), "validation": (("a", "b"), 2)})
    status, _, err = cli("--cache", cache, "--head", "knn", "--class-weight", "balanced", "--out", tmp_path / "run")
    assert status == 0
    assert "train-head: warning: knn has no class weights" in err
    assert "train-head: warning: class 'a' has only 4 training images" in err


def test_no_augment_ignores_cached_views(tmp_path, weights_file):
    from conftest import SIZE, make_dataset
    from extract import extract_features

    make_dataset(tmp_path / "data", per_class=4)
    extract_features(tmp_path / "data", tmp_path / "v.h5", input_size=SIZE, weights=weights_file, augment=3, progress=False)
    status, out, _ = cli("--cache", tmp_path / "v.h5", "--head", "logreg", "--out", tmp_path / "with")
    assert status == 0 and "(trained on 6 images and 18 cached views of them; --no-augment ignores the views)" in out
    status, out, _ = cli("--cache", tmp_path / "v.h5", "--head", "logreg", "--no-augment", "--json",
                         "--out", tmp_path / "without")
    assert status == 0 and (json.loads(out)["training_images"], json.loads(out)["training_views"]) == (6, 0)


def test_a_cache_of_several_configurations_says_which_one_trained(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", SPLITS, fingerprint="synthetic0000001")
    write_synthetic_cache(cache, SPLITS, fingerprint="synthetic0000002", seed=1)  # the last written: the default
    status, out, _ = cli("--cache", cache, "--head", "logreg", "--out", tmp_path / "run")
    assert status == 0
    assert out.splitlines()[0] == ("Features: configuration synthetic0000002 (weights random (seed 0), input size 32, "
                                   "pooling avg, precision float32); the cache holds 1 other: --config FINGERPRINT "
                                   "to choose.")
    status, out, _ = cli("--cache", cache, "--head", "logreg", "--config", "synthetic0000001",
                         "--out", tmp_path / "chosen")
    assert status == 0 and out.startswith("Features: configuration synthetic0000001 (")


def test_a_cache_of_one_configuration_needs_no_features_line(cache, tmp_path):
    status, out, _ = cli("--cache", cache, "--head", "logreg", "--out", tmp_path / "run")
    assert status == 0 and "Features:" not in out and "--config" not in out


@pytest.mark.parametrize("module, prog", [("classify.train_cli", "train-head"), ("classify.score_cli", "score-images")])
def test_version_prints_the_program_and_the_installed_version(capsys, module, prog):
    import importlib
    from importlib import metadata

    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"{prog} {metadata.version('bottleneck-features')}\n"


def test_the_report_is_named_and_can_be_left_out(cache, tmp_path):
    code, out, _ = cli("--cache", str(cache), "--head", "knn", "--out", str(tmp_path / "with"))
    assert code == 0 and f"report: {tmp_path / 'with' / 'report.html'}" in out
    assert (tmp_path / "with" / "report.html").is_file()
    code, out, _ = cli("--cache", str(cache), "--head", "knn", "--out", str(tmp_path / "without"),
                       "--no-report", "--json")
    assert code == 0 and json.loads(out)["report"] is None and not (tmp_path / "without" / "report.html").exists()
    code, _, err = cli("--cache", str(cache), "--mistakes", "some")
    assert code == 2 and "--mistakes" in err


def test_an_export_refused_after_training_is_status_2_and_keeps_the_head(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("two\nlines", "plain"), 6),
                                                      "validation": (("two\nlines", "plain"), 2)})
    status, _, err = cli("--cache", cache, "--head", "logreg", "--out", tmp_path / "run", "--export",
                         tmp_path / "m.keras", "--quiet")
    assert status == 2 and err.count("\n") == 1 and "has a line break in its name" in err
    assert f"The head is saved in {str(tmp_path / 'run')!r}." in err and (tmp_path / "run" / "head.json").is_file()
