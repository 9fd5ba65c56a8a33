"""Read image files: bytes -> SHA-256 -> decoded, resized RGB pixels.

A file that cannot be read or decoded becomes a `Loaded` with an `error`, never an
exception: one broken image must not stop a run over a folder nobody curated. Only regular
files are opened (`files.open_regular`: without blocking, checked on the descriptor), and no
more than `MAX_FILE_BYTES` of one is read; a large file's header is checked before it is read
whole. Augmented views (see `augment`) are made here too, from the decoded pixels, off the
network's path, with images and views in flight bounded (`load_all`).

For an image without EXIF rotation, `decode` returns exactly
``keras.utils.img_to_array(keras.utils.load_img(path, target_size=(S, S),
interpolation=I))`` (as uint8), so anyone can reproduce a cached feature with plain
Keras. Two deliberate differences, both where Keras's result is wrong: EXIF orientation
is applied, and 16-bit images are scaled to 8 bits instead of saturating at 255.
With `draft=True` (opt-in, `--decode draft`) a JPEG is decoded at 1/2, 1/4 or 1/8 of its
size when that is still at least S x S (Pillow's draft mode), then resized: several
times faster on large photos, and the pixels differ slightly from `load_img`'s.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Container, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from extract.augment import Augmentation
from extract.files import open_regular, read_bounded
from extract.layout import ImageFile
from extract.options import INTERPOLATIONS as FILTER_NAMES

# The names keras.utils.load_img accepts (options.INTERPOLATIONS), mapped to the same Pillow filters.
INTERPOLATIONS = {name: Image.Resampling[name.upper()] for name in FILTER_NAMES}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# The most read of one file: 256 MiB holds an uncompressed 8-bit RGB image of 89.5 million
# pixels, where Pillow starts warning of a decompression bomb (Image.MAX_IMAGE_PIXELS); a
# camera's JPEG is 5-50 MB. Past it a file is refused by its size, before it is read.
MAX_FILE_BYTES = 256 * 2**20
# A file larger than this has its header checked (Pillow's open reads only the header)
# before it is read whole, so a large file that is no image costs a few bytes, not its size.
HEADER_CHECK_BYTES = 4 * 2**20



@dataclass
class Loaded:
    """One image after reading: pixels to compute (and views), or only its hash when
    everything is already known, or an error."""

    image: ImageFile
    sha256: str | None = None
    pixels: np.ndarray | None = None  # uint8 (size, size, 3)
    error: str | None = None
    views: dict[int, np.ndarray] = field(default_factory=dict)  # view number -> float32 pixels


@dataclass(frozen=True)
class ViewRequest:
    """Which augmented views to make: `missing(image, sha256)` names the view numbers
    still to compute for that image (none for images that are not for training)."""

    augmentation: Augmentation
    missing: Callable[[ImageFile, str], Sequence[int]]
    per_image: int = 1  # the most views one image can need (bounds what is in flight)


def decode(data: bytes, size: int, interpolation: str = "bilinear", draft: bool = False) -> np.ndarray:
    """Decode image bytes (any format Pillow reads, recognised by content) into a uint8
    array of shape (size, size, 3). Raises on anything that is not a readable image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. palette transparency notes; bombs still raise
        image = Image.open(io.BytesIO(data))
        if draft:
            image.draft(None, (size, size))  # JPEG only; other formats ignore it
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
            image = _to_8_bit(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), INTERPOLATIONS[interpolation])
        return np.asarray(image, dtype=np.uint8)


def load(
    root: Path, image: ImageFile, size: int, interpolation: str, known: Container[str] = (),
    views: ViewRequest | None = None, draft: bool = False,
) -> Loaded:
    """Read, hash and decode one image file, unless its hash is in `known` and it needs
    no views; make the views `views` asks for."""
    try:
        with open_regular(root / image.path) as file:
            data, refused = read_image_bytes(file)
    except OSError as error:
        return Loaded(image, error=f"cannot read file: {error.strerror or error}")
    if refused:
        return Loaded(image, error=refused)
    sha256 = hashlib.sha256(data).hexdigest()
    missing = views.missing(image, sha256) if views else ()
    if sha256 in known and not missing:
        return Loaded(image, sha256)
    try:
        pixels = decode(data, size, interpolation, draft)
    except Exception as error:  # any decoder failure is a failure of this file only
        return Loaded(image, sha256, error=describe_failure(error, data))
    return Loaded(image, sha256, pixels, views={view: views.augmentation.view(pixels, sha256, view) for view in missing})


def read_image_bytes(file) -> tuple[bytes, str | None]:
    """The bytes of an open image file, and None; or b"" and why it was not read whole:
    over `MAX_FILE_BYTES`, or, when large, a header that is not an image's."""
    size = os.fstat(file.fileno()).st_size
    if size > MAX_FILE_BYTES:
        return b"", f"file too large: {size} bytes (at most {MAX_FILE_BYTES} are read for one image)"
    if size > HEADER_CHECK_BYTES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Image.open(file)  # reads the header only (not closed: that would close our file)
        except Exception as error:
            return b"", describe_failure(error, b"?")
        file.seek(0)
    data = read_bounded(file, MAX_FILE_BYTES)
    if len(data) > MAX_FILE_BYTES:  # it grew since (or, like /proc's files, it does not know its size)
        return b"", f"file too large: over {MAX_FILE_BYTES} bytes (at most {MAX_FILE_BYTES} are read for one image)"
    return data, None


def load_all(
    root: Path,
    images: Iterable[ImageFile],
    size: int,
    interpolation: str,
    known: Container[str] = (),
    workers: int = 4,
    prefetch: int = 64,
    views: ViewRequest | None = None,
    draft: bool = False,
) -> Iterator[Loaded]:
    """`load` every image on a pool of threads (Pillow and hashlib release the GIL),
    yielding results in input order with at most `prefetch` images and views in flight
    (an image that may need K views counts 1 + K; one image is always let through), so
    memory stays bounded whatever K."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reader")
    pending: deque = deque()
    weight = 1 + (views.per_image if views else 0)
    todo = iter(images)
    try:
        for image in todo:
            pending.append(pool.submit(load, root, image, size, interpolation, known, views, draft))
            if len(pending) * weight >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def describe_failure(error: Exception, data: bytes) -> str:
    """A short, plain reason for a file that could not be decoded."""
    if not data:
        return "empty file"
    if isinstance(error, Image.DecompressionBombError):
        return f"refused as a possible decompression bomb: {error}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    message = str(error) or type(error).__name__
    if "truncated" in message:
        return f"truncated image: {message}"
    return f"cannot decode image: {message}"


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale to 8 bits by scaling, not clipping."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
        values = values.astype(np.uint32) >> 8
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
