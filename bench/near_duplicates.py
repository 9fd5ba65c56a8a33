"""Near duplicates: which cosine similarity of the cached features tells a copy of an image
from another image? The measurement behind check-data's default --near-threshold.

    python bench/near_duplicates.py --sizes 32 64 224

Distinct images with structure: scikit-learn's digits upscaled (many images of one class,
the hardest "not duplicates"), crops of scikit-learn's two sample photos, the decodable
images of tests/corpus, and tests/planted.py's coloured patterns. Then copies of some of
them, each kind on its own images: resized (0.5x, 0.75x, 2x), re-encoded (JPEG quality 95,
75, 50), PNG <-> JPEG, cropped (2-5% off the edges), brighter or darker (+-8%).

The features are what check-data compares: extract_features with pooling="avg" (one vector
per image), L2-normalised, cosine = dot product; and, to compare, centred first (the mean
vector of the set subtracted). The network's weights are random (seeded, as the tests'), or
`--weights FILE`: ImageNet's could not be downloaded where this was measured, so its numbers
say how the pipeline behaves, not where ImageNet features put the line.

For each input size, raw and centred, the script prints the similarity of each kind of copy
to its original and of each original to its nearest other original (percentiles), the
threshold between them that classifies the most of both right, and the recall of copies and
the false pairs (pairs of distinct images at or above it) at the candidate thresholds.
"""

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.backends import write_weights  # noqa: E402
from planted import CLASSES, class_image  # noqa: E402

CANDIDATES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)
CORPUS = ("cmyk.jpg", "exif_rotated.jpg", "gray.png", "palette.gif", "rgba_transparent.png", "webp_named.jpeg")


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _resized(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)


def _cropped(image: Image.Image, rng) -> Image.Image:
    """2-5% of each dimension cut off, split at random between the two edges."""
    cut = (rng.uniform(0.02, 0.05, 2) * image.size).astype(int)
    left, top = (rng.integers(0, c + 1) for c in cut)
    return image.crop((left, top, image.width - (cut[0] - left), image.height - (cut[1] - top)))


# kind -> (image, rng) -> (bytes, extension)
KINDS = {
    "resize 0.5x": lambda image, rng: (_encoded(_resized(image, 0.5), "PNG"), "png"),
    "resize 0.75x": lambda image, rng: (_encoded(_resized(image, 0.75), "PNG"), "png"),
    "resize 2x": lambda image, rng: (_encoded(_resized(image, 2.0), "PNG"), "png"),
    "jpeg q95": lambda image, rng: (_encoded(image, "JPEG", quality=95), "jpg"),
    "jpeg q75": lambda image, rng: (_encoded(image, "JPEG", quality=75), "jpg"),
    "jpeg q50": lambda image, rng: (_encoded(image, "JPEG", quality=50), "jpg"),
    "png->jpeg->png": lambda image, rng: (_encoded(Image.open(io.BytesIO(_encoded(image, "JPEG", quality=90))), "PNG"), "png"),
    "crop 2-5%": lambda image, rng: (_encoded(_cropped(image, rng), "PNG"), "png"),
    "brightness +-8%": lambda image, rng: (_encoded(ImageEnhance.Brightness(image).enhance(rng.choice([0.92, 1.08])), "PNG"), "png"),
}


def original_images(rng, digits: int, photos: int, patterns: int) -> dict[str, Image.Image]:
    """name -> distinct image (its group is the name's first word)."""
    from sklearn.datasets import load_digits, load_sample_images

    found = {}
    data = load_digits()
    for i in range(digits):  # the first `digits` of the set: about digits/10 of each digit
        pixels = (data.images[i] * (255 / 16)).astype(np.uint8)
        size = int(rng.integers(48, 129))
        found[f"digit-{data.target[i]}-{i}"] = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    sources = load_sample_images().images
    for i in range(photos):
        source = sources[i % 2]
        height = int(rng.integers(120, 300))
        width = int(height * rng.uniform(0.75, 1.5))
        top, left = rng.integers(0, source.shape[0] - height), rng.integers(0, source.shape[1] - width)
        found[f"photo-{i}"] = Image.fromarray(source[top : top + height, left : left + width])
    for i in range(patterns):
        label = list(CLASSES)[i % len(CLASSES)]
        found[f"pattern-{label}-{i}"] = class_image(label, 10_000 + i)
    for name in CORPUS:
        with Image.open(ROOT / "tests" / "corpus" / name) as image:
            found[f"corpus-{Path(name).stem}"] = image.convert("RGB")
    return found


def write_set(folder: Path, originals: dict[str, Image.Image], per_kind: int, rng) -> dict[str, tuple[str, str]]:
    """The originals (PNG) and `per_kind` copies of each kind, each kind of other originals
    (drawn across the groups); returns copy path -> (original path, kind)."""
    folder.mkdir(parents=True)
    for name, image in originals.items():
        image.save(folder / f"{name}.png")
    names = list(rng.permutation(list(originals)))
    copies = {}
    for k, (kind, make) in enumerate(KINDS.items()):
        for name in names[k * per_kind : (k + 1) * per_kind]:
            data, extension = make(originals[name], rng)
            copy = f"{name}~{kind.replace(' ', '_').replace('>', '').replace('%', '')}.{extension}"
            (folder / copy).write_bytes(data)
            copies[copy] = (f"{name}.png", kind)
    return copies


