"""The GPU check: stage 1's speed on the Keras backends a GPU machine has (JAX, PyTorch; and
TensorFlow where installed), in one command. Run it through bench/gpu_check.sh, which first
installs the wheels Keras needs there (make gpu-wheels).

    bench/gpu_check.sh                        # on a GPU: 4,000 photos, 224 px, batch 256
    bench/gpu_check.sh --images 512 --budget 120

It makes N JPEGs of 500x375 (bench/extract_speed.make_photo, on every core), then prints
one line each for
  read     reading + SHA-256 + decode + resize alone, on every core (no network)
  model    VGG16 alone on pixels in memory (`Backbone`: uint8 in, features out), after warm-up
  cold     `extract_features` into a new cache: wall time, and its rate once the network is
           up (its start: building, compiling, the first batch, shown apart)
  rerun    `extract_features` again on the unchanged folder
  memory   the peak GPU memory of the process (of the host where there is no GPU)
for each backend and precision (float32, mixed_bfloat16, mixed_float16), each in its own
process; then which stage limits extraction where it falls below the model. Weights are
seeded random ones: speed does not depend on them. Where nvidia-smi finds no GPU it says
so and runs a CPU smoke test of the same steps (few images, batch 16). Stops starting
new runs once --budget seconds have passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

BACKENDS = ("jax", "torch", "tensorflow")
GPU_PRECISIONS = ("mixed_bfloat16", "mixed_float16", "float32")
CPU_PRECISIONS = ("float32", "mixed_bfloat16")  # bfloat16 only on a CPU that computes it natively


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive, help="photos to make and extract (default: 4000 on a GPU, 48 without)")
    parser.add_argument("--batch-size", type=positive, help="default: 256 on a GPU, 16 without")
    parser.add_argument("--input-size", type=positive, default=224)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="those installed of these are run")
    parser.add_argument("--precisions", help=f"default: {','.join(GPU_PRECISIONS)} on a GPU, {','.join(CPU_PRECISIONS)} without")
    parser.add_argument("--workers", type=positive, default=os.cpu_count(), help="reader threads (default: every core)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which no new run starts")
    parser.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    parser.add_argument("--run", nargs=2, metavar=("BACKEND", "PRECISION"), help=argparse.SUPPRESS)  # one run, here
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(one_run(args, *args.run)))
        return
    check(args)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1; received {text!r}")
    return int(text)


def check(args) -> None:
    from extract_speed import make_photos

    from extract.backbone import cpu_has_bfloat16
    from extract.layout import scan_folder
    from extract.reader import load_all

    started = time.perf_counter()
    gpu = gpu_name()
    if gpu:
        print(f"GPU: {gpu}; {os.cpu_count()} cores")
    else:
        print("NO GPU: nvidia-smi finds none, so these are CPU figures from a smoke run of the check, not GPU figures.")
    args.images = args.images or (4000 if gpu else 48)
    args.batch_size = args.batch_size or (256 if gpu else 16)
    precisions = (args.precisions or ",".join(GPU_PRECISIONS if gpu else CPU_PRECISIONS)).split(",")
    if not (gpu or args.precisions or cpu_has_bfloat16()):
        precisions = ["float32"]
        print("this CPU has no native bfloat16, so only float32 runs (--precisions to ask for more)")
    backends = [name for name in args.backends.split(",") if find_spec(name)]
    missing = [name for name in args.backends.split(",") if name not in backends]
    if missing:
        print(f"not installed here, so not run: {', '.join(missing)}")
    if not find_spec("keras"):
        sys.exit("Keras is not installed: run `make gpu-wheels` where pip works, and carry .whl/ here (bench/gpu_check.sh installs it).")

    data = Path(tempfile.mkdtemp(prefix="gpu-check-")) / f"photos-{args.images}"
    made = time.perf_counter()
    make_photos(data, args.images, workers=os.cpu_count() or 1)
    images = scan_folder(data).images
    print(f"photos: {len(images)} JPEGs of 500x375 made in {time.perf_counter() - made:.1f} s "
          f"({sum(image.size for image in images) / len(images) / 1024:.0f} KB each); "
          f"{args.input_size} px, batch {args.batch_size}, {args.workers} reader threads")
    reading = time.perf_counter()
    count = sum(1 for loaded in load_all(data, images, args.input_size, "bilinear", (), args.workers,
                                          prefetch=2 * args.batch_size) if loaded.error is None)
    read_rate = count / (time.perf_counter() - reading)
    print(f"read   {read_rate:8.0f} images/s  (reading, SHA-256, decode, resize on {args.workers} threads; no network)")

    results = []
    for precision in precisions:
        for backend in backends:
            if time.perf_counter() - started > args.budget:
                print(f"skipped {backend} {precision}: past the --budget of {args.budget:.0f} s")
                continue
            left = args.budget - (time.perf_counter() - started)
            result = run_in_process(args, backend, precision, data, timeout=left + 60)
            if result is None:
                continue
            result["read_images_per_s"] = round(read_rate, 1)
            results.append(result)
            report(result, read_rate)
    shutil.rmtree(data.parent, ignore_errors=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "cores": os.cpu_count(), "results": results}, indent=2))


def run_in_process(args, backend: str, precision: str, data: Path, timeout: float) -> dict | None:
    """One backend and precision in a process of its own (Keras picks its backend once),
    stopped `timeout` seconds on."""
    command = [sys.executable, __file__, "--run", backend, precision, "--data", str(data),
               "--images", str(args.images), "--batch-size", str(args.batch_size),
               "--input-size", str(args.input_size), "--workers", str(args.workers)]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{backend} {precision}: STOPPED after {timeout:.0f} s, past the --budget")
        return None
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        print(f"{backend} {precision}: FAILED ({lines[-1] if lines else f'exit status {done.returncode}'})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_run(args, backend: str, precision: str) -> dict:
    import numpy as np

    from extract import extract_features
    from extract.backbone import Backbone
    from extract.config import FeatureConfig

    size, batch = args.input_size, args.batch_size
    config = FeatureConfig(input_size=size, weights="random", precision=precision)
    built = time.perf_counter()
    backbone = Backbone(config)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    backbone(pixels)  # compiling
    start = time.perf_counter() - built
    backbone(pixels)
    batches = max(2, -(-args.images // batch))
    timing = time.perf_counter()
    for _ in range(batches):
        backbone(pixels)
    model_rate = batches * batch / (time.perf_counter() - timing)
    result = {"backend": backend, "precision": precision, "device": backbone.device, "images": args.images,
              "input_size": size, "batch_size": batch, "model_images_per_s": round(model_rate, 1),
              "model_start_s": round(start, 2)}
    del backbone

    cache = Path(tempfile.mkdtemp(prefix="gpu-check-cache-")) / "features.h5"
    options = dict(input_size=size, weights="random", precision=precision, batch_size=batch,
                   workers=args.workers, progress=False)
    timing = time.perf_counter()
    cold = extract_features(args.data, cache, **options)
    result.update(cold_s=round(time.perf_counter() - timing, 2), cold_images_per_s=cold.images_per_second,
                  cold_start_s=cold.start_seconds, cold_save_s=round(cold.save_seconds, 2), computed=cold.computed)
    timing = time.perf_counter()
    rerun = extract_features(args.data, cache, **options)
    result.update(rerun_s=round(time.perf_counter() - timing, 3), rerun_computed=rerun.computed)
    result["peak_memory_bytes"], result["memory_of"] = peak_memory(backend, result["device"])
    shutil.rmtree(cache.parent, ignore_errors=True)
    return result


def report(result: dict, read_rate: float) -> None:
    name = f"{result['backend']} {result['precision']} on {result['device']}"
    model, cold = result["model_images_per_s"], result["cold_images_per_s"]
    print(f"model  {model:8.1f} images/s  {name} (start {result['model_start_s']} s)")
    print(f"cold   {cold:8.1f} images/s  {name}: {cold / model:.2f} x model; {result['cold_s']} s for "
          f"{result['computed']} images (start {result['cold_start_s']} s, writing {result['cold_save_s']} s)")
    print(f"rerun  {result['rerun_s']:8.3f} s         {name}: {result['rerun_computed']} computed")
    print(f"memory {result['peak_memory_bytes'] / 2**30:8.2f} GiB       {name}: peak {result['memory_of']}")
    if cold < 0.9 * model:
        print(f"limit  {name}: {limiter(result, read_rate)}")


def limiter(result: dict, read_rate: float) -> str:
    """Which stage holds extraction below the model: the readers, or the main thread's
    writing (pending batches and shards) beside the model."""
    model, cold = result["model_images_per_s"], result["cold_images_per_s"]
    computing = result["computed"] / model
    writing = result["cold_save_s"]
    if read_rate < 1.1 * cold:
        return f"reading ({read_rate:.0f} images/s alone, on {os.cpu_count()} cores)"
    if writing > 0.1 * computing:
        return (f"writing the cache ({writing} s of the run's {result['cold_s']} s, in the thread that "
                f"runs the model; the model alone needs {computing:.1f} s)")
    return "neither reading nor writing alone: the reader and the model contend (the main thread, the GIL)"


def gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return "; ".join(names) if done.returncode == 0 and names else None


def peak_memory(backend: str, device: str) -> tuple[int, str]:
    """The process's peak device memory, or its peak resident set where it ran on the CPU."""
    if device == "GPU":
        if backend == "jax":
            import jax

            return jax.local_devices()[0].memory_stats()["peak_bytes_in_use"], "GPU memory in use (JAX)"
        if backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated(), "GPU memory allocated (PyTorch)"
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"], "GPU memory (TensorFlow)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident set on the host (no GPU)"


if __name__ == "__main__":
    main()
