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
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Full, Queue
from dataclasses import dataclass, field
from typing import Callable, Container, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from extract.augment import Augmentation
from extract.files import read_bounded
from extract.layout import ImageFile, place_sample
from extract.errors import UsageError
from extract.sources import SEPARATOR, Shard, member_path, samples, shard_kind, shard_of
from extract.sources.location import open_location
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
# The most bytes of shards' samples read and not yet decoded (`load_all`): a tar of 250 MB
# members of a valid format would otherwise hold up to 2 x prefetch of them (tens of GB).
# Never reached by photos (64 samples ahead of 300 KB are 19 MB); one sample always passes.
BYTES_IN_FLIGHT = 4 * MAX_FILE_BYTES



@dataclass
class Loaded:
    """One image after reading: pixels to compute (and views), or only its hash when
    everything is already known, or an error."""

    image: ImageFile
    sha256: str | None = None
    pixels: np.ndarray | None = None  # uint8 (size, size, 3)
    error: str | None = None
    views: dict[int, np.ndarray] = field(default_factory=dict)  # view number -> float32 pixels
    shard: Shard | None = None  # the shard a sample (or a shard's end) comes from
    samples: int | None = None  # set on a shard's end: the samples it gave (`image` is then the shard's own)


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
    location, image: ImageFile, size: int, interpolation: str, known: Container[str] = (),
    views: ViewRequest | None = None, draft: bool = False,
) -> Loaded:
    """Read, hash and decode one image file of `location` (anything with `open(path)`: a
    `sources.folder.Folder`, a `sources.remote.Remote`), unless its hash is in `known` and it
    needs no views; make the views `views` asks for."""
    try:
        with location.open(image.path) as file:
            data, refused = read_image_bytes(file)
    except OSError as error:
        return Loaded(image, error=f"cannot read file: {error.strerror or error}")
    if refused:
        return Loaded(image, error=refused)
    return load_bytes(image, data, size, interpolation, known, views, draft)


def load_bytes(
    image: ImageFile, data: bytes, size: int, interpolation: str, known: Container[str] = (),
    views: ViewRequest | None = None, draft: bool = False,
) -> Loaded:
    """`load` for an image whose bytes are in hand (a shard's sample): hash, decode, views."""
    sha256 = hashlib.sha256(data).hexdigest()
    missing = views.missing(image, sha256) if views else ()
    if sha256 in known and not missing:
        return Loaded(image, sha256)
    try:
        pixels = decode(data, size, interpolation, draft)
    except Exception as error:  # any decoder failure is a failure of this file only
        return Loaded(image, sha256, error=describe_failure(error, data))
    return Loaded(image, sha256, pixels, views={view: views.augmentation.view(pixels, sha256, view) for view in missing})


def shard_samples(location, shard: Shard) -> Iterator[tuple[ImageFile, bytes | None, str | None]]:
    """Each sample of a shard of `location`, placed (`layout.place_sample`), with its bytes or
    why it cannot be stored; then, last, the shard's own entry (its path), with why the rest of
    it could not be read, or None: the end of the shard."""
    end = ImageFile(shard.path, "", "", shard.size, shard.stamp)
    try:
        file = location.open(shard.path)
    except OSError as error:
        yield end, None, f"cannot read file: {error.strerror or error}"
        return
    rest = None
    with file:
        for sample in samples(shard.kind, file, shard.path, MAX_FILE_BYTES):
            if not sample.key:
                rest = sample.error
                continue
            placed = place_sample(shard, sample) if sample.error is None else sample.error
            label, split = placed if isinstance(placed, tuple) else ("", "")
            image = ImageFile(member_path(shard.path, sample.key), label, split, shard.size, shard.stamp)
            yield (image, sample.data, None) if isinstance(placed, tuple) else (image, None, placed)
    yield end, None, rest


def read_image_bytes(file) -> tuple[bytes, str | None]:
    """The bytes of an open image file, and None; or b"" and why it was not read whole:
    over `MAX_FILE_BYTES`, or, when large, a header that is not an image's."""
    descriptor = _descriptor(file)
    size = os.fstat(descriptor).st_size if descriptor is not None else int(getattr(file, "size", 0) or 0)
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
    data = read_bounded(file, MAX_FILE_BYTES) if descriptor is not None else file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:  # it grew since (or, like /proc's files, it does not know its size)
        return b"", f"file too large: over {MAX_FILE_BYTES} bytes (at most {MAX_FILE_BYTES} are read for one image)"
    return data, None


