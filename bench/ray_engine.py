"""`--engine ray` against `local` on this machine, and what a cluster of GPUs needs.

    python bench/ray_engine.py --images 300 --input-size 224 --gpu-rate 2000

On the same JPEGs (bench/extract_speed.py's photos, 500x375), each a new process, fresh caches:
  ray start   starting a local Ray and stopping it, alone (python -c "ray.init(); ray.shutdown()",
              less the import)
  local       extract-features, cold
  ray         extract-features --engine ray, cold (a Ray started for the run, one backbone actor)
  rerun       extract-features --engine ray again on the unchanged folder (Ray is not started)
Then the cost per image of each stage, on one thread: read + SHA-256 + decode + resize
(`reader.load`, what a read task does) and the forward pass (model only, batch 32, on this
CPU), and from them, on paper, how many CPU cores keep one GPU busy at --gpu-rate images/s.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract_speed import photo_folder  # noqa: E402
from extract.config import FeatureConfig  # noqa: E402
from extract.layout import scan_folder  # noqa: E402
from extract.reader import load  # noqa: E402
from extract.sources.folder import Folder  # noqa: E402


def timed(arguments: list[str], env=None) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(arguments, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(arguments)}\n{done.stderr[-2000:]}")
    return seconds, (json.loads(done.stdout) if done.stdout.strip().startswith("{") else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--gpu-rate", type=float, default=2000.0,
                        help="images/s one GPU's forward pass is assumed to reach (default 2000: issue 16's H100 target)")
    args = parser.parse_args()
    data = photo_folder(args.images)
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    python = sys.executable
    scratch = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        imported, _ = timed([python, "-c", "import ray"], env)
        started, _ = timed([python, "-c", "import ray; ray.init(include_dashboard=False); ray.shutdown()"], env)
        command = [python, "-m", "extract.cli", str(data), "--weights", "random", "--input-size", str(args.input_size),
                   "--quiet", "--json"]
        local, local_summary = timed([*command, "--cache", str(scratch / "local.h5")], env)
        ray, ray_summary = timed([*command, "--cache", str(scratch / "ray.h5"), "--engine", "ray"], env)
        rerun, _ = timed([*command, "--cache", str(scratch / "ray.h5"), "--engine", "ray"], env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"images: {args.images} JPEGs 500x375 at {args.input_size} px, pooling none, float32, {os.cpu_count()} cores")
    print(f"ray start + stop alone: {started - imported:.2f} s (import ray: {imported:.2f} s)")
    print(f"cold, local: {local:.1f} s ({args.images / local:.2f} images/s over the whole command; "
          f"{local_summary['images_per_second']} images/s computing)")
    print(f"cold, ray:   {ray:.1f} s ({args.images / ray:.2f} images/s; {ray_summary['images_per_second']} computing); "
          f"ray / local = {ray / local:.2f}")
    print(f"re-run, ray, unchanged folder: {rerun:.2f} s")

    config = FeatureConfig(input_size=args.input_size, weights="random")
    images = scan_folder(data).images[:min(args.images, 200)]
    started = time.perf_counter()
    loaded = [load(Folder(data), image, args.input_size, config.interpolation) for image in images]
    read_ms = (time.perf_counter() - started) / len(images) * 1000
    from extract.backbone import Backbone

    backbone = Backbone(config)
    batch = np.stack([item.pixels for item in loaded[:32]])
    backbone(batch)  # traced once
    started = time.perf_counter()
    for _ in range(3):
        backbone(batch)
    forward_ms = (time.perf_counter() - started) / (3 * len(batch)) * 1000
    cores = args.gpu_rate * read_ms / 1000
    shard_mb = args.gpu_rate * int(np.prod(config.feature_shape)) * 4 / 2**20 * 0.66  # gzip: 0.66 of raw (performance.md)
    print(f"per image, one thread: read + SHA-256 + decode + resize {read_ms:.2f} ms; "
          f"forward pass on this CPU {forward_ms:.1f} ms ({1000 / forward_ms:.1f} images/s)")
    print(f"on paper: one GPU at {args.gpu_rate:.0f} images/s needs {cores:.1f} cores reading "
          f"({args.gpu_rate:.0f} x {read_ms:.2f} ms), plus Ray's own share; N GPUs ~ N x {args.gpu_rate:.0f} "
          f"images/s with N x {cores:.1f} cores reading and the shards' folder taking N x {shard_mb:.0f} MB/s "
          f"({'x'.join(map(str, config.feature_shape))} float32 maps, ~0.66 of raw compressed)")


if __name__ == "__main__":
    main()
