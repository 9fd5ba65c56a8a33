"""Stage 1: run every image once through the frozen VGG16 base and cache the features.

    from extract import extract_features, FeatureCache
    summary = extract_features("data/", weights="imagenet", pooling="avg")
    with FeatureCache("cache/features.h5") as cache:
        X, y = cache.features("train"), cache.label_indices("train")

The pipeline, in order (docs/architecture.md draws it): `options` (every option's bounds),
`config` (what a feature is, its fingerprint), `layout` and `labels` (a folder, or a labels
CSV -> images with labels and splits), `recovery` (the cache as found, a killed run's shards
taken up), `plan` (folder x catalog -> what to read, which views are missing), an engine
(`engine` on this machine, `ray_engine` on a Ray `cluster`) running `reader` (file -> hash
and pixels, `augment`ed views) and `featurize` (pixels -> VGG16 features through
`backbone`), reporting through `progress`, then `writer` (shards and the catalog's commits),
`compaction`, `summary`; `runner` joins them, `cli` is the command. The cache's format:
`schema`, `shards`, `chunks`, `state` (a configuration as plain values), `catalog` (reading,
`FeatureCache`), `commit`. `images` is
the featurize path for files outside a cache (score-images). Underneath: `files` (a user's
file read bounded, or written aside), `console` (what the three commands share), `_version`.

`__all__` is what `classify` may import: the pipeline's API, and the pieces stage 2 shares
with it: `console`, `read_regular`, `sha256_regular`, `write_aside`, `streamed`, `overwrites`,
`owned_prefix`, `partial_prefix` and `stale_partials` (`files`), `shards_folder` (what belongs to a cache, `schema`), `decode_image` and `stored_images` (the reader's
decoding, and images read again from where a cache says they came from, for report thumbnails), `package_versions` (recorded with a head), `Backbone` and
`import_keras` (export's one model), `vgg16_top` (the finetune head's block 5), `image_features`, `ImageFeatures`, `expand_inputs` and
`check_engine` (score-images reads and computes as extraction does), `shard_kind` (which inputs are shards), `parse_storage_options` (--storage-options), and the option checks.
"""

from extract._version import __version__, version
from extract import console
from extract.augment import Augmentation
from extract.config import FeatureConfig, describe, fingerprint, option_differences
from extract.errors import CacheBusyError, CacheError, CatalogDamagedError, ExtractError, UsageError, WeightsUnavailableError
from extract.options import SEED, TOP_LAYER, Interval, StrOptions, check_options
from extract.backbone import Backbone, import_keras, vgg16_top
from extract.cluster import ENGINES, check_engine
from extract.images import ImageFeatures, expand_inputs, image_features
from extract.runner import DEFAULT_CACHE, extract_features
from extract.summary import ExtractSummary
from extract.catalog import FeatureCache, list_configs
from extract.files import (
    overwrites, owned_prefix, partial_prefix, read_regular, sha256_regular, stale_partials, streamed, write_aside,
)
from extract.reader import decode as decode_image, stored_images
from extract.schema import package_versions, shards_folder
from extract.sources import shard_kind
from extract.sources.remote import parse_storage_options

__all__ = [
    "Augmentation",
    "Backbone",
    "DEFAULT_CACHE",
    "ENGINES",
    "CacheBusyError",
    "CacheError",
    "CatalogDamagedError",
    "ExtractError",
    "ExtractSummary",
    "FeatureCache",
    "FeatureConfig",
    "ImageFeatures",
    "Interval",
    "SEED",
    "StrOptions",
    "TOP_LAYER",
    "UsageError",
    "WeightsUnavailableError",
    "check_engine",
    "check_options",
    "console",
    "decode_image",
    "describe",
    "expand_inputs",
    "extract_features",
    "fingerprint",
    "image_features",
    "import_keras",
    "list_configs",
    "option_differences",
    "overwrites",
    "owned_prefix",
    "package_versions",
    "parse_storage_options",
    "partial_prefix",
    "read_regular",
    "sha256_regular",
    "shard_kind",
    "shards_folder",
    "stale_partials",
    "stored_images",
    "streamed",
    "version",
    "vgg16_top",
    "write_aside",
]
