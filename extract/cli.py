"""The `extract-features` command: parse, call `extract.extract_features`, print. Its exit
statuses are every command's (`console`, docs/exit-status.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from extract._version import version
from extract.augment import Augmentation
from extract.backbone import cpu_has_bfloat16
from extract import console
from extract.console import DONE, FAILED, OneLineParser, fail, interrupted, printable
from extract.errors import ExtractError
from extract.layout import LAYOUTS
from extract.cluster import ENGINES
from extract.options import INTERPOLATIONS
from extract.options import COMPACTIONS, DECODES, DTYPES, POOLINGS, PRECISIONS, TOP_LAYER
from extract.plan import label_source
from extract.runner import DEFAULT_CACHE, extract_features
from extract.sources.remote import parse_storage_options
from extract.summary import ExtractSummary

PROG = "extract-features"
SHOWN_FAILURES = 10
SHOWN_MISSING = 3


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Run every image of DATA_DIR once through the frozen VGG16 convolutional base "
            "and cache the features in HDF5. Re-runs compute only new or changed images."
        ),
        epilog=(
            "example: extract-features data/ --pooling avg    "
            "(data/train/<class>/*.jpg, data/validation/<class>/*.jpg)"
        ),
    )
    add = parser.add_argument
    add("data_dir", metavar="DATA_DIR",
        help="folder of images: train/ + validation/ (+ test/), <class>/ folders, or unlabeled; or shards: "
             "WebDataset .tar or .parquet files, a folder of them, a brace pattern (shards/{000..099}.tar); "
             "local, or at an s3://, gs://, https:// URL (docs/sources.md)")
    add("--storage-options", metavar="JSON",
        help="fsspec options for a URL DATA_DIR, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' "
             "(credentials as s3fs and gcsfs read them: AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)")
    add("--cache", default=DEFAULT_CACHE, metavar="PATH", help=f"HDF5 feature cache (default {DEFAULT_CACHE})")
    add("--layout", choices=LAYOUTS, default="auto",
        help="how DATA_DIR is organised (default: detected; a cache labelled otherwise needs it named to relabel)")
    add("--labels", metavar="CSV",
        help="a CSV with a header row: path,label and optionally split (train, validation or val, test), paths "
             "relative to DATA_DIR; only the images it names are extracted (not with --layout; re-runs give it again)")
    add("--validation-percent", type=float, default=20.0, metavar="P",
        help="with <class>/ folders or --labels without a split: share of images for validation, drawn by path "
             "hash (default 20)")
    add("--input-size", type=int, default=224, metavar="S", help="images are resized to S x S (default 224, at least 32)")
    add("--interpolation", choices=INTERPOLATIONS, default="bilinear",
        help="resize filter (default bilinear; nearest is what the blog recipe's ImageDataGenerator used)")
    add("--decode", choices=DECODES, default="exact",
        help="exact: pixels as keras.utils.load_img gives them (default); draft: JPEGs decoded at 1/2-1/8 size "
             "first, several times faster on large photos, pixels slightly different")
    add("--pooling", choices=POOLINGS, default="none",
        help="none keeps the full map (7x7x512 at 224 px); avg or max give 512 numbers (default none)")
    add("--layer", default=TOP_LAYER, metavar="NAME",
        help=f"the layer of the base whose output is cached (default {TOP_LAYER}, the base's output); "
             f"block4_pool (14x14x512 at 224 px) is what train-head --head finetune tunes block5 from")
    add("--weights", default="imagenet", metavar="imagenet|random|PATH",
        help="ImageNet weights through Keras's cache (default), seeded random ones, or a local weights file")
    add("--seed", type=int, default=0, help="seed for --weights random and for the views of --augment (default 0)")
    views = parser.add_argument_group(
        "augmented views (training images only; defaults are the blog recipe's ImageDataGenerator arguments)")
    views.add_argument("--augment", type=int, metavar="K",
                       help="also cache K augmented views of every training image (0: stop using views; "
                            "default: keep what the cache uses)")
    views.add_argument("--shear", type=float, metavar="DEG", help="shear angle range in degrees, as Keras's shear_range (0.2)")
    views.add_argument("--zoom", type=float, metavar="Z", help="each axis zoomed by a factor in [1-Z, 1+Z] (0.2)")
    views.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (on)")
    views.add_argument("--rotation", type=float, metavar="DEG", help="rotation range in degrees (0)")
    views.add_argument("--shift", type=float, metavar="F", help="shift range, a fraction of the side (0)")
    add("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    add("--workers", type=int, default=None, metavar="N", help="threads reading and decoding images (default: by CPU count)")
    add("--precision", choices=PRECISIONS, default="float32", help="compute precision of the network (default float32)")
    add("--dtype", choices=DTYPES, default="float32", help="storage type of the features (float16 halves the cache)")
    add("--save-every", type=float, default=60.0, metavar="SECONDS",
        help="while running, write the finished batches as a shard every SECONDS (default 60; each batch is on disk at once)")
    add("--rebuild", action="store_true", help="move the existing cache aside (kept as *.replaced-TIME/) and start anew")
    add("--repair", action="store_true",
        help="read every shard whole; forget the rows of damaged ones and compute only those again")
    add("--compact", choices=COMPACTIONS, default="auto",
        help="after the run, rewrite shards holding dead rows and merge small ones: auto (past thresholds, "
             "the default), full (every such shard) or never")
    scale = parser.add_argument_group("scale out (Ray: pip install '.[ray]')")
    scale.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: threads and one model in this process (default); ray: a Ray Data job over a Ray "
                            "cluster (the cache must be on a folder every node shares)")
    scale.add_argument("--ray-address", metavar="ADDRESS",
                       help="the Ray cluster to join (default: RAY_ADDRESS, else Ray is started here for the run)")
    scale.add_argument("--ray-actors", type=int, metavar="N", help="backbone actors (default: one per GPU, or 1)")
    add("--strict", action="store_true", help="exit with status 1 if any image failed")
    add("--quiet", action="store_true", help="no progress bar and no summary")
    add("--json", action="store_true", help="print the summary as JSON on stdout")
    add("--version", action="version", version=f"{PROG} {version()}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.quiet or args.json):
        console.terminal_line(start_line(args))
    try:
        # What libraries print while it runs (Ray: "a worker died") goes to stderr: stdout is for --json.
        with contextlib.redirect_stdout(sys.stderr):
            summary = extract_features(
                args.data_dir,
                args.cache,
                input_size=args.input_size,
                interpolation=args.interpolation,
                pooling=args.pooling,
                weights=args.weights,
                seed=args.seed,
                precision=args.precision,
                dtype=args.dtype,
                decode=args.decode,
                layer=args.layer,
                layout=args.layout,
                validation_percent=args.validation_percent,
                labels=args.labels,
                augment=args.augment,
                augmentation=_augmentation(args),
                batch_size=args.batch_size,
                workers=args.workers,
                save_every=args.save_every,
                rebuild=args.rebuild,
                repair=args.repair,
                compact=args.compact,
                engine=args.engine,
                ray_address=args.ray_address,
                ray_actors=args.ray_actors,
                storage_options=_storage_options(args.storage_options),
                progress=not (args.quiet or args.json),
            )
    except ExtractError as error:
        return fail(PROG, error)
    except KeyboardInterrupt:
        return interrupted(PROG, "every finished batch is saved. Run the same command again to finish.")
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))  # verbatim: JSON escapes control characters itself
    elif not args.quiet:
        print(format_summary(summary))
    if summary.failed and not summary.rows:
        first = summary.failures[0][1]
        return fail(PROG, f"no image could be extracted; {summary.failed} failed (first: {first}).", FAILED)
    if summary.failed and args.strict:
        return fail(PROG, f"{summary.failed} images failed (--strict); their reasons are in the cache's failure table.",
                    FAILED)
    return DONE


def _storage_options(text: str | None) -> dict | None:
    return None if text is None else parse_storage_options(text)


def _augmentation(args) -> Augmentation | None:
    """The transforms given on the command line, over the blog recipe's; None if none was given."""
    given = {name: getattr(args, name) for name in ("shear", "zoom", "flip", "rotation", "shift")}
    given = {name: value for name, value in given.items() if value is not None}
    return Augmentation(seed=args.seed, **given) if given or args.augment else None


