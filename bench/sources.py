"""Reading and extraction speed by source: the same small JPEGs as a folder, as WebDataset tars,
as Parquet, locally and through a loopback S3 server (issue 31).

    python bench/sources.py --images 10000 --repeat 3
    python bench/sources.py --images 2000 --skip-s3 --skip-extract --repeat 1   (a quick look)

Makes N JPEGs once under /tmp/bench31/ (96x96, gradients plus noise, quality 90, 4.5 KB on average)
and puts the same bytes in every form: a folder in the classes layout, tars of 1,000 samples
(KEY.jpg + KEY.cls), Parquet files of 1,000 rows in the Hugging Face layout (struct
image{bytes, path}, ClassLabel names in the schema metadata), and the tars and Parquet files
again in a moto S3 server that this script starts in a process of its own on 127.0.0.1.
Then, best and median of --repeat runs:
  read     scan_folder + load_all over every image at 64 px, 2 threads, no network model: images/s,
           and CPU ms per image (this process's threads and the S3 server's: on a shared
           machine it compares sources where wall time follows the others' load)
  extract  extract_features(..., input_size=64, pooling="avg", weights="random") into a fresh
           cache: images/s and seconds; then the same again (nothing new): seconds
  memory   peak RSS of `read` over tars of N and of 10N samples (the same bytes under other
           keys), each in a process of its own (ru_maxrss); and the listing and plan cost of
           N and 10N samples already cached: scan_folder + plan.shards_to_read against catalog rows
           made for them (`CatalogRows`), as a re-run does before it reads anything
The sources take turns in each round. Prints markdown tables. The goals (issue 31): tar and
Parquet at least as fast as the folder locally; through S3 at least 0.8 of local; memory flat
in the number of samples. Results: docs/performance.md, "Sources".
"""

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.layout import scan_folder  # noqa: E402
from extract.plan import shards_to_read  # noqa: E402
from extract.reader import load_all  # noqa: E402
from extract.sources import member_path  # noqa: E402
from extract.state import CatalogRows  # noqa: E402

