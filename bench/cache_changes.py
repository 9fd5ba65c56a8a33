"""What a run costs as the cache grows: unchanged, and after one small change.

    python bench/cache_changes.py --images 1439 20146 201460 --input-size 96

For each count N, a folder of N JPEGs (128x96, bench/extract_speed.py's photos) in
bench/data/copies-N-of-D-128x96/: D = min(N, `--distinct`) distinct photos, file i a hard
link to (a copy of the content of) photo i mod D, so that N files on disk are N files to
list, `stat`, plan, catalog and count, while VGG16 runs only D times when the cache is
first made (features are keyed by content) and the folder costs no more disk than D photos.
The victim (the file deleted, added back and edited) is first given content of its own
(mirrored), so that it is one image at every N: an add computes it, an edit rewrites only
it. The cache is made once (pooling none, seeded random weights); then, as a user would,
the real `extract-features` command (a new process each time, wall time) after each of
these changes, `--repeat` times:
  unchanged  nothing changed
  delete     one image moved out of the folder
  add        the same image moved back (its features are computed again)
  edit       one image rewritten with other content (computed: TensorFlow starts)
What these measure beyond process start is what a run costs before and after it computes:
listing the folder, reading the catalog, planning, committing and summing up. Reports the
median seconds of each, the cache's size on disk (the catalog and its shards), the ratio
of the largest count's medians to the smallest's, and the cost per file of each between
consecutive counts, (t(N2) - t(N1)) / (N2 - N1) in microseconds.
Also: `add 100`, a checkpoint of 100 new images, timed the same way; where the summary
has it, the median time each run spent writing (`save_seconds`); and what a checkpoint
costs inside a run (`checkpoint`): on a copy of each cache, the median seconds of
`Writer.flush()` (pending batches -> one new shard) for 32, 128 and 512 new rows, and of
`Writer.commit()` with nothing new (the catalog alone).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract_speed import photo_folder  # noqa: E402

SIZE = (128, 96)


def copies_folder(count: int, distinct: int) -> Path:
    """bench/data/copies-N-of-D-128x96/: file i (train/class<i mod 4>/<i>.jpg) a hard link to
    photo i mod D (a copy where links are refused). Made anew each time: a run may have
    edited a file."""
    distinct = min(count, distinct)
    photos = sorted(photo_folder(distinct, SIZE).glob("train/*/*.jpg"))
    folder = Path("bench/data") / f"copies-{count}-of-{distinct}-{SIZE[0]}x{SIZE[1]}"
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(4):
        (folder / "train" / f"class{label}").mkdir(parents=True)
    for i in range(count):
        target = folder / "train" / f"class{i % 4}" / f"{i:06d}.jpg"
        try:
            os.link(photos[i % distinct], target)
        except OSError:
            shutil.copyfile(photos[i % distinct], target)
    return folder


def command(data: Path, cache: Path, input_size: int) -> list[str]:
    return [sys.executable, "-m", "extract.cli", str(data), "--cache", str(cache), "--weights", "random",
            "--input-size", str(input_size), "--json"]


SAVES: dict[str, list[float]] = {}  # the run's own time spent writing (summary.save_seconds, where it exists)


def run(arguments: list[str], name: str | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(arguments, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"extract-features failed: {done.stderr[-800:]}")
    summary = json.loads(done.stdout)
    if name and "save_seconds" in summary:
        SAVES.setdefault(name, []).append(summary["save_seconds"])
    return seconds


def disk_mb(cache: Path) -> float:
    files = [cache, *Path(f"{cache}.shards").rglob("*")] if Path(f"{cache}.shards").exists() else [cache]
    return round(sum(path.stat().st_size for path in files if path.is_file()) / 2**20, 1)


def measure(count: int, distinct: int, input_size: int, repeat: int, scratch: Path) -> dict:
    data = copies_folder(count, distinct)
    victim = sorted(data.glob("train/*/*.jpg"))[count // 2]
    mirrored = Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    victim.unlink()  # content of its own (no copies): an add computes it, an edit rewrites it alone
    mirrored.save(victim, quality=90)
    aside = scratch / victim.name
    original = victim.read_bytes()
    cache = scratch / f"c{count}.h5"
    arguments = command(data, cache, input_size)
    result = {"images": count, "cold_seconds": round(run(arguments, "cold"), 1)}
    result["cache_mb"] = disk_mb(cache)
    times = {"unchanged": [], "delete": [], "add": [], "edit": []}
    for round_ in range(repeat):
        times["unchanged"].append(run(arguments, "unchanged"))
        shutil.move(victim, aside)
        times["delete"].append(run(arguments, "delete"))
        shutil.move(aside, victim)
        times["add"].append(run(arguments, "add"))
        Image.open(victim).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(victim, quality=90 - round_)
        times["edit"].append(run(arguments, "edit"))
        victim.write_bytes(original)
        run(arguments)  # back as it was (an edit too, not counted)
    result.update({name: round(statistics.median(values), 3) for name, values in times.items()})
    new = data / "train" / "added"
    new.mkdir()
    for i, source in enumerate(sorted(data.glob("train/class0/*.jpg"))[:100]):  # rotated: new content
        Image.open(source).rotate(90).save(new / f"{i}.jpg", quality=85)
    result["add_100"] = round(run(arguments, "add_100"), 3)
    shutil.rmtree(new)
    run(arguments)
    result["cache_mb_after"] = disk_mb(cache)
    result["checkpoint"] = checkpoints(cache, scratch / f"copy{count}.h5", repeat)
    shutil.rmtree(data)
    if SAVES:
        result["save_seconds"] = {name: round(statistics.median(values), 3) for name, values in SAVES.items()}
        SAVES.clear()
    return result


def checkpoints(cache: Path, copy: Path, repeat: int) -> dict:
    """Median seconds of a checkpoint's shard (flush) by rows added, and of a catalog commit."""
    from extract.catalog import open_cache
    from extract.recovery import open_stored
    from extract.writer import Writer

    shutil.copy(cache, copy)
    shutil.copytree(f"{cache}.shards", f"{copy}.shards")
    with open_cache(copy) as file:
        fingerprint = file.attrs["last_config"]
    writer = Writer(open_stored(copy, fingerprint))
    shape = tuple(writer.state.attrs["feature_shape"])
    rng = np.random.default_rng(0)
    flush: dict[int, list[float]] = {}
    for round_ in range(repeat):
        for rows in (32, 128, 512):
            keys = [f"{round_:08d}{rows:08d}{row:048d}" for row in range(rows)]
            writer.append(keys, rng.random((rows, *shape), dtype=np.float32) * (rng.random((rows, *shape)) < 0.3))
            started = time.perf_counter()
            writer.flush()
            flush.setdefault(rows, []).append(time.perf_counter() - started)
    commits = []
    for _ in range(repeat):
        started = time.perf_counter()
        writer.commit(writer.state)
        commits.append(time.perf_counter() - started)
    shutil.rmtree(f"{copy}.shards")
    copy.unlink()
    return {"flush_seconds": {rows: round(statistics.median(times), 4) for rows, times in flush.items()},
            "catalog_commit_seconds": round(statistics.median(commits), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1439, 20146, 201460])
    parser.add_argument("--distinct", type=int, default=1439, help="distinct photos among them (the rest are copies)")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="cache-changes-"))
    try:
        results = [measure(count, args.distinct, args.input_size, args.repeat, scratch) for count in args.images]
    finally:
        shutil.rmtree(scratch)
    small, large = results[0], results[-1]
    ratios = {name: round(large[name] / small[name], 2) for name in ("unchanged", "delete", "add", "edit", "add_100")}
    ratios["catalog_commit"] = round(large["checkpoint"]["catalog_commit_seconds"] / small["checkpoint"]["catalog_commit_seconds"], 2)
    ratios["flush_512"] = round(large["checkpoint"]["flush_seconds"][512] / small["checkpoint"]["flush_seconds"][512], 2)
    per_file = {
        f"{a['images']}-{b['images']}": {name: round((b[name] - a[name]) / (b["images"] - a["images"]) * 1e6, 1)
                                         for name in ("unchanged", "delete", "add", "edit")}
        for a, b in zip(results, results[1:])
    }
    print(json.dumps({"input_size": args.input_size, "results": results, "largest_over_smallest": ratios,
                      "microseconds_per_file": per_file}, indent=2))


if __name__ == "__main__":
    main()