def start_line(args) -> str:
    """What the run works on, said before it starts (a forgotten --cache shows at once)."""
    weights = args.weights + (f" (seed {args.seed})" if args.weights == "random" else "")
    layer = "" if args.layer == TOP_LAYER else f", layer {args.layer}"
    return (f"extracting {args.data_dir} into {args.cache}: weights {weights}, input size {args.input_size}, "
            f"pooling {args.pooling}{layer}")


def format_summary(summary: ExtractSummary) -> str:
    shape = "x".join(map(str, summary.feature_shape))
    splits = ", ".join(f"{name} {count}" for name, count in summary.split_sizes.items())
    computed = f"{summary.computed} computed"
    if summary.computed:
        computed += (f" on {summary.device} ({summary.backend}{', Ray' if summary.engine == 'ray' else ''}) "
                     f"at {summary.images_per_second} images/s")
    labels = f", labels from {printable(summary.labels)}" if summary.labels else ""
    skipped = f"{summary.skipped} skipped"
    if summary.not_in_labels:
        skipped += f" ({summary.not_in_labels} images not in {printable(os.path.basename(summary.labels))})"
    lines = [
        f"Data:   {printable(summary.data_dir)} (layout: {summary.layout}{labels})",
        f"Cache:  {printable(summary.cache)} [configuration {summary.fingerprint}, features {shape}]",
        f"Config: {printable(summary.configuration)}",
        f"Images: {summary.rows} cached ({splits or 'none'}); {len(summary.class_names)} classes",
        f"Run:    {summary.new} new, {summary.changed} changed, {summary.unchanged} unchanged, "
        f"{summary.removed} removed, {summary.failed} failed, {skipped}; "
        f"{computed}, {summary.reused} reused; {summary.seconds:.1f} s",
    ]
    if summary.new_configuration and summary.other_configurations:
        differences = ", ".join(f"{option} {mine} (the cache also has {theirs})"
                                for option, (mine, theirs) in summary.differences.items())
        lines.insert(3, f"Note:   New configuration beside {summary.other_configurations} existing: "
                        f"{printable(differences or 'same options, other facts (' + summary.nearest_configuration + ')')}.")
    if summary.relabelled_from:
        now = label_source(summary.layout, summary.labels)
        lines.append(f"Note:   relabelled: the labels came from {printable(summary.relabelled_from)}, now from "
                     f"{printable(now)}.")
    if summary.labels_missing:
        missing = summary.labels_missing
        first = ", ".join(printable(path) for path in missing[:SHOWN_MISSING])
        lines.append(f"Labels: not found in DATA_DIR: {len(missing)} of the paths in {printable(summary.labels)} "
                     f"(first: {first}{', ...' if len(missing) > SHOWN_MISSING else ''}; --json lists all)")
    if summary.compacted or summary.repaired:
        lines.append(f"Shards: {summary.repaired} rows of damaged shards computed again, "
                     f"{summary.compacted} rows compacted into new shards")
    if summary.views_per_image:
        transforms = summary.augmentation
        lines.insert(3, (
            f"Views:  {summary.views} cached, {summary.views_per_image} per training image "
            f"(shear {transforms['shear']}°, zoom {transforms['zoom']}, flip {'on' if transforms['flip'] else 'off'}, "
            f"rotation {transforms['rotation']}°, shift {transforms['shift']}); {summary.views_computed} computed"
        ))
    if summary.computed and summary.device == "CPU" and summary.precision == "float32" and cpu_has_bfloat16():
        lines.append(
            "Tip:    this CPU computes bfloat16 natively: --precision mixed_bfloat16 may run several times faster "
            "here; its features were within cosine 0.9999 of float32 on our measurement (a separate configuration)."
        )
    lines += [f"Note:   {printable(note)}" for note in summary.notes]
    if summary.compaction_error:
        lines.append(f"Note:   the run is saved, but compaction could not run: {summary.compaction_error}")
    for path, reason in summary.failures[:SHOWN_FAILURES]:
        lines.append(f"  failed: {printable(path)}: {printable(reason)}")
    if summary.failed > SHOWN_FAILURES:
        lines.append(f"  ... and {summary.failed - SHOWN_FAILURES} more (--json lists all)")
    return "\n".join(lines)


def run() -> None:
    """Console-script entry point (`console.run`: SIGTERM as Ctrl-C, a closed stdout ...)."""
    sys.exit(console.run(main, PROG))


if __name__ == "__main__":
    run()
