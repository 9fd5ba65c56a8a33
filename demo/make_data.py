"""Write a small real image data set in the blog recipe's layout, from a source that ships with
the dependencies: scikit-learn's 1,797 scans of handwritten digits (8x8, 16 grey levels).

    python demo/make_data.py data/demo

makes data/demo/{train,validation,test}/<digit>/NNNN.{png,jpg} (60/20/20, stratified,
the same split every time). Existing files are left as they are, so a second run
changes nothing and extract-features then has nothing to compute.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SIDE = 32  # the scans are upscaled (nearest) so that they are viewable; extraction resizes anyway


def main(target: str) -> None:
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, rest = train_test_split(indices, test_size=0.4, stratify=digits.target, random_state=0)
    validation, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    written = 0
    for split, chosen, suffix in (("train", train, "png"), ("validation", validation, "jpg"), ("test", test, "jpg")):
        for index in chosen:
            path = Path(target, split, str(digits.target[index]), f"{index:04d}.{suffix}")
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (255 - digits.images[index] * 255 / 16).astype(np.uint8)  # dark ink on white
            Image.fromarray(pixels).resize((SIDE, SIDE), Image.Resampling.NEAREST).save(path, quality=95)
            written += 1
    print(f"{target}: {len(indices)} digit images ({len(train)} train, {len(validation)} validation, "
          f"{len(test)} test); {written} written now")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
