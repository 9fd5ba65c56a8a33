"""The bad-input corpus (tests/corpus/, made by tests/make_corpus.py): every valid file is
extracted, every broken one is recorded with its reason, and none stops the run."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SIZE
from extract import FeatureCache, extract_features
from extract.backbone import Backbone
from extract.config import FeatureConfig
from extract.reader import decode

CORPUS = Path(__file__).parent / "corpus"
VALID = ["animated.gif", "cmyk.jpg", "deep16.png", "exif_rotated.jpg", "gray.png", "palette.gif",
         "panorama_4000x30.png", "rgba_transparent.png", "tiny_3x3.png", "webp_named.jpeg", "ünïcödé-猫.png"]
BROKEN = {
    "bomb.png": "decompression bomb",
    "document.png": "not an image Pillow can read",
    "empty.jpg": "empty file",
    "text.jpg": "not an image Pillow can read",
    "truncated.jpg": "truncated image",
}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, weights_file):
    data = tmp_path_factory.mktemp("corpus") / "data"
    shutil.copytree(CORPUS, data / "mixed")
    os.symlink(data / "mixed", data / "mixed" / "loop")  # a folder that contains itself
    summary = extract_features(data, data.parent / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    with FeatureCache(data.parent / "c.h5") as cache:
        features = dict(zip(cache.paths(), cache.features()))
        failures = dict(cache.failures())
    return data, summary, features, failures


def test_the_corpus_is_complete():
    assert sorted(path.name for path in CORPUS.iterdir()) == sorted([*VALID, *BROKEN, "notes.txt"])


def test_every_valid_file_is_extracted_as_the_pipeline_reads_it(extracted, weights_file):
    data, summary, features, _ = extracted
    assert sorted(features) == sorted(f"mixed/{name}" for name in VALID)
    backbone = Backbone(FeatureConfig(input_size=SIZE, weights=str(weights_file)))
    for name in VALID:
        expected = backbone(decode((CORPUS / name).read_bytes(), SIZE)[None])[0]
        np.testing.assert_allclose(features[f"mixed/{name}"], expected, atol=1e-5)


def test_every_broken_file_is_a_failure_with_its_reason(extracted):
    _, summary, _, failures = extracted
    assert failures.pop("mixed/loop/") == "symbolic link loop: the folder contains itself"
    assert sorted(failures) == sorted(f"mixed/{name}" for name in BROKEN)
    for name, reason in BROKEN.items():
        assert reason in failures[f"mixed/{name}"]
    assert (summary.rows, summary.failed, summary.skipped) == (len(VALID), len(BROKEN) + 1, 1)
