"""Augmented views of training images, made the way the blog recipe's `ImageDataGenerator` makes
them, but deterministic, so that their features can be cached.

The blog recipe draws a fresh random transform of every image every epoch. Here view `v` of an
image is drawn from a generator seeded by (seed, the image's SHA-256, v): the same
content, view index and seed always give the same pixels, so views are computed once and
a re-run computes only the views it lacks. View 0 is the image itself.

The transforms and their units are `ImageDataGenerator`'s (`shear_range` is in degrees,
so the blog recipe's 0.2 is a fifth of a degree; `zoom_range` z scales each axis by a factor in
[1 - z, 1 + z]; shifts are fractions of the side), applied with the same matrix, linear
interpolation and "nearest" fill, to the resized pixels, as the blog recipe's
`flow_from_directory` does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from extract.options import EXTRACT_FEATURES, check_options

METHOD = "imagedatagenerator-affine"  # recorded with the views; change it if the maths changes


@dataclass(frozen=True)
class Augmentation:
    """How views are made. The defaults are the blog recipe's `ImageDataGenerator` arguments."""

    shear: float = 0.2  # degrees, counter-clockwise; drawn from [-shear, shear]
    zoom: float = 0.2  # each axis scaled by a factor drawn from [1 - zoom, 1 + zoom]
    flip: bool = True  # horizontal flip with probability 1/2
    rotation: float = 0.0  # degrees, drawn from [-rotation, rotation]
    shift: float = 0.0  # fraction of the height (and of the width), drawn from [-shift, shift]
    seed: int = 0

    def validate(self) -> None:

        check_options({"--shear": self.shear, "--zoom": self.zoom, "--rotation": self.rotation, "--shift": self.shift,
                       "--seed": self.seed}, EXTRACT_FEATURES)

    def identity(self) -> dict:
        """The facts that decide a view's pixels (the number of views is not one of them)."""
        return dict(asdict(self), method=METHOD)

    @cached_property  # asked once per image on re-runs
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def parameters(self, sha256: str, view: int, shape) -> dict:
        """View `view`'s transform of an image with this content, in the terms of
        `ImageDataGenerator.apply_transform` (tx, zx: rows; ty, zy: columns)."""
        rng = np.random.default_rng([self.seed, int(sha256[:32], 16), view])
        height, width = shape[:2]
        # Every draw is made, used or not, so that one setting does not move another's values.
        theta, tx, ty, shear = rng.uniform(-1, 1, 4) * (self.rotation, self.shift * height, self.shift * width, self.shear)
        zx, zy = rng.uniform(1 - self.zoom, 1 + self.zoom, 2)
        flip = bool(rng.random() < 0.5) and self.flip
        return {"theta": theta, "tx": tx, "ty": ty, "shear": shear, "zx": zx, "zy": zy, "flip_horizontal": flip}

    def view(self, pixels: np.ndarray, sha256: str, view: int) -> np.ndarray:
        """View `view` (>= 1) of an image's resized (height, width, 3) pixels, as float32."""
        return apply_transform(pixels, self.parameters(sha256, view, pixels.shape))


def apply_transform(pixels: np.ndarray, parameters: dict) -> np.ndarray:
    """`ImageDataGenerator.apply_transform` for (height, width, channels) arrays: one affine
    map (rotation, shift, shear, zoom about the centre), then the horizontal flip."""
    matrix = np.eye(3)
    theta, shear = np.deg2rad(parameters["theta"]), np.deg2rad(parameters["shear"])
    if theta:
        matrix = matrix @ [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    if parameters["tx"] or parameters["ty"]:
        matrix = matrix @ [[1, 0, parameters["tx"]], [0, 1, parameters["ty"]], [0, 0, 1]]
    if shear:
        matrix = matrix @ [[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]]
    if parameters["zx"] != 1 or parameters["zy"] != 1:
        matrix = matrix @ [[parameters["zx"], 0, 0], [0, parameters["zy"], 0], [0, 0, 1]]
    result = np.asarray(pixels, dtype=np.float32)
    if not np.array_equal(matrix, np.eye(3)):
        from scipy import ndimage  # 0.3 s to import: only when views are made

        height, width = result.shape[:2]
        centre = np.array([[1, 0, height / 2 - 0.5], [0, 1, width / 2 - 0.5], [0, 0, 1]])
        back = np.array([[1, 0, 0.5 - height / 2], [0, 1, 0.5 - width / 2], [0, 0, 1]])
        matrix = centre @ matrix @ back  # about the centre
        matrix[:, [0, 1]] = matrix[:, [1, 0]]  # Keras builds it in (x, y) order and swaps to
        matrix[[0, 1]] = matrix[[1, 0]]  # numpy's (row, column): kept, so views match its own
        result = np.stack([
            ndimage.affine_transform(result[..., channel], matrix[:2, :2], matrix[:2, 2], order=1, mode="nearest")
            for channel in range(result.shape[-1])
        ], axis=-1)
    if parameters["flip_horizontal"]:
        result = result[:, ::-1]
    return np.ascontiguousarray(result)
