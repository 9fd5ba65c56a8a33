"""Side-by-side measurements on one machine, in one run (ratios survive machine drift).

    python bench/compare.py loaders --images 256 --input-size 224 --repeat 2
    python bench/compare.py loaders --images 4096 --batch-size 256 --precision mixed_float16 --xla   # on a GPU
    python bench/compare.py seed-job --input-size 64
    python bench/compare.py augment --input-size 64 --views 2,9
    python bench/compare.py precision --images 256 --input-size 224

loaders    images/s of (1) the model alone on pixels in memory, (2) plain Keras by hand
           (load_img loop + preprocess_input + predict), (3) the blog recipe's loader
           (ImageDataGenerator(rescale=1/255).flow_from_directory + predict), (4)
           extract-features cold (also with --decode draft, and with the blog recipe loader's
           `nearest` resize), and again on the unchanged folder. JPEGs cut from real
           photos (bench/extract_speed.py makes them; 500x375 unless --photo-size) in
           bench/data/photos-N[-WxH]/. --xla also times the model alone compiled with XLA.
seed-job   the blog recipe's whole job (frozen VGG16 + Flatten/Dense(256)/Dense(n), 10 epochs through
           ImageDataGenerator with its augmentation, end to end) against this project's
           (extract-features once + train-head mlp, 10 epochs), on the demo digits, same weights.
augment    the same with augmentation: extract once plus K cached views per training image
           (the blog recipe's transforms, and the same without the flip), then mlp and logreg with and
           without the views, against the blog recipe's augmented pipeline (10 epochs end to end).
precision  float32 against mixed_bfloat16: model-only images/s, cosine similarity of the
           features, and logreg / mlp validation accuracy on the demo digits (mlp: mean of
           seeds 0-4), each trained on its own features, and the float32-trained heads
           scoring the bfloat16 features.

Weights are seeded random ones (this machine cannot download ImageNet's); speed does not
depend on them, and both sides of each comparison use the same ones.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.extract_speed import photo_folder  # noqa: E402
from demo.make_data import main as make_digits  # noqa: E402
from extract import extract_features  # noqa: E402
from extract.backbone import Backbone, import_keras  # noqa: E402
from extract.config import FeatureConfig  # noqa: E402
from extract.layout import scan_folder  # noqa: E402

DIGITS = "data/demo"
SEED_AUGMENTATION = dict(shear_range=0.2, zoom_range=0.2, horizontal_flip=True)


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def seed_generator(keras, **augmentation):
    # The blog recipe's loader. Keras 3 keeps it only under keras.src.legacy.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(rescale=1 / 255, **augmentation)


def loaders(args) -> dict:
    photo = tuple(int(side) for side in args.photo_size.split("x"))
    data = photo_folder(args.images, photo)  # exactly N images: every loader reads the folder
    images = scan_folder(data).images[: args.images]
    size, batch = args.input_size, args.batch_size
    config = FeatureConfig(input_size=size, weights="random", precision=args.precision)
    backbone = Backbone(config)
    keras = import_keras()
    pixels = np.stack([
        keras.utils.img_to_array(keras.utils.load_img(data / image.path, target_size=(size, size), interpolation="bilinear"))
        for image in images
    ]).astype(np.uint8)
    backbone(pixels[:batch])  # trace once

    def model_only(model=backbone):
        for start in range(0, len(pixels), batch):
            model(pixels[start:start + batch])

    def by_hand():
        for start in range(0, len(images), batch):
            arrays = [keras.utils.img_to_array(keras.utils.load_img(data / image.path, target_size=(size, size)))
                      for image in images[start:start + batch]]
            backbone.model.predict(keras.applications.vgg16.preprocess_input(np.stack(arrays)), verbose=0)

    def seed_loader():
        flow = seed_generator(keras).flow_from_directory(
            str(data / "train"), target_size=(size, size), batch_size=batch, class_mode=None, shuffle=False)
        backbone.model.predict(flow, steps=int(np.ceil(len(images) / batch)), verbose=0)

    made = []  # (cache, options) of each cold run, for the re-run on an unchanged folder

    def extract_cold(**changes):
        cache, settings = Path(tempfile.mkdtemp()) / "c.h5", {**options, **changes}
        made.append((cache, settings))
        extract_features(data, cache, **settings)

    options = dict(input_size=size, weights="random", batch_size=batch, precision=args.precision, progress=False)
    results = {"images": len(images), "photo_size": args.photo_size, "input_size": size, "batch_size": batch,
               "precision": args.precision, "repeats": args.repeat}
    measured = {"model_only": model_only, "plain_keras": by_hand, "seed_loader": seed_loader, "extract_cold": extract_cold,
                "extract_cold_draft": lambda: extract_cold(decode="draft"),
                "extract_cold_nearest": lambda: extract_cold(interpolation="nearest")}  # the blog recipe loader's resize
    if args.xla:
        compiled = Backbone(config, xla=True)
        compiled(pixels[:batch])  # compile once
        measured["model_only_xla"] = lambda: model_only(compiled)
    best = {name: float("inf") for name in measured}
    for _ in range(args.repeat):  # interleaved, best of each: drift on a shared machine hits all alike
        for name, function in measured.items():
            best[name] = min(best[name], timed(function)[1])
    for name, seconds in best.items():
        results[f"{name}_images_per_s"] = round(len(images) / seconds, 2)
    cache, settings = made[-1]
    _, rerun = timed(lambda: extract_features(data, cache, **settings))
    results["extract_rerun_seconds"] = round(rerun, 3)
    for name in list(measured)[1:]:
        results[f"{name}_vs_model_only"] = round(results[f"{name}_images_per_s"] / results["model_only_images_per_s"], 3)
    return results


def seed_pipeline(size: int, augmentation: dict):
    """The blog recipe's whole job: frozen VGG16 (seeded random weights, saved for the other side),
    Flatten/Dense(256)/Dense(n), 10 epochs through ImageDataGenerator. Returns its seconds,
    last validation accuracy, the weights file and the generators (for their counts)."""
    make_digits(DIGITS)
    keras = import_keras()
    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    weights = Path(tempfile.mkdtemp()) / "vgg16_seeded.weights.h5"
    base.save_weights(weights)
    base.trainable = False
    n_classes = len(os.listdir(Path(DIGITS, "train")))
    model = keras.Sequential([base, keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(n_classes, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    train = seed_generator(keras, **augmentation).flow_from_directory(
        f"{DIGITS}/train", target_size=(size, size), batch_size=32, class_mode="categorical", seed=0)
    validation = seed_generator(keras).flow_from_directory(
        f"{DIGITS}/validation", target_size=(size, size), batch_size=32, class_mode="categorical", shuffle=False)
    history, seconds = timed(lambda: model.fit(train, epochs=10, validation_data=validation, verbose=0))
    return seconds, history.history["val_accuracy"][-1], weights, train, validation


def seed_job(args) -> dict:
    seed_seconds, seed_accuracy, weights, train, validation = seed_pipeline(args.input_size, SEED_AUGMENTATION)

    from classify import train_head

    size = args.input_size
    cache = Path(tempfile.mkdtemp()) / "c.h5"
    _, extract_seconds = timed(lambda: extract_features(DIGITS, cache, input_size=size, weights=weights, progress=False))
    training, head_seconds = timed(lambda: train_head(cache, "mlp", out=Path(tempfile.mkdtemp()) / "head"))
    ours = extract_seconds + head_seconds
    return {
        "input_size": size, "train_images": train.samples, "validation_images": validation.samples,
        "seed_seconds": round(seed_seconds, 1), "seed_validation_accuracy": round(seed_accuracy, 4),
        "ours_seconds": round(ours, 1), "ours_extract_seconds": round(extract_seconds, 1),
        "ours_head_seconds": round(head_seconds, 1),
        "ours_validation_accuracy": round(training.results[0].scores["validation"]["accuracy"], 4),
        "speedup": round(seed_seconds / ours, 2),
    }


def augment(args) -> dict:
    """Cached views against none, and against the blog recipe's augmented pipeline, on the digits:
    extract once, then add views with the blog recipe's transforms (and again without the flip,
    which turns digits into non-digits), K at a time for each K of --views (each run adds
    only the missing views), and train mlp and logreg on each."""
    from classify import train_head
    from extract.augment import Augmentation

    size, counts = args.input_size, sorted(int(k) for k in args.views.split(","))
    seed_seconds, seed_accuracy, weights, train, _ = seed_pipeline(size, SEED_AUGMENTATION)
    results = {"input_size": size, "train_images": train.samples,
               "seed_augmented_seconds": round(seed_seconds, 1), "seed_augmented_validation_accuracy": round(seed_accuracy, 4)}
    cache = Path(tempfile.mkdtemp()) / "c.h5"
    options = dict(input_size=size, weights=weights, progress=False)
    _, results["extract_seconds"] = timed(lambda: extract_features(DIGITS, cache, **options))
    runs = [("none", None, 0)] + [(name, augmentation, k) for name, augmentation in
                                  (("seed_transforms", Augmentation()), ("no_flip", Augmentation(flip=False))) for k in counts]
    for name, augmentation, k in runs:
        label = name if augmentation is None else f"{name}_k{k}"
        if augmentation is not None:
            summary, seconds = timed(lambda: extract_features(DIGITS, cache, augment=k, augmentation=augmentation, **options))
            results[f"{label}_views_seconds"], results[f"{label}_views_computed"] = round(seconds, 1), summary.views_computed
        for head in ("mlp", "logreg"):
            training, seconds = timed(lambda: train_head(cache, head, out=Path(tempfile.mkdtemp()) / "h", augment=augmentation is not None))
            results[f"{label}_{head}_validation_accuracy"] = round(training.results[0].scores["validation"]["accuracy"], 4)
            results[f"{label}_{head}_seconds"] = round(seconds, 1)
    # Our augmented job from scratch with the largest K: extract, every view, one mlp.
    largest = f"seed_transforms_k{counts[-1]}"
    views_seconds = sum(results[f"seed_transforms_k{k}_views_seconds"] for k in counts)
    ours = results["extract_seconds"] + views_seconds + results[f"{largest}_mlp_seconds"]
    results["ours_augmented_mlp_seconds"] = round(ours, 1)
    results["speedup_vs_seed_augmented"] = round(seed_seconds / ours, 2)
    results["another_head_speedup_vs_seed_augmented"] = round(seed_seconds / results[f"{largest}_mlp_seconds"], 1)
    return results


def precision(args) -> dict:
    data = photo_folder(args.images)
    images = scan_folder(data).images[: args.images]
    keras = import_keras()
    pixels = np.stack([np.asarray(keras.utils.load_img(data / image.path, target_size=(args.input_size,) * 2,
                                                        interpolation="bilinear"), dtype=np.uint8) for image in images])
    results = {"images": len(images), "input_size": args.input_size}
    features = {}
    for policy in ("float32", "mixed_bfloat16"):
        backbone = Backbone(FeatureConfig(input_size=args.input_size, weights="random", precision=policy, pooling="avg"))
        backbone(pixels[: args.batch_size])
        started = time.perf_counter()
        features[policy] = np.concatenate([backbone(pixels[i:i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)])
        results[f"{policy}_images_per_s"] = round(len(pixels) / (time.perf_counter() - started), 2)
    a, b = features["float32"], features["mixed_bfloat16"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    results["cosine_min"], results["cosine_mean"] = round(float(cosine.min()), 5), round(float(cosine.mean()), 5)
    results["speedup"] = round(results["mixed_bfloat16_images_per_s"] / results["float32_images_per_s"], 2)

    from sklearn.metrics import accuracy_score

    from classify import train_head
    from classify.splits import load_splits

    make_digits(DIGITS)
    validation, float32_heads = {}, {}
    for policy in ("float32", "mixed_bfloat16"):
        cache = Path(tempfile.mkdtemp()) / "c.h5"
        extract_features(DIGITS, cache, input_size=64, pooling="avg", weights="random", precision=policy, progress=False)
        with load_splits(cache, None, 0.2, 0) as splits:
            validation[policy] = splits.validation.load()
        for head in ("logreg", "mlp"):
            heads = [  # the mlp on these features swings with its seed: report the mean of five
                train_head(cache, head, seed=seed, out=Path(tempfile.mkdtemp()) / "head").results[0]
                for seed in range(1 if head == "logreg" else 5)
            ]
            accuracies = [result.scores["validation"]["accuracy"] for result in heads]
            results[f"{policy}_{head}_validation_accuracy"] = round(float(np.mean(accuracies)), 4)
            if len(accuracies) > 1:
                results[f"{policy}_{head}_validation_accuracy_by_seed"] = [round(a, 4) for a in accuracies]
            if policy == "float32":
                float32_heads[head] = [result.estimator for result in heads]
    # The features' own effect, without retraining's noise: the heads trained on float32
    # features score the validation images' bfloat16 features.
    assert list(validation["float32"].y) == list(validation["mixed_bfloat16"].y)
    for head, estimators in float32_heads.items():
        rows = validation["mixed_bfloat16"]
        accuracy = np.mean([accuracy_score(rows.y, e.predict(rows.X)) for e in estimators])
        results[f"float32_{head}_on_bfloat16_features_validation_accuracy"] = round(float(accuracy), 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("loaders", "seed-job", "augment", "precision"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="float32", help="loaders: float32, mixed_bfloat16 or mixed_float16 (GPU)")
    parser.add_argument("--repeat", type=int, default=1, help="loaders: best of this many interleaved runs")
    parser.add_argument("--photo-size", default="500x375", help="loaders: WxH of the JPEGs made (default 500x375)")
    parser.add_argument("--xla", action="store_true", help="loaders: also time the model alone compiled with XLA")
    parser.add_argument("--views", default="2,9", help="augment: views per training image, a comma-separated list "
                        "(9: with the image itself, a different version in each of the 10 epochs, as the blog recipe's generator gives)")
    args = parser.parse_args()
    experiment = {"loaders": loaders, "seed-job": seed_job, "augment": augment, "precision": precision}[args.experiment]
    print(json.dumps(experiment(args), indent=2))


if __name__ == "__main__":
    main()
