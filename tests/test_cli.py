import json
from pathlib import Path

import h5py
import pytest

import helpers
from conftest import SIZE
from extract import FeatureCache
from extract.commit import WriterLock


def cli(*args):
    """main() in this process: (exit status, stdout, stderr)."""
    done = helpers.call(helpers.EXTRACT, *args)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def options(weights_file, tmp_path):
    return ["--cache", tmp_path / "c.h5", "--weights", weights_file, "--input-size", SIZE, "--quiet"]


def test_json_summary_on_stdout(dataset, options):
    status, out, err = cli(dataset, *options[:-1], "--json")
    summary = json.loads(out)
    assert status == 0 and err == ""
    assert (summary["new"], summary["computed"], summary["rows"]) == (6, 6, 6)
    assert summary["layout"] == "splits" and summary["feature_shape"] == [1, 1, 512]


def test_human_summary_reports_counts(dataset, weights_file, tmp_path):
    status, out, _ = cli(dataset, "--cache", tmp_path / "c.h5", "--weights", weights_file, "--input-size", SIZE)
    assert status == 0
    assert "layout: splits" in out and "6 new, 0 changed, 0 unchanged, 0 removed, 0 failed" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{missing}"], "does not exist"),
        (["{empty}"], "Found no images"),
        (["{data}", "--input-size", "16"], "Expected --input-size between 32 (VGG16's minimum without its top) and 1024"),
        (["{data}", "--pooling", "mean"], "argument --pooling: invalid choice"),
        (["{data}", "--batch-size", "0"], "Expected --batch-size between 1 and 1024; received 0."),
        (["{data}", "--workers", "0"], "Expected --workers between 1 and 64; received 0."),
        (["{data}", "--weights", "{missing}/w.h5"], "is not a file"),
        (["{data}", "--weights", "{data}/train/cat/0.png"], "not a weights file for VGG16"),
        (["{data}", "--input-size", "big"], "invalid int value"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2(dataset, tmp_path, arguments, message):
    (tmp_path / "empty").mkdir()
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "data": dataset}
    arguments = [argument.format(**places) for argument in arguments]
    status, _, err = cli(*arguments, "--cache", tmp_path / "c.h5", "--quiet")
    assert status == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_nothing_extractable_is_status_1(tmp_path, options):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("not a picture")
    status, _, err = cli(tmp_path / "bad", *options)
    assert status == 1 and "no image could be extracted" in err


def test_strict_makes_a_failure_an_error_but_keeps_the_rest(dataset, options):
    (dataset / "train/cat/bad.jpg").write_bytes(b"")
    status, _, err = cli(dataset, *options, "--strict")
    assert status == 1 and "--strict" in err
    with FeatureCache(options[1]) as cache:
        assert len(cache) == 6
    assert cli(dataset, *options)[0] == 0


def test_a_busy_cache_is_refused(dataset, options):
    with WriterLock(Path(options[1])):
        status, _, err = cli(dataset, *options)
    assert status == 1 and "is being written by process" in err


def test_a_damaged_cache_is_refused_then_rebuilt(dataset, options):
    Path(options[1]).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    status, _, err = cli(dataset, *options)
    assert status == 1 and "--rebuild" in err and err.count("\n") == 1
    assert cli(dataset, *options, "--rebuild")[0] == 0
    assert len(list(Path(options[1]).parent.glob("c.h5.replaced-*"))) == 1


def test_offline_imagenet_is_one_clear_line(dataset, tmp_path, monkeypatch):
    import socket

    import keras

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-2, "offline")))
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path / "keras"))
    status, out, err = cli(dataset, "--cache", tmp_path / "c.h5", "--input-size", SIZE, "--json")
    errors = [line for line in err.splitlines() if line.startswith("extract-features: error:")]
    assert status == 1 and len(errors) == 1 and "--weights" in errors[0]
    assert out == "" and "Traceback" not in err  # Keras's "Downloading data from" went to stderr


