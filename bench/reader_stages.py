"""Where the reader's time goes, per image, on one thread: read, SHA-256, JPEG decode, resize,
and the whole `decode()` exactly (as load_img) and in draft mode (--decode draft).

    python bench/reader_stages.py --images 200 --input-size 64
    python bench/reader_stages.py --images 40 --input-size 224 --photo-size 4000x3000

Uses the JPEGs made from real photos by bench/extract_speed.py (bench/data/photos-N[-WxH]/).
"""

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract_speed import photo_folder  # noqa: E402
from extract.layout import scan_folder  # noqa: E402
from extract.reader import INTERPOLATIONS, decode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--photo-size", default="500x375", help="WxH of the JPEGs made (default 500x375)")
    args = parser.parse_args()
    photo = tuple(int(side) for side in args.photo_size.split("x"))
    data = photo_folder(args.images, photo)
    paths = [data / image.path for image in scan_folder(data).images]
    stages = ("read", "sha256", "decode", "resize", "whole decode()", "whole decode(draft)")
    size, spent = args.input_size, dict.fromkeys(stages, 0.0)
    for path in paths:
        started = time.perf_counter()
        data_bytes = path.read_bytes()
        spent["read"] += time.perf_counter() - started
        started = time.perf_counter()
        hashlib.sha256(data_bytes).hexdigest()
        spent["sha256"] += time.perf_counter() - started
        started = time.perf_counter()
        image = Image.open(io.BytesIO(data_bytes))
        image.load()
        spent["decode"] += time.perf_counter() - started
        started = time.perf_counter()
        image.resize((size, size), INTERPOLATIONS["bilinear"])
        spent["resize"] += time.perf_counter() - started
        started = time.perf_counter()
        decode(data_bytes, size)
        spent["whole decode()"] += time.perf_counter() - started
        started = time.perf_counter()
        decode(data_bytes, size, draft=True)
        spent["whole decode(draft)"] += time.perf_counter() - started
    for stage, seconds in spent.items():
        print(f"{stage:<15} {1000 * seconds / len(paths):6.3f} ms per image")


if __name__ == "__main__":
    main()
