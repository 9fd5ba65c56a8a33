import json

import keras
import numpy as np
import pytest

from classify import export_model, load_head, train_head
from conftest import make_dataset, write_synthetic_cache
from extract import FeatureCache, UsageError, extract_features
from extract.reader import decode


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, weights_file):
    root = tmp_path_factory.mktemp("export")
    make_dataset(root / "data", per_class=8, classes=("cat", "dog", "fox"))
    make_dataset(root / "pair", per_class=8, classes=("cat", "dog"))
    for name in ("data", "pair"):
        extract_features(root / name, root / f"{name}.h5", input_size=48, weights=weights_file, progress=False)
    return root


@pytest.mark.parametrize("head", ["mlp", "logreg", "linear-svm"])
@pytest.mark.parametrize("data", ["data", "pair"])  # three classes, and the binary case
def test_exported_model_gives_the_pipelines_probabilities(extraction, tmp_path, head, data):
    options = {"epochs": 3} if head == "mlp" else {}
    folder = train_head(extraction / f"{data}.h5", head, out=tmp_path / "head", **options).folder
    export_model(folder, tmp_path / "model.keras")
    model = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    loaded = load_head(folder)
    with FeatureCache(extraction / f"{data}.h5") as cache:
        paths, features, fingerprint = cache.paths(), cache.features(), cache.fingerprint
    pixels = np.stack([decode((extraction / data / path).read_bytes(), 48) for path in paths])
    assert pixels.dtype == np.uint8
    exported = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(exported, loaded.predict_proba(features, fingerprint), atol=1e-4)


def test_other_heads_say_they_cannot_be_exported(extraction, tmp_path):
    folder = train_head(extraction / "data.h5", "knn", out=tmp_path / "head").folder
    with pytest.raises(UsageError, match="knn head cannot be exported"):
        export_model(folder, tmp_path / "model.keras")


def test_train_head_export_writes_a_loadable_model(extraction, tmp_path):
    from classify.train_cli import main

    assert main(["--cache", str(extraction / "data.h5"), "--head", "logreg", "--export", str(tmp_path / "m.keras"),
                 "--out", str(tmp_path / "head"), "--quiet"]) == 0
    model = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 3)
    assert labels(tmp_path / "m.labels.txt") == ["cat", "dog", "fox"]


def labels(path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # one a line, each line ended by \n


def test_the_class_names_travel_beside_the_model_in_output_order(extraction, tmp_path):
    folder = train_head(extraction / "data.h5", "logreg", out=tmp_path / "head").folder
    export_model(folder, tmp_path / "model.keras")
    names = labels(tmp_path / "model.labels.txt")
    assert names == json.loads((folder / "head.json").read_text())["classes"] == ["cat", "dog", "fox"]
    model, loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True), load_head(folder)
    with FeatureCache(extraction / "data.h5") as cache:
        paths, features, fingerprint = cache.paths(), cache.features(), cache.fingerprint
    chosen = [list(paths).index(path) for path in ("train/cat/0.png", "train/dog/1.png", "validation/fox/7.png")]
    pixels = np.stack([decode((extraction / "data" / paths[i]).read_bytes(), 48) for i in chosen])
    predicted = [names[j] for j in np.argmax(model.predict(pixels, verbose=0), axis=1)]
    expected = [loaded.classes[j] for j in np.argmax(loaded.predict_proba(features[chosen], fingerprint), axis=1)]
    assert predicted == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "model.keras", "model.labels.txt"]  # nothing aside


def test_two_exports_in_one_folder_keep_their_own_class_names(extraction, tmp_path):
    for data in ("data", "pair"):
        folder = train_head(extraction / f"{data}.h5", "logreg", out=tmp_path / data).folder
        export_model(folder, tmp_path / "models" / f"{data}.keras")
    assert labels(tmp_path / "models" / "data.labels.txt") == ["cat", "dog", "fox"]
    assert labels(tmp_path / "models" / "pair.labels.txt") == ["cat", "dog"]


def test_odd_class_names_are_written_verbatim(tmp_path, weights_file):
    odd = ['comma, and "quotes"', "=SUM(A1)", "猫 é \u202etxt.exe", " spaced "]
    make_dataset(tmp_path / "data", per_class=4, classes=odd)
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=32, weights=weights_file, progress=False)
    folder = train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "head").folder
    export_model(folder, tmp_path / "model.keras")
    assert labels(tmp_path / "model.labels.txt") == sorted(odd) == load_head(folder).classes


@pytest.mark.parametrize("name", ["two\nlines", "carriage\rreturn", "unicode\u2028separator"])
def test_a_class_name_with_a_line_break_is_refused_and_nothing_is_written(tmp_path, name):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": ((name, "plain"), 6), "validation": ((name, "plain"), 2)})
    folder = train_head(cache, "logreg", out=tmp_path / "head").folder
    with pytest.raises(UsageError, match="has a line break in its name, and model.labels.txt holds one class a line"):
        export_model(folder, tmp_path / "out" / "model.keras")
    assert not (tmp_path / "out").exists()


def test_an_export_that_cannot_be_written_is_one_line_and_keeps_the_head(extraction, tmp_path, capsys):
    from classify.train_cli import main

    (tmp_path / "file").write_text("a file, not a folder")
    status = main(["--cache", str(extraction / "data.h5"), "--head", "logreg", "--export",
                   str(tmp_path / "file" / "m.keras"), "--out", str(tmp_path / "head"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"train-head: error: cannot write --export {str(tmp_path / 'file' / 'm.keras')!r} (")
    assert f"The head is saved in {str(tmp_path / 'head')!r}." in err and (tmp_path / "head" / "head.json").is_file()


def test_a_folder_where_the_class_names_go_is_refused_before_training(extraction, tmp_path, capsys):
    from classify.train_cli import main

    (tmp_path / "m.labels.txt").mkdir()
    status = main(["--cache", str(extraction / "data.h5"), "--head", "logreg", "--export", str(tmp_path / "m.keras"),
                   "--out", str(tmp_path / "head"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "where --export writes the class names, not to be a folder" in err
    assert not (tmp_path / "head").exists() and not (tmp_path / "m.keras").exists()
    folder = train_head(extraction / "data.h5", "logreg", out=tmp_path / "trained").folder
    with pytest.raises(UsageError, match="where --export writes the class names"):
        export_model(folder, tmp_path / "m.keras")


def test_an_export_over_the_weights_file_is_refused(extraction, tmp_path, weights_file):
    """`--weights` names the file the features were made with; an export of that name would
    replace it (written aside, renamed over it), and no head of these features could be
    scored or exported again."""
    folder = train_head(extraction / "data.h5", "logreg", out=tmp_path / "head").folder
    copy = tmp_path / "w.keras"
    copy.write_bytes(weights_file.read_bytes())
    with pytest.raises(UsageError, match="is the weights file of the head's features"):
        export_model(folder, copy, weights=str(copy))
    assert copy.read_bytes() == weights_file.read_bytes()
