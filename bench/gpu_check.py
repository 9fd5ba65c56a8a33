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
  agree    how far its features of the first 32 photos are from JAX's in float32 on the CPU
           (or, without JAX, from the first float32 run's)
for each backend and precision (float32, mixed_bfloat16, mixed_float16), each in its own
process; then which stage limits extraction where it falls below the model. Every run
reads one weights file of seeded random weights (speed does not depend on them; Keras's
own random weights differ by backend). Where nvidia-smi finds no GPU it says so and runs
a CPU smoke test of the same steps (few images, batch 16). Stops starting new runs once
--budget seconds have passed.
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
COMPARED = 32  # photos whose features are compared across runs
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
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)  # features on the CPU, here
    parser.add_argument("--write-weights", action="store_true", help=argparse.SUPPRESS)  # the file every run reads
    args = parser.parse_args()
    if args.write_weights:
        from backends import write_weights

        write_weights(Path(args.weights), 32)
        print(json.dumps({}))
        return
    if args.run and args.reference:
        reference(args)
        return
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
    from extract.sources.folder import Folder

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
    asked = [name.strip() for name in args.backends.split(",") if name.strip()]
    backends = [name for name in asked if name in BACKENDS and find_spec(name)]
    missing = [name for name in asked if name not in backends]
    if missing:
        print(f"not installed here (or not a Keras backend), so not run: {', '.join(missing)}")
    if not backends:
        sys.exit(f"None of --backends is installed here; expected some of {', '.join(BACKENDS)}.")
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
    count = sum(1 for loaded in load_all(Folder(data), images, args.input_size, "bilinear", (), args.workers,
                                          prefetch=2 * args.batch_size) if loaded.error is None)
    read_rate = count / (time.perf_counter() - reading)
    print(f"read   {read_rate:8.0f} images/s  (reading, SHA-256, decode, resize on {args.workers} threads; no network)")

    args.weights = str(data.parent / "weights.h5")
    written = worker(args, backends[0], "weights", data, ["--write-weights"], timeout=300)
    if written is None:
        return
    results = []
    for precision in precisions:
        for backend in backends:
            if time.perf_counter() - started > args.budget:
                print(f"skipped {backend} {precision}: past the --budget of {args.budget:.0f} s")
                continue
            left = args.budget - (time.perf_counter() - started)
            result = worker(args, backend, precision, data, timeout=left + 60)
            if result is None:
                continue
            result["read_images_per_s"] = round(read_rate, 1)
            results.append(result)
            report(result, read_rate)
    compare(args, results, data, gpu and "jax" in backends)
    shutil.rmtree(data.parent, ignore_errors=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "cores": os.cpu_count(), "results": results}, indent=2))


def worker(args, backend: str, precision: str, data: Path, extra=(), timeout: float = 600, env=None) -> dict | None:
    """One backend and precision in a process of its own (Keras picks its backend once),
    stopped `timeout` seconds on."""
    command = [sys.executable, __file__, "--run", backend, precision, "--data", str(data), "--weights", args.weights,
               "--images", str(args.images), "--batch-size", str(args.batch_size),
               "--input-size", str(args.input_size), "--workers", str(args.workers), *extra]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
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

    from extract import FeatureCache, extract_features
    from extract.backbone import Backbone
    from extract.config import FeatureConfig

    size, batch = args.input_size, args.batch_size
    config = FeatureConfig(input_size=size, weights=args.weights, precision=precision)
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
    options = dict(input_size=size, weights=args.weights, precision=precision, batch_size=batch,
                   workers=args.workers, progress=False)
    timing = time.perf_counter()
    cold = extract_features(args.data, cache, **options)
    result.update(cold_s=round(time.perf_counter() - timing, 2), cold_images_per_s=cold.images_per_second,
                  cold_start_s=cold.start_seconds, cold_save_s=round(cold.save_seconds, 2), computed=cold.computed)
    timing = time.perf_counter()
    rerun = extract_features(args.data, cache, **options)
    result.update(rerun_s=round(time.perf_counter() - timing, 3), rerun_computed=rerun.computed)
    result["peak_memory_bytes"], result["memory_of"] = peak_memory(backend, result["device"])
    with FeatureCache(cache) as features:
        order = np.argsort(features.paths())[:COMPARED]
        np.save(Path(args.data).parent / f"features-{backend}-{precision}.npy", features.features_at(order))
    shutil.rmtree(cache.parent, ignore_errors=True)
    return result


def reference(args) -> None:
    """Float32 features of the first photos on this process's backend (JAX on the CPU, for `compare`)."""
    import numpy as np

    from extract.backbone import Backbone
    from extract.config import FeatureConfig
    from extract.layout import scan_folder
    from extract.reader import load_all

    images = sorted(scan_folder(Path(args.data)).images, key=lambda image: image.path)[:COMPARED]
    pixels = np.stack([item.pixels for item in load_all(Folder(Path(args.data)), images, args.input_size, "bilinear",
                                                          (), args.workers, prefetch=COMPARED)])
    backbone = Backbone(FeatureConfig(input_size=args.input_size, weights=args.weights))
    np.save(Path(args.data).parent / "features-reference.npy", backbone(pixels))
    print(json.dumps({"device": backbone.device}))


def compare(args, results: list[dict], data: Path, on_cpu: bool) -> None:
    """Each run's features of the first photos against a reference: JAX in float32 on the
    CPU (where there is a GPU and JAX), else the first float32 run."""
    import numpy as np
    from backends import distance

    folder, against = data.parent, None
    if on_cpu and worker(args, "jax", "float32", data, ["--reference"], timeout=300, env={"JAX_PLATFORMS": "cpu"}):
        against, name = np.load(folder / "features-reference.npy"), "JAX float32 on the CPU"
    for result in results:
        features = np.load(folder / f"features-{result['backend']}-{result['precision']}.npy")
        if against is None and result["precision"] == "float32":
            against, name = features, f"{result['backend']} float32 on {result['device']}"
            continue
        if against is None:
            continue
        result["agree"] = {"against": name, **distance(against, features)}
        print(f"agree  {result['agree']['max_over_largest']:8.1e} of the largest feature, 1 - cosine "
              f"{result['agree']['one_minus_cosine']:.1e}: {result['backend']} {result['precision']} on "
              f"{result['device']} against {name} ({len(features)} photos)")


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
    """Which stage holds extraction below the model: the readers, or the engine's writing
    (pending batches and shards), which runs beside the model."""
    model, cold = result["model_images_per_s"], result["cold_images_per_s"]
    computing = result["computed"] / model
    writing = result["cold_save_s"]
    if read_rate < 1.1 * cold:
        return f"reading ({read_rate:.0f} images/s alone, on {os.cpu_count()} cores)"
    if writing > 0.1 * computing:
        return (f"writing the cache ({writing} s of the run's {result['cold_s']} s, beside the model, which "
                f"alone needs {computing:.1f} s)")
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