def unit_vectors(folder: Path, weights: Path, size: int, scratch: Path) -> tuple[list[str], np.ndarray]:
    """Every image's features as check-data sees them: one pooled vector, L2-normalised."""
    from extract import FeatureCache, extract_features

    cache = scratch / f"features-{size}.h5"
    started = time.perf_counter()
    extract_features(folder, cache, input_size=size, weights=weights, pooling="avg", layout="unlabeled", progress=False)
    print(f"  {size} px: extracted in {time.perf_counter() - started:.0f} s", flush=True)
    with FeatureCache(cache) as opened:
        paths = [Path(p).name for p in opened.paths().astype(str)]
        X = opened.features().astype(np.float64)
    return paths, X


def normalised(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def separation(paths: list[str], X: np.ndarray, copies: dict[str, tuple[str, str]]) -> dict:
    """Copies' similarity to their originals, by kind; each original's to its nearest other
    original (also by group: digits, photos ...); and the similarities of every pair of
    distinct originals."""
    row = {path: i for i, path in enumerate(paths)}
    V = normalised(X)
    kinds = {}
    for copy, (original, kind) in copies.items():
        kinds.setdefault(kind, []).append(float(V[row[copy]] @ V[row[original]]))
    originals = [row[p] for p in paths if p not in copies]
    S = V[originals] @ V[originals].T
    np.fill_diagonal(S, -np.inf)
    pairs = S[np.triu_indices(len(originals), 1)]
    groups = np.array([paths[i].split("-")[0] for i in originals])
    nearest = S.max(axis=1)
    by_group = {f"  nearest, {g} images": nearest[groups == g] for g in dict.fromkeys(groups)}
    return {"kinds": {k: np.array(v) for k, v in kinds.items()}, "nearest": nearest, "by_group": by_group, "pairs": pairs}


def best_threshold(copies: np.ndarray, nearest: np.ndarray) -> tuple[float, float]:
    """The threshold (midway between two observed values) that gets the most of copies
    (>= it) and nearest distinct images (< it) right, as the mean of the two shares; and that share."""
    values = np.unique(np.concatenate([copies, nearest]))
    cuts = np.concatenate([[values[0]], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-9]])
    scores = [((copies >= t).mean() + (nearest < t).mean()) / 2 for t in cuts]
    best = int(np.argmax(scores))
    return float(cuts[best]), float(scores[best])


def report(title: str, found: dict, images: int) -> None:
    print(f"\n{title}")
    print(f"  {'':<26}{'n':>5}{'min':>9}{'p5':>9}{'p50':>9}{'p95':>9}{'max':>9}")
    for kind, values in [*found["kinds"].items(), ("nearest distinct image", found["nearest"]), *found["by_group"].items()]:
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        print(f"  {kind:<26}{len(values):>5}{values.min():>9.4f}{p5:>9.4f}{p50:>9.4f}{p95:>9.4f}{values.max():>9.4f}")
    every_copy = np.concatenate(list(found["kinds"].values()))
    threshold, share = best_threshold(every_copy, found["nearest"])
    gap = every_copy.min() - found["nearest"].max()
    print(f"  best threshold {threshold:.4f} ({share:.1%} of copies and nearest distinct images right); "
          f"lowest copy minus highest distinct: {gap:+.4f}")
    print(f"  {'threshold':>10}{'recall':>9}  false pairs (of {len(found['pairs'])} distinct pairs; per image)")
    for t, mark in [*((t, "") for t in CANDIDATES), (round(threshold, 4), "  the best threshold")]:
        false = int((found["pairs"] >= t).sum())
        print(f"  {t:>10}{(every_copy >= t).mean():>9.1%}  {false:>6} ({false / images:.2f}){mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    parser.add_argument("--digits", type=int, default=60)
    parser.add_argument("--photos", type=int, default=30)
    parser.add_argument("--patterns", type=int, default=40)
    parser.add_argument("--per-kind", type=int, default=12, help="copies of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, help="a VGG16 weights file (such as ImageNet's, downloaded by hand); "
                                                     "default: random weights, seeded as the tests'")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="near-duplicates-"))
    try:
        originals = original_images(rng, args.digits, args.photos, args.patterns)
        copies = write_set(scratch / "images", originals, args.per_kind, rng)
        weights = args.weights or scratch / "vgg16_notop_random.h5"
        if not args.weights:
            write_weights(weights, 32)
        print(f"{len(originals)} distinct images, {len(copies)} copies ({args.per_kind} of each of {len(KINDS)} kinds); "
              f"VGG16 weights {args.weights or 'random (seed 1234)'}, pooling avg")
        for size in args.sizes:
            paths, X = unit_vectors(scratch / "images", weights, size, scratch)
            report(f"{size} px, cosine", separation(paths, X, copies), len(originals))
            report(f"{size} px, cosine after centring", separation(paths, X - X.mean(axis=0), copies), len(originals))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
