"""Stage 1: run every image once through the frozen VGG16 base and cache the features.

    from extract import extract_features, FeatureCache
    summary = extract_features("data/", weights="imagenet", pooling="avg")
    with FeatureCache("cache/features.h5") as cache:
        X, y = cache.features("train"), cache.label_indices("train")

The pipeline, one module each: `config` (what a feature is, its fingerprint, in words),
`layout` (folder -> images with labels and splits), `labels` (a labels CSV: path, label,
split), `reader` (file -> hash and pixels), `augment` (pixels -> deterministic augmented
views), `backbone` (pixels -> features), `plan` (folder x catalog -> what to read and
keep), `engine` (reader threads -> backbone -> pending batches; `ray_engine`: the same
as a Ray Data job, each task writing a shard, on the Ray `cluster`),
then the cache: `schema` (its format), `shards` (one immutable shard), `catalog` (reading,
`FeatureCache`), `commit` (the atomic commit), `writer` (a run's writes, compaction);
`runner` joins them, `cli` is the command. Underneath: `files` (reading a user's file
bounded, writing one aside), `console` (what the three commands share: the parser, the
failure line, the exit statuses, the entry point), `_version`.

`__all__` is what `classify` may import: the pipeline's API, and the few pieces stage 2
shares with it: `console`, `read_regular` and `write_aside` (`files`), `decode_image` (the
reader's decoding, for report thumbnails) and `package_versions` (recorded with a head).
"""

from extract._version import __version__, version
from extract import console
from extract.augment import Augmentation
from extract.config import FeatureConfig, describe, fingerprint, option_differences
from extract.errors import CacheBusyError, CacheError, ExtractError, UsageError, WeightsUnavailableError
from extract.options import SEED, Interval, StrOptions, check_options
from extract.cluster import ENGINES
from extract.runner import DEFAULT_CACHE, ExtractSummary, extract_features
from extract.catalog import FeatureCache, list_configs
from extract.files import read_regular, write_aside
from extract.reader import decode as decode_image
from extract.schema import package_versions

__all__ = [
    "Augmentation",
    "DEFAULT_CACHE",
    "ENGINES",
    "CacheBusyError",
    "CacheError",
    "ExtractError",
    "ExtractSummary",
    "FeatureCache",
    "FeatureConfig",
    "Interval",
    "SEED",
    "StrOptions",
    "UsageError",
    "WeightsUnavailableError",
    "check_options",
    "console",
    "decode_image",
    "describe",
    "extract_features",
    "fingerprint",
    "list_configs",
    "option_differences",
    "package_versions",
    "read_regular",
    "version",
    "write_aside",
]