ROOT = Path("/tmp/bench31")
PER_SHARD = 1000
CLASSES = ("cat", "dog", "fox", "owl")
BUCKET = "bench31"
# What moto needs and nothing of the machine's own AWS setup (as tests/servers.py's S3_ENV).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
S3_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def make_jpeg(i: int) -> bytes:
    """JPEG i: 96x96, a seeded colour gradient with noise (sd 12), quality 90 (about 5 KB)."""
    rng = np.random.default_rng(i)
    ramp = np.linspace(0, 1, 96, dtype=np.float32)
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 1)
    mix = (angle * ramp[:, None] + (1 - angle) * ramp[None, :])[..., None]
    pixels = start + mix * (end - start) + rng.normal(0, 12, (96, 96, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def jpegs(count: int) -> list[bytes]:
    """JPEGs 0..count-1, made once and kept in one tar (ROOT/jpegs-N.tar)."""
    store = ROOT / f"jpegs-{count}.tar"
    if not store.is_file():
        ROOT.mkdir(parents=True, exist_ok=True)
        write_tar(store, [(f"{i:06d}", make_jpeg(i), None) for i in range(count)])
    with tarfile.open(store) as tar:
        return [tar.extractfile(member).read() for member in tar.getmembers()]


def write_tar(path: Path, samples: list[tuple[str, bytes, str | None]]) -> None:
    """A WebDataset tar: KEY.jpg and, with a label, KEY.cls."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            members = [(f"{key}.jpg", data)] + ([(f"{key}.cls", label.encode())] if label is not None else [])
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def write_parquet(path: Path, rows: list[tuple[str, bytes, int]]) -> None:
    """A Parquet file as Hugging Face's `datasets` writes one: image as struct{bytes, path},
    label as integers with the ClassLabel names in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": data, "path": f"{key}.jpg"} for key, data, _ in rows],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array([label for _, _, label in rows], pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_forms(count: int, copies: int = 1) -> dict[str, Path]:
    """ROOT/data-N/{folder,tars,parquet}: the N JPEGs in each form (once). With `copies` > 1,
    only tars, of the N JPEGs repeated `copies` times under other keys (ROOT/data-N-xK/tars)."""
    base = ROOT / (f"data-{count}" if copies == 1 else f"data-{count}-x{copies}")
    forms = {"folder": base / "folder", "tars": base / "tars", "parquet": base / "parquet"}
    if copies > 1:
        forms = {"tars": forms["tars"]}
    if (base / "done").is_file():
        return forms
    shutil.rmtree(base, ignore_errors=True)
    images = jpegs(count)
    numbered = [(i, images[i % count], i % len(CLASSES)) for i in range(count * copies)]
    for start in range(0, len(numbered), PER_SHARD):
        chunk = numbered[start:start + PER_SHARD]
        name = f"{start // PER_SHARD:06d}"
        write_tar(forms["tars"] / f"{name}.tar", [(f"{i:07d}", data, CLASSES[c]) for i, data, c in chunk])
        if copies == 1:
            write_parquet(forms["parquet"] / f"{name}.parquet", [(f"{i:07d}", data, c) for i, data, c in chunk])
    if copies == 1:
        for i, data, c in numbered:
            path = forms["folder"] / CLASSES[c] / f"{i:07d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    (base / "done").touch()
    return forms


class S3:
    """moto's S3 server in a process of its own on 127.0.0.1 (so its work does not hold this
    process's GIL), with the test credentials in this process's environment."""

    def __enter__(self) -> "S3":
        for name in S3_UNSET:
            os.environ.pop(name, None)
        os.environ.update(S3_ENV)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                         "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)  # the server's start has no event to wait on from another process
        self.process.kill()
        raise SystemExit("moto_server did not start within 30 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far, user and system (Linux's /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def put(self, folder: Path, prefix: str) -> str:
        """Upload every file below `folder` under `prefix`; the s3:// URL of the prefix."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        if BUCKET not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=BUCKET)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())
        return f"s3://{BUCKET}/{prefix}"


def read_all(data, storage_options=None, workers: int = 2) -> int:
    """scan_folder + load_all over every image of `data` at 64 px; the images decoded."""
    scan = scan_folder(data, storage_options=storage_options)
    items = [*scan.images, *scan.shards]
    decoded = sum(loaded.pixels is not None for loaded in load_all(scan.location, items, 64, "bilinear", workers=workers))
    return decoded


def timed(function, repeat: int) -> tuple[list[float], object]:
    """The seconds of each of `repeat` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def best_median(values: list[float], digits: int = 1) -> str:
    return f"{round(max(values), digits)} / {round(statistics.median(values), digits)}"


def least_median(values: list[float], digits: int = 2) -> str:
    return f"{round(min(values), digits)} / {round(statistics.median(values), digits)}"


def measure_reading(sources: dict[str, tuple], repeat: int, server=None) -> dict[str, dict]:
    """Per source, each run of `read_all`: images/s, and the CPU milliseconds per image of
    this process and of the S3 server (`server`, for s3 sources). The sources take turns
    within each round, so a change in what else the machine runs weighs on all of them; and
    CPU time per image compares them where wall time depends on that load."""
    results = {name: {"rates": [], "cpu": [], "server": []} for name in sources}
    for _ in range(repeat):
        for name, (data, options) in sources.items():
            served = server.cpu_seconds if options else lambda: 0.0
            started, used, serving = time.perf_counter(), _cpu_seconds(), served()
            decoded = read_all(data, options)
            run = results[name]
            run["rates"].append(decoded / (time.perf_counter() - started))
            run["server"].append(1000 * (served() - serving) / decoded)
            run["cpu"].append(1000 * (_cpu_seconds() - used) / decoded + run["server"][-1])
            print(f"  read {name}: {decoded} images, {run['rates'][-1]:.0f} images/s, {run['cpu'][-1]:.3f} CPU ms "
                  f"per image ({run['server'][-1]:.3f} of them the server's)", file=sys.stderr)
    return results


def _cpu_seconds() -> float:
    """This process's CPU time, every thread's, user and system."""
    times = os.times()
    return times.user + times.system


def measure_extraction(sources: dict[str, tuple], repeat: int) -> dict[str, dict]:
    """Per source and run (the sources taking turns in each round): a cold extraction into a
    fresh cache (seconds), then a re-run over the same data and cache (seconds)."""
    from extract import extract_features

    import keras  # noqa: F401 (TensorFlow's import, once, outside every timing)

    results = {name: {"rows": 0, "cold": [], "rerun": []} for name in sources}
    arguments = dict(input_size=64, pooling="avg", weights="random", progress=False)
    for _ in range(repeat):
        for name, (data, options) in sources.items():
            work, run = Path(tempfile.mkdtemp(dir=ROOT)), results[name]
            started = time.perf_counter()
            run["rows"] = extract_features(data, work / "cache.h5", storage_options=options, **arguments).rows
            run["cold"].append(time.perf_counter() - started)
            started = time.perf_counter()
            again = extract_features(data, work / "cache.h5", storage_options=options, **arguments)
            run["rerun"].append(time.perf_counter() - started)
            shutil.rmtree(work)
            if again.computed:
                raise SystemExit(f"the re-run over {name} computed {again.computed} images; expected none")
            print(f"  extract {name}: {run['rows']} rows, cold {run['cold'][-1]:.1f} s, re-run {run['rerun'][-1]:.2f} s",
                  file=sys.stderr)
    return results


def read_peak(data: Path) -> tuple[int, float]:
    """In a process of its own: the images `read_all` decodes over `data`, and its peak RSS (MB)."""
    output = subprocess.run([sys.executable, __file__, "--read-only", str(data)], check=True,
                            capture_output=True, text=True).stdout
    decoded, peak = output.split()
    return int(decoded), float(peak)


def plan_cost(tars: Path, repeat: int) -> tuple[int, list[float]]:
    """Seconds of scan_folder + plan.shards_to_read over `tars` against catalog rows holding
    every sample of every tar as a complete read stores them (the shard's size and stamp)."""
    shards = scan_folder(tars).shards
    paths, sizes, stamps = [], [], []
    for shard in shards:
        with tarfile.open(tars / shard.path) as tar:
            keys = sorted({member.name.rsplit(".", 1)[0] for member in tar.getmembers()})
        paths += [member_path(shard.path, key) for key in keys]
        sizes += [shard.size] * len(keys)
        stamps += [shard.stamp] * len(keys)
    count = len(paths)
    cached = CatalogRows(paths, [f"{i:064x}" for i in range(count)], [CLASSES[i % 4] for i in range(count)],
                         ["train"] * count, sizes, stamps)

    def plan() -> None:
        kept, reading = shards_to_read(scan_folder(tars).shards, cached)
        if reading or len(kept) != count:
            raise SystemExit(f"the plan reads {len(reading)} shards and keeps {len(kept)} of {count} samples")

    seconds, _ = timed(plan, repeat)
    return count, seconds


def print_tables(args, reading, extraction, memory, plans) -> None:
    local = {"tars": "folder", "parquet": "folder", "s3 tars": "tars", "s3 parquet": "parquet"}
    print(f"\n{args.images} JPEGs (96x96), 64 px; best / median of {args.repeat}\n")
    print("| source | read images/s | x reference | read CPU ms/image (least / median) | x reference |"
          " of which the S3 server's (median) |" + (" extract images/s | extract s | re-run s |" if extraction else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if extraction else ""))
    for name, read in reading.items():
        reference = reading.get(local.get(name))
        rate = statistics.median(read["rates"]) / statistics.median(reference["rates"]) if reference else None
        cpu = statistics.median(reference["cpu"]) / statistics.median(read["cpu"]) if reference else None
        row = (f"| {name} | {best_median(read['rates'], 0)} | {f'{rate:.2f} of {local[name]}' if reference else ''} |"
               f" {least_median(read['cpu'], 3)} | {f'{cpu:.2f} of {local[name]}' if reference else ''} |"
               f" {round(statistics.median(read['server']), 3) if name.startswith('s3') else ''} |")
        if extraction:
            run = extraction[name]
            row += (f" {best_median([run['rows'] / s for s in run['cold']])} | {least_median(run['cold'], 1)} |"
                    f" {least_median(run['rerun'])} |")
        print(row)
    if memory:
        print("\n| tars of | samples read | peak RSS MB (least / median) |\n| --- | --- | --- |")
        for count, (decoded, peaks) in memory.items():
            print(f"| {count} | {decoded} | {least_median(peaks, 0)} |")
    if plans:
        print("\n| samples cached | scan + shards_to_read s (least / median) |\n| --- | --- |")
        for count, seconds in plans.items():
            print(f"| {count} | {least_median(seconds, 3)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--read-only", metavar="DATA", help="(for the memory measurement) read DATA, print the "
                        "images decoded and this process's peak RSS in MB")
    args = parser.parse_args()
    if args.read_only:
        decoded = read_all(args.read_only)
        print(decoded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # kilobytes on Linux
        return
    forms = make_forms(args.images)
    sources = {name: (str(path), None) for name, path in forms.items()}
    with contextlib.nullcontext() if args.skip_s3 else S3() as s3:
        if s3 is not None:
            options = {"endpoint_url": s3.endpoint}
            for name in ("tars", "parquet"):
                sources[f"s3 {name}"] = (s3.put(forms[name], f"{args.images}/{name}"), options)
        reading = measure_reading(sources, args.repeat, s3)
        extraction = None if args.skip_extract else measure_extraction(sources, args.repeat)
    memory, plans = {}, {}
    if not args.skip_memory:
        for copies in (1, 10):
            tars = make_forms(args.images, copies)["tars"]
            runs = [read_peak(tars) for _ in range(args.repeat)]
            memory[args.images * copies] = (runs[0][0], [peak for _, peak in runs])
            count, seconds = plan_cost(tars, args.repeat)
            plans[count] = seconds
    print_tables(args, reading, extraction, memory, plans)


if __name__ == "__main__":
    main()
