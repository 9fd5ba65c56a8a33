"""The backbone on Keras's JAX backend (the test extra installs jax[cpu]) beside TensorFlow
in this process: features equal within float rounding, so one cache configuration serves
both; scoring and export on JAX; no TensorFlow imported on the way. Keras picks its backend
once per process, so JAX runs in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import h5py
import keras
import numpy as np
import pytest

from classify import export_model, score_images, train_head
from conftest import SIZE, make_dataset, make_image
from extract import extract_features
from extract.config import FeatureConfig, fingerprint

pytestmark = pytest.mark.skipif(find_spec("jax") is None, reason="jax is not installed (pip install -e '.[test]')")

# Runs a command's main(argv) on KERAS_BACKEND, then fails if TensorFlow was imported.
WITHOUT_TENSORFLOW = """
import importlib, sys
module, function = sys.argv[1].split(":")
status = getattr(importlib.import_module(module), function)(sys.argv[2:])
if "tensorflow" in sys.modules:
    sys.exit("tensorflow was imported")
sys.exit(status)
"""


def on_backend(backend: str, code: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def command_on(backend: str, entry: str, *args, cwd=None) -> subprocess.CompletedProcess:
    done = on_backend(backend, WITHOUT_TENSORFLOW, entry, *args, cwd=cwd)
    assert "tensorflow was imported" not in done.stderr
    return done


def cached(cache) -> dict[str, np.ndarray]:
    """Features by path, and views by (sha256, view)."""
    with h5py.File(cache) as file:
        group = file["configs"][file.attrs["last_config"]]
        rows = dict(zip(group["path"].asstr()[:], group["features"][:]))
        if "views" in group.attrs:
            table = group["views"][group.attrs["views"]]
            rows.update(zip(zip(table["sha256"][:], table["view"][:]), table["features"][:]))
        return rows


def backends(cache) -> str:
    with h5py.File(cache) as file:
        return file["configs"][file.attrs["last_config"]].attrs["backends"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, weights_file):
    """One extraction on TensorFlow, in this process, with a view of each training image."""
    root = tmp_path_factory.mktemp("backends")
    make_dataset(root / "data", "classes", per_class=4, classes=("cat", "dog", "fox"))
    summary = extract_features(root / "data", root / "tensorflow.h5", input_size=SIZE, weights=weights_file,
                               augment=1, progress=False)
    return root, summary


def test_jax_features_are_tensorflows_within_rounding_in_the_same_configuration(extracted, weights_file):
    root, reference = extracted
    done = command_on("jax", "extract.cli:main", root / "data", "--cache", root / "jax.h5", "--weights", weights_file,
                      "--input-size", SIZE, "--augment", 1, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["backend"] == "jax" and summary["device"] == "CPU"
    assert summary["start_seconds"] > 0 and summary["images_per_second"] > 0  # the rate once the network is up
    assert summary["fingerprint"] == reference.fingerprint  # the backend is not part of what a feature is
    assert backends(root / "jax.h5") == "jax" and backends(root / "tensorflow.h5") == "tensorflow"
    on_tensorflow, on_jax = cached(root / "tensorflow.h5"), cached(root / "jax.h5")
    assert on_jax.keys() == on_tensorflow.keys() and len(on_jax) == 12 + 10  # images, and a view of each training image
    scale = max(np.abs(features).max() for features in on_tensorflow.values())
    for key, features in on_tensorflow.items():
        np.testing.assert_allclose(on_jax[key], features, rtol=0, atol=1e-5 * scale)  # measured: 2e-6 of the largest


def test_a_cache_grows_on_another_backend_and_records_both(weights_file, tmp_path):
    cache = tmp_path / "grown.h5"
    data = tmp_path / "data"
    make_dataset(data, "classes", per_class=4, classes=("cat", "dog", "fox"))
    extract_features(data, cache, input_size=SIZE, weights=weights_file, progress=False)
    make_image(data / "cat" / "new.jpg", seed=77)
    arguments = (data, "--cache", cache, "--weights", weights_file, "--input-size", SIZE, "--json")
    grown = command_on("jax", "extract.cli:main", *arguments)
    assert grown.returncode == 0, grown.stderr
    assert json.loads(grown.stdout)["computed"] == 1  # the rows TensorFlow made are kept, not recomputed
    assert backends(cache) == "tensorflow,jax"
    before = os.stat(cache).st_mtime_ns
    again = command_on("jax", "extract.cli:main", *arguments)
    assert json.loads(again.stdout)["computed"] == 0 and os.stat(cache).st_mtime_ns == before  # nothing written
    assert json.loads(again.stdout)["backend"] is None and json.loads(again.stdout)["start_seconds"] is None


def test_scoring_and_export_on_jax_give_tensorflows_probabilities(extracted, weights_file, tmp_path):
    root, _ = extracted
    head = train_head(root / "tensorflow.h5", "mlp", out=tmp_path / "head", epochs=2).folder
    new = [make_image(tmp_path / "new" / f"{i}.png", seed=300 + i) for i in range(3)]
    expected = {row.path: row.probability for row in score_images(new, head, weights=str(weights_file))}
    scored = command_on("jax", "classify.score_cli:main", *new, "--head", head, "--weights", weights_file,
                        "--format", "jsonl", "--quiet", cwd=tmp_path)  # no cache there: computed on JAX
    assert scored.returncode == 0, scored.stderr
    rows = [json.loads(line) for line in scored.stdout.splitlines()]
    assert [row["path"] for row in rows] == list(expected)
    for row in rows:
        assert row["probability"] == pytest.approx(expected[row["path"]], abs=1e-4)

    exported = on_backend("jax", """
        import sys
        from classify import export_model
        export_model(sys.argv[1], sys.argv[2], weights=sys.argv[3])
    """, head, tmp_path / "jax.keras", weights_file)
    assert exported.returncode == 0, exported.stderr
    pixels = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    on_tensorflow = export_model(head, tmp_path / "tensorflow.keras", weights=str(weights_file)).predict(pixels, verbose=0)
    loaded = keras.saving.load_model(tmp_path / "jax.keras", safe_mode=True)  # made on JAX, loaded on TensorFlow
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), on_tensorflow, atol=1e-6)


def test_the_backbone_on_jax_takes_any_batch_size_and_both_pixel_types(weights_file):
    done = on_backend("jax", """
        import sys
        import numpy as np
        from extract.backbone import Backbone
        from extract.config import FeatureConfig
        backbone = Backbone(FeatureConfig(input_size=int(sys.argv[1]), weights=sys.argv[2]))
        pixels = np.random.default_rng(0).integers(0, 256, (5, int(sys.argv[1]), int(sys.argv[1]), 3), dtype=np.uint8)
        five, three = backbone(pixels), backbone(pixels[:3])  # three is padded to four
        assert backbone.backend == "jax" and five.shape == (5, 1, 1, 512), (backbone.backend, five.shape)
        np.testing.assert_allclose(three, five[:3], atol=1e-5 * np.abs(five).max())
        np.testing.assert_allclose(backbone(pixels.astype(np.float32)), five, atol=1e-5 * np.abs(five).max())
        assert backbone(pixels[:0]).shape == (0, 1, 1, 512)
    """, SIZE, weights_file)
    assert done.returncode == 0, done.stderr


def test_a_backend_keras_cannot_start_is_refused_in_one_line(extracted, weights_file, tmp_path):
    root, _ = extracted
    arguments = (root / "data", "--cache", tmp_path / "c.h5", "--weights", weights_file, "--input-size", SIZE)
    done = on_backend("numpy", WITHOUT_TENSORFLOW, "extract.cli:main", *arguments)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "extract-features: error: Expected KERAS_BACKEND to be one of tensorflow, jax, torch; received 'numpy'."
    )
    if find_spec("torch") is None:
        done = on_backend("torch", WITHOUT_TENSORFLOW, "extract.cli:main", *arguments)
        assert done.returncode == 2
        message = done.stderr.strip().splitlines()[-1]
        assert message.startswith("extract-features: error: Keras cannot start on KERAS_BACKEND=torch (")
        assert "pip install torch" in message


def test_random_weights_on_jax_are_another_network_so_another_configuration():
    done = on_backend("jax", """
        import json
        from extract.config import FeatureConfig
        print(json.dumps(FeatureConfig(weights="random", seed=3).identity()))
    """)
    assert done.returncode == 0, done.stderr
    on_jax, on_tensorflow = json.loads(done.stdout), FeatureConfig(weights="random", seed=3).identity()
    assert on_jax["weights_backend"] == "jax" and "weights_backend" not in on_tensorflow  # old fingerprints kept
    assert fingerprint(on_jax) != fingerprint(on_tensorflow)  # Keras's seeded initializers differ by backend


def test_a_head_on_tensorflows_random_weights_says_so_when_scoring_on_jax(tmp_path):
    make_dataset(tmp_path / "data", "classes", per_class=4, classes=("cat", "dog"))
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights="random", progress=False)
    head = train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "head").folder
    done = command_on("jax", "classify.score_cli:main", tmp_path / "data", "--head", head, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "score-images: error: The head's features were made with random weights (seed 0) on the Keras backend "
        "tensorflow, and random weights differ by backend; run with KERAS_BACKEND=tensorflow (this is jax)."
    )
