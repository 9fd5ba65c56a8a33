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
`runner` joins them, `cli` is the command.
"""

__version__ = "0.1.0"
DISTRIBUTION = "bottleneck-features"  # the name pyproject.toml installs the package under


def version() -> str:
    """The installed package's version (what `--version` prints), "unknown" if not installed."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


from extract.augment import Augmentation
from extract.config import FeatureConfig, describe, fingerprint, option_differences
from extract.errors import CacheBusyError, CacheError, ExtractError, UsageError, WeightsUnavailableError
from extract.options import SEED, Interval, StrOptions, check_options
from extract.cluster import ENGINES
from extract.runner import DEFAULT_CACHE, ExtractSummary, extract_features
from extract.catalog import FeatureCache, list_configs

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
    "describe",
    "extract_features",
    "fingerprint",
    "list_configs",
    "option_differences",
    "version",
]
