"""What a run did, in numbers and words: `ExtractSummary`, made as the run ends from what it
found, what the engine did (`progress.Tally`) and what the cache holds now."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

from extract.state import CatalogRows, ConfigState
from extract.config import OPTIONS, describe, option_differences, option_value
from extract.plan import row_changes
from extract.progress import Tally


@dataclass
class ExtractSummary:
    """What a run did. Counts are of images; `computed` went through VGG16 in this run."""

    cache: str
    fingerprint: str
    data_dir: str
    layout: str
    feature_shape: list[int]
    precision: str = "float32"
    configuration: str = ""  # the configuration in words (config.describe)
    options: dict[str, str] = field(default_factory=dict)  # its options' values: {"--input-size": "224", ...}
    new_configuration: bool = False  # this run added the configuration to the cache
    other_configurations: int = 0  # configurations in the cache besides this one
    nearest_configuration: str | None = None  # of those, the one closest to a new configuration
    differences: dict[str, list[str]] = field(default_factory=dict)  # option -> [this value, the nearest's]
    labels: str | None = None  # the labels file (layout "csv")
    not_in_labels: int = 0  # images skipped (counted in `skipped`) because the labels file does not name them
    labels_missing: list[str] = field(default_factory=list)  # what the labels file names but is no image in the folder
    relabelled_from: str | None = None  # where the labels came from before this run chose another source
    rows: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0
    computed: int = 0
    reused: int = 0  # features found by content (a moved or copied file, an interrupted run)
    views_per_image: int = 0  # augmented views in use per training image (0: none)
    views: int = 0  # views cached for the training images
    views_computed: int = 0
    augmentation: dict | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0  # images and views computed a second once the network was up (local engine)
    start_seconds: float | None = None  # building the network and its first batch (local engine)
    save_seconds: float = 0.0  # writing shards and committing the catalog, compaction included
    compacted: int = 0  # rows compaction rewrote into new shards
    compaction_error: str | None = None  # why compaction could not run (the run's commit stands)
    repaired: int = 0  # features forgotten by --repair (in damaged shards), computed again
    notes: list[str] = field(default_factory=list)  # what the run found damaged and dealt with, a line each
    device: str | None = None  # None when nothing needed VGG16
    backend: str | None = None  # the Keras backend that computed (None when nothing needed VGG16)
    engine: str = "local"  # "ray": read and computed by a Ray Data job
    class_names: list[str] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def name_configuration(summary: ExtractSummary, facts: dict, stored: bool, others: list[dict]) -> None:
    """Name the configuration (`facts`: its identity and weights path) in the summary, and,
    for one new (not `stored`) beside `others` in the cache (`list_configs`), the options
    in which it differs from the nearest of them."""
    summary.configuration = describe(facts)
    summary.options = {option: value for option in OPTIONS
                       if option.startswith("--") and (value := option_value(option, facts))}
    summary.new_configuration = not stored
    summary.other_configurations = len(others)
    if summary.new_configuration and others:
        nearest = min(others, key=lambda found: (len(option_differences(facts, found)), -found["rows"]))
        summary.nearest_configuration = nearest["fingerprint"]
        summary.differences = {option: list(values) for option, values in option_differences(facts, nearest).items()}


def count(summary: ExtractSummary, before: CatalogRows, state: ConfigState, tally: Tally,
          views: tuple[str, int, dict] | None) -> None:
    """The counts: the rows of the state the cache holds now against those the run found
    (`before`), what the engine did, and the views (fingerprint, per image, augmentation) in use."""
    rows = state.rows
    changes = row_changes(rows, before)
    summary.new, summary.changed, summary.unchanged, summary.removed = (
        changes[name] for name in ("new", "changed", "unchanged", "removed"))
    summary.failures = list(state.failures)
    summary.failed = len(state.failures)
    summary.rows = len(rows)
    summary.class_names = sorted(set(rows.label.tolist()) - {""})
    splits = collections.Counter(rows.split.tolist())
    summary.split_sizes = {split: splits[split] for split in sorted(splits)}
    summary.computed, summary.views_computed, summary.reused = tally.computed, tally.views_computed, tally.reused
    summary.device, summary.backend, summary.images_per_second = tally.device, tally.backend, tally.images_per_second
    summary.start_seconds = None if tally.start_seconds is None else round(tally.start_seconds, 3)
    if views:
        name, per_image, augmentation = views
        summary.views_per_image, summary.augmentation = per_image, augmentation
        table = state.views.get(name)
        summary.views = sum(view <= per_image for _, view in table.keys) if table else 0