def load_all(
    location,
    items: Iterable[ImageFile | Shard],
    size: int,
    interpolation: str,
    known: Container[str] = (),
    workers: int = 4,
    prefetch: int = 64,
    views: ViewRequest | None = None,
    draft: bool = False,
) -> Iterator[Loaded]:
    """`load` every image file of `location` and every sample of its shards in `items`, on a
    pool of threads (Pillow and hashlib release the GIL), yielding results in input order with
    at most `prefetch` images and views in flight (an image that may need K views counts 1 + K;
    one image is always let through), so memory stays bounded whatever K. Shards are read in
    order by a thread of their own, a few samples ahead of the decoding (and no more than
    `BYTES_IN_FLIGHT` of their bytes waiting to be decoded); each shard's
    samples are followed by its end (`Loaded.samples` set)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reader")
    pending: deque = deque()
    weight = 1 + (views.per_image if views else 0)
    arguments = (size, interpolation, known, views, draft)

    def jobs() -> Iterator[Future]:
        for item in items:
            if not isinstance(item, Shard):
                yield pool.submit(load, location, item, *arguments)
                continue
            count = 0
            for image, data, error in _ahead(budget.taken(shard_samples(location, item)), max(1, prefetch // weight)):
                if image.path == item.path:  # the shard's end
                    yield _ready(Loaded(image, error=error, shard=item, samples=count))
                    continue
                count += 1
                yield (_ready(Loaded(image, error=error, shard=item)) if data is None else
                       pool.submit(_with_shard, item, budget.giving(len(data), load_bytes), image, data, *arguments))

    budget = _Budget(BYTES_IN_FLIGHT)
    try:
        for job in jobs():
            pending.append(job)
            if len(pending) * weight >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        budget.close()  # a shard's reader waiting for bytes to be given back goes on, to its stop
        pool.shutdown(wait=True, cancel_futures=True)


class _Budget:
    """The bytes of shards' samples read and not yet decoded, at most `most` (one sample always
    passes): a shard's reader waits in `taken` until decoding gives bytes back (`giving`)."""

    def __init__(self, most: int):
        self.most, self.held, self.closed = most, 0, False
        self._changed = threading.Condition()

    def taken(self, items: Iterator[tuple[ImageFile, bytes | None, str | None]]) -> Iterator:
        """`items` (a shard's samples), each one's bytes taken from the budget before it is let through."""
        for item in items:
            size = len(item[1] or b"")
            with self._changed:
                while self.held and self.held + size > self.most and not self.closed:
                    self._changed.wait()
                self.held += size
            yield item

    def giving(self, size: int, load: Callable) -> Callable:
        """`load`, giving `size` bytes back once it is done with them."""
        def load_then_give(*arguments):
            try:
                return load(*arguments)
            finally:
                with self._changed:
                    self.held -= size
                    self._changed.notify_all()
        return load_then_give

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


def _with_shard(shard: Shard, load, *arguments) -> Loaded:
    loaded = load(*arguments)
    loaded.shard = shard
    return loaded


def _ready(loaded: Loaded) -> Future:
    future: Future = Future()
    future.set_result(loaded)
    return future


def _ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, made by a thread of their own up to `depth` ahead of the caller: a shard is
    read (from a disk, a network) while the samples before are decoded. An error in making
    them is raised here; a caller that stops early stops the thread at its next item."""
    queue: Queue = Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def make() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as error:  # handed to the caller, raised there
            put((end, error))
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    thread = threading.Thread(target=make, name="shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)  # a read stuck on a network ends on its own; the thread is a daemon


def _descriptor(file) -> int | None:
    """A local file's descriptor; None for a file object with none (a network stream)."""
    try:
        return file.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def stored_images(data_dir: str, paths: Iterable[str], storage_options: dict | None = None) -> dict[str, bytes | str]:
    """The bytes of images as a cache names them (its data folder, and stored paths: files,
    and shards' samples `<shard>#<key>`), read again from where they came from; or, for each
    one that cannot be read now, why (a str). Each shard is read once, up to its last sample
    asked for. (For report pages: a few dozen images.)"""
    wanted: dict[str, dict[str, str]] = {}  # shard -> key -> stored path
    out: dict[str, bytes | str] = {}
    try:
        location = open_location(data_dir, storage_options)
    except UsageError as error:
        return {path: str(error) for path in paths}
    for path in paths:
        shard = shard_of(path, shard_kind)
        if shard:
            wanted.setdefault(shard, {})[path[len(shard) + len(SEPARATOR):]] = path
            continue
        try:
            with location.open(path) as file:
                data, refused = read_image_bytes(file)
            out[path] = refused or data
        except OSError as error:
            out[path] = f"cannot read file: {error.strerror or error}"
    for shard, keys in wanted.items():
        try:
            with location.open(shard) as file:
                for sample in samples(shard_kind(shard), file, shard, MAX_FILE_BYTES):
                    if sample.key in keys:
                        out[keys.pop(sample.key)] = sample.error or sample.data
                    if not keys:
                        break
        except OSError as error:
            out.update({path: f"cannot read {shard}: {error.strerror or error}" for path in keys.values()})
            continue
        out.update({path: f"not in {shard} now" for path in keys.values()})
    return out


def check_shards(location, shards: Iterable[Shard]) -> None:
    """Refuse, before any work, Parquet shards that hold no image column (`parquet.check_parquet`
    reads only their footers); a tar cannot be checked short of reading it."""
    parquet = [shard for shard in shards if shard.kind == "parquet"]
    if not parquet:
        return
    from extract.sources.parquet import check_parquet

    for shard in parquet:
        try:
            with location.open(shard.path) as file:
                check_parquet(file, shard.path)
        except OSError:
            continue  # unreadable now: its failure row comes when it is read


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
