import csv
import json
import os

import numpy as np
import pytest

from classify import load_head, score_images, train_head
from classify.score_cli import main as score_main
from conftest import SIZE, make_dataset, make_image, write_synthetic_cache
from extract import FeatureCache, UsageError, extract_features
from extract.backbone import Backbone
from extract.config import FeatureConfig
from extract.reader import decode


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights_file):
    """A small real extraction, a logreg head on it, and new images to score."""
    root = tmp_path_factory.mktemp("scoring")
    make_dataset(root / "data", per_class=8, classes=("cat", "dog", "fox"))
    extract_features(root / "data", root / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    train_head(root / "c.h5", "logreg", out=root / "head")
    for i in range(5):
        make_image(root / "new" / "sub" / f"{i}.png", seed=500 + i)
    (root / "new" / "broken.jpg").write_bytes(b"not a picture")
    (root / "new" / "notes.txt").write_text("skipped: not an image by name")
    return root


def test_rows_in_input_order_with_errors(trained):
    rows = list(score_images([trained / "new", trained / "data/train/cat/0.png"], trained / "head", top_k=2))
    assert [os.path.relpath(row.path, trained) for row in rows] == [
        "new/broken.jpg", *(f"new/sub/{i}.png" for i in range(5)), "data/train/cat/0.png"
    ]
    assert rows[0].status == "error" and "not an image" in rows[0].error
    for row in rows[1:]:
        assert row.status == "ok" and row.label in ("cat", "dog", "fox") and len(row.top) == 2
        assert row.top[0] == (row.label, row.probability) and row.top[0][1] >= row.top[1][1]


def test_probabilities_are_the_heads_on_the_pipelines_features(trained, weights_file):
    head = load_head(trained / "head")
    rows = list(score_images([trained / "new" / "sub"], head, top_k=3))
    with FeatureCache(trained / "c.h5") as cache:
        config = cache.config
    pixels = np.stack([decode((trained / "new" / "sub" / f"{i}.png").read_bytes(), SIZE) for i in range(5)])
    features = Backbone(FeatureConfig.from_facts(config))(pixels)
    expected = head.predict_proba(features, head.fingerprint)
    for row, probabilities in zip(rows, expected):
        assert dict(row.top)[row.label] == pytest.approx(probabilities.max(), abs=1e-6)


def test_cached_images_are_not_recomputed(trained, monkeypatch):
    monkeypatch.setattr(Backbone, "__init__", lambda *a: pytest.fail("VGG16 was built for cached images"))
    rows = list(score_images([trained / "data" / "validation"], trained / "head", cache=trained / "c.h5"))
    assert len(rows) == 3 and all(row.status == "ok" for row in rows)


def test_list_files_and_missing_files(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained)
    (tmp_path / "list.txt").write_text("# new images\nnew/sub/0.png\n\nmissing.png\n")
    rows = list(score_images([f"@{tmp_path / 'list.txt'}"], trained / "head"))
    assert [(row.path, row.status) for row in rows] == [("new/sub/0.png", "ok"), ("missing.png", "error")]
    assert rows[1].error.startswith("cannot read file")


def test_a_missing_weights_file_is_refused_before_work(trained, tmp_path):
    info = json.loads((trained / "head" / "head.json").read_text())
    assert info["feature_config"]["weights_path"]
    with pytest.raises(UsageError, match="not the weights the head's features were made with"):
        list(score_images([trained / "new"], trained / "head", weights=trained / "head" / "head.joblib"))


def test_csv_and_jsonl_output(trained, tmp_path, capsys):
    assert score_main([str(trained / "new"), "--head", str(trained / "head"), "--output", str(tmp_path / "s.csv"),
                       "--quiet", "--top-k", "2"]) == 0
    with open(tmp_path / "s.csv") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == ["path", "status", "label", "probability", "label_2", "probability_2", "error"]
    assert [row["status"] for row in table] == ["error"] + ["ok"] * 5
    assert score_main([str(trained / "new" / "sub"), "--head", str(trained / "head"), "--format", "jsonl", "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(len(line["top"]) == 3 for line in lines)


def test_csv_names_the_prediction_once_then_the_runners_up(trained, tmp_path):
    """CSV: label and probability (rank 1), then label_2 ... label_K; JSONL: the same ranks
    as `top`, whose first pair is label and probability."""
    score = [str(trained / "new" / "sub"), "--head", str(trained / "head"), "--quiet"]
    assert score_main([*score, "--output", str(tmp_path / "s.csv")]) == 0
    assert score_main([*score, "--output", str(tmp_path / "s.jsonl")]) == 0
    with open(tmp_path / "s.csv", newline="") as file:
        table = list(csv.DictReader(file))
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert list(table[0]) == ["path", "status", "label", "probability", "label_2", "probability_2", "label_3",
                              "probability_3", "error"]
    assert len(table) == len(lines) == 5
    for row, line in zip(table, lines):
        ranked = [(row["label"], row["probability"]), (row["label_2"], row["probability_2"]),
                  (row["label_3"], row["probability_3"])]
        assert ranked == [(label, f"{probability:.6f}") for label, probability in line["top"]]
        assert [line["label"], line["probability"]] == line["top"][0]
        assert sorted(label for label, _ in ranked) == ["cat", "dog", "fox"]  # each class once
        assert float(row["probability"]) >= float(row["probability_2"]) >= float(row["probability_3"])


def test_top_k_1_is_the_prediction_alone(trained, tmp_path):
    score = [str(trained / "new" / "sub"), "--head", str(trained / "head"), "--quiet", "--top-k", "1"]
    assert score_main([*score, "--output", str(tmp_path / "s.csv")]) == 0
    assert score_main([*score, "--output", str(tmp_path / "s.jsonl")]) == 0
    with open(tmp_path / "s.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == ["path", "status", "label", "probability", "error"]
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [line["top"] for line in lines] == [[[row["label"], pytest.approx(float(row["probability"]), abs=1e-6)]]
                                               for row in table]


@pytest.mark.parametrize("top_k, message", [("0", "Expected --top-k between 1 and 1000; received 0."),
                                            ("-2", "Expected --top-k between 1 and 1000; received -2.")])
def test_a_top_k_below_1_is_one_line_and_status_2(trained, tmp_path, capsys, top_k, message):
    status = score_main([str(trained / "new"), "--head", str(trained / "head"), "--top-k", top_k,
                         "--output", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert status == 2 and err == f"score-images: error: {message}\n" and not (tmp_path / "s.csv").exists()


def test_top_k_beyond_the_classes_ranks_every_class_once(trained, tmp_path):
    assert score_main([str(trained / "new" / "sub"), "--head", str(trained / "head"), "--quiet", "--top-k", "50",
                       "--output", str(tmp_path / "s.csv")]) == 0
    with open(tmp_path / "s.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0])[2:] == ["label", "probability", "label_2", "probability_2", "label_3", "probability_3",
                                  "error"]
    assert all(sorted((row["label"], row["label_2"], row["label_3"])) == ["cat", "dog", "fox"] for row in table)


def test_nothing_scorable_is_status_1(trained, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"")
    assert score_main([str(tmp_path / "bad.jpg"), "--head", str(trained / "head"), "--quiet"]) == 1
    assert "no image could be scored" in capsys.readouterr().err


def test_a_cache_of_another_configuration_is_refused(trained, tmp_path, capsys):
    other = write_synthetic_cache(tmp_path / "other.h5", {"train": (("a", "b"), 3)})
    status = score_main([str(trained / "new"), "--head", str(trained / "head"), "--cache", str(other), "--quiet"])
    assert status == 2 and "holds no features of the head's configuration" in capsys.readouterr().err


def test_not_a_head_folder_is_status_2(tmp_path, capsys):
    assert score_main([str(tmp_path), "--head", str(tmp_path), "--quiet"]) == 2
    assert "not a head folder" in capsys.readouterr().err


def test_file_names_are_data_never_code(trained, tmp_path, monkeypatch):
    """Names with newlines, quotes, commas, shell syntax and a leading dash are stored and
    written back verbatim, and nothing in them runs."""
    monkeypatch.chdir(tmp_path)
    names = ['-rf "quoted", comma.png', "new\nline.png", "$(touch pwned).png", "; rm -rf x.png"]
    data = tmp_path / "odd"
    for i, name in enumerate(names):
        make_image(data / "cls" / name, seed=900 + i)
    extract_features(data, tmp_path / "odd.h5", input_size=SIZE, weights=load_head(trained / "head")
                     .info["feature_config"]["weights_path"], progress=False)
    with FeatureCache(tmp_path / "odd.h5") as cache:
        assert sorted(cache.paths()) == sorted(f"cls/{name}" for name in names)
    assert score_main([str(data), "--head", str(trained / "head"), "--output", str(tmp_path / "s.csv"), "--quiet"]) == 0
    with open(tmp_path / "s.csv", newline="") as file:
        written = [row["path"] for row in csv.DictReader(file)]
    assert sorted(written) == sorted(os.path.join(str(data), "cls", name) for name in names)
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.glob("pwned*"))


def test_a_head_on_draft_decoded_features_scores_with_draft_decoding(tmp_path, weights_file):
    for label in ("cat", "dog"):
        for i in range(4):
            make_image(tmp_path / "data" / "train" / label / f"{i}.jpg", seed=len(label) * 10 + i, size=(200, 150))
    options = dict(input_size=SIZE, weights=weights_file, progress=False)
    extract_features(tmp_path / "data", tmp_path / "exact.h5", **options)
    extract_features(tmp_path / "data", tmp_path / "draft.h5", decode="draft", **options)
    with FeatureCache(tmp_path / "exact.h5") as exact, FeatureCache(tmp_path / "draft.h5") as draft:
        assert exact.fingerprint != draft.fingerprint and draft.config["decode"] == "draft"
        assert not np.allclose(exact.features(), draft.features())
        paths, cached = draft.paths(), draft.features()
    train_head(tmp_path / "draft.h5", "logreg", out=tmp_path / "head", validation_fraction=0.25)
    head = load_head(tmp_path / "head")
    rows = list(score_images([tmp_path / "data" / path for path in paths], head))  # no cache: computed again
    expected = head.predict_proba(cached, head.fingerprint)
    for row, probabilities in zip(rows, expected):
        assert dict(row.top)[row.label] == pytest.approx(probabilities.max(), abs=1e-5)
