import keras
import numpy as np
import pytest

from classify import export_model, load_head, train_head
from conftest import make_dataset
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
    from classify.cli import main

    assert main(["--cache", str(extraction / "data.h5"), "--head", "logreg", "--export", str(tmp_path / "m.keras"),
                 "--out", str(tmp_path / "head"), "--quiet"]) == 0
    model = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 3)
