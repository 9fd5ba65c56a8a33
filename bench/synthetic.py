"""A feature cache written through the project's own writer, without running VGG16: what
bench/streaming.py and bench/train_memory.py train on. `synthetic_writer` opens one and
draws the class centres; each script lays out its rows (how many, copies, splits)."""

import numpy as np

ATTRS = {"backbone": "vgg16", "weights": "random", "weights_seed": 0, "input_size": 224,
         "interpolation": "bilinear", "pooling": "none", "precision": "float32", "dtype": "float32"}


def synthetic_writer(path, shape: tuple[int, ...], **facts):
    """(writer, attrs, rng, centres): a Writer on a new configuration of the cache `path`
    whose rows have `shape`, its attributes, the seeded generator, and ten class centres
    (drawn first, so a script's later draws are what they always were). `facts` change
    ATTRS; then the configuration is named by its true fingerprint, as train-head --head
    finetune checks (it builds the network the facts name), else by a made-up one."""
    from extract import FeatureConfig, fingerprint
    from extract.recovery import open_stored
    from extract.writer import Writer

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (10, int(np.prod(shape)))).astype(np.float32)
    attrs = dict(ATTRS, **facts, feature_shape=list(shape))
    key = fingerprint(FeatureConfig.from_facts(attrs).identity()) if facts else "bench" + "0" * 11
    writer = Writer(open_stored(path, key))
    writer.state.attrs = attrs  # what a shard is written with
    return writer, attrs, rng, centres