def test_the_cache_reads_with_plain_h5py_after_a_cli_run(dataset, options):
    assert cli(dataset, *options)[0] == 0
    with h5py.File(options[1], "r") as file:
        group = file["configs"][file.attrs["last_config"]]
        assert group["features"].shape == (6, 1, 1, 512)
        assert sorted(group["class_names"].asstr()[:]) == ["cat", "dog"]
        for key in ("backbone", "weights", "weights_sha256", "input_size", "interpolation", "preprocessing",
                    "pooling", "feature_shape", "dtype", "keras_version", "tensorflow_version", "h5py_version",
                    "created", "updated"):
            assert key in group.attrs, key


@pytest.mark.parametrize("bfloat16", [True, False])
def test_a_bfloat16_cpu_gets_a_tip_not_a_change(dataset, weights_file, tmp_path, monkeypatch, bfloat16):
    monkeypatch.setattr("extract.cli.cpu_has_bfloat16", lambda: bfloat16)
    status, out, _ = cli(dataset, "--cache", tmp_path / "c.h5", "--weights", weights_file, "--input-size", SIZE)
    assert status == 0 and ("--precision mixed_bfloat16" in out) == bfloat16
    assert "development machine" not in out and ("may run several times faster here" in out) == bfloat16
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.config["precision"] == "float32"


def test_augment_reports_views_and_plain_h5py_tells_them_apart(dataset, weights_file, tmp_path):
    options = ["--cache", tmp_path / "c.h5", "--weights", weights_file, "--input-size", SIZE]
    status, out, _ = cli(dataset, *options, "--augment", "2", "--shear", "5", "--no-flip")
    assert status == 0
    assert "Views:  8 cached, 2 per training image (shear 5.0°, zoom 0.2, flip off, rotation 0.0°, shift 0.0); 8 computed" in out
    with h5py.File(tmp_path / "c.h5", "r") as file:
        group = file["configs"][file.attrs["last_config"]]
        table = group["views"][group.attrs["views"]]
        assert group["features"].shape[0] == 6 and table["features"].shape[0] == 8
        assert set(table["view"][:]) == {1, 2} and table.attrs["views_per_image"] == 2
        assert (table.attrs["shear"], table.attrs["flip"]) == (5.0, False)
        assert set(table["sha256"][:]) <= set(group["sha256"][:])


@pytest.mark.parametrize("arguments, message", [
    (["--shear", "5"], "need --augment K"),
    (["--augment", "2", "--zoom", "1.5"], "Expected --zoom between 0 and 1 (1 excluded); received 1.5."),
])
def test_bad_augmentation_is_one_line_and_status_2(dataset, options, arguments, message):
    status, _, err = cli(dataset, *options, *arguments)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_version_is_the_installed_package_s():
    from importlib import metadata

    status, out, _ = cli("--version")
    assert status == 0 and out == f"extract-features {metadata.version('bottleneck-features')}\n"


def test_version_without_an_installed_package_is_unknown(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli("--version")[:2] == (0, "extract-features unknown\n")


def test_the_summary_names_a_new_configuration_beside_an_existing_one(dataset, weights_file, tmp_path):
    options = ["--cache", tmp_path / "c.h5", "--weights", weights_file]
    status, out, _ = cli(dataset, *options, "--input-size", 48)
    assert status == 0 and f"Config: weights {weights_file.name}, input size 48, pooling none, precision float32\n" in out
    assert "New configuration" not in out
    status, out, _ = cli(dataset, *options, "--input-size", SIZE, "--json")
    summary = json.loads(out)
    assert summary["configuration"] == f"weights {weights_file.name}, input size 32, pooling none, precision float32"
    assert summary["options"]["--input-size"] == "32" and summary["options"]["--weights"] == weights_file.name
    assert (summary["new_configuration"], summary["other_configurations"]) == (True, 1)
    assert summary["differences"] == {"--input-size": ["32", "48"]}
    status, out, _ = cli(dataset, *options, "--input-size", 48, "--dtype", "float16")  # nearest: the 48 px one
    assert "Note:   New configuration beside 2 existing: --dtype float16 (the cache also has float32).\n" in out
