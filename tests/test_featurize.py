"""featurize: keys gathered into full batches, each computed once, items handed down as they complete."""

import numpy as np

from extract.config import FeatureConfig
from extract.featurize import HELD_BATCHES, Network, featurize


class Counting:
    """A stand-in network: a key's features are its pixels' sum; records each batch's size."""

    def __init__(self):
        self.batches = []

    def __call__(self, pixels):
        self.batches.append(len(pixels))
        return pixels.reshape(len(pixels), -1).sum(axis=1, keepdims=True).astype(np.float32)


def network() -> tuple[Network, Counting]:
    counting = Counting()
    net = Network(FeatureConfig(input_size=32, weights="random"))
    net.backbone = counting  # built: featurize computes through it
    return net, counting


def pixels(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


def test_a_key_many_items_need_is_computed_once_and_given_to_each():
    net, counting = network()
    work = [(f"copy-{i}", {"a": pixels(1)}) for i in range(50)] + [("b", {"b": pixels(2)}), ("c", {})]
    items = {item: features for done in featurize(work, net, batch_size=4) for item, features in done.items}
    assert sum(counting.batches) == 2  # "a" and "b", once each
    assert len(items) == 52 and all(float(items[f"copy-{i}"]["a"][0]) == 12 for i in range(50))
    assert items["c"] == {} and float(items["b"]["b"][0]) == 24


def test_batches_are_full_but_the_last_and_the_first_comes_down_at_once(monkeypatch):
    import extract.featurize

    counting = Counting()
    counting.device, counting.backend = "CPU", "test"
    monkeypatch.setattr(extract.featurize, "Backbone", lambda config: counting)
    net = Network(FeatureConfig(input_size=32, weights="random"))  # built at the first batch
    work = [(i, {f"k{i}": pixels(i)}) for i in range(10)]
    groups = list(featurize(work, net, batch_size=4))
    assert counting.batches == [4, 4, 2]
    assert groups[0].started and groups[0].items == []  # the network is up, before its first batch
    assert groups[1].keys == ["k0", "k1", "k2", "k3"]  # the first batch, at once
    assert sorted(item for group in groups for item, _ in group.items) == list(range(10))


def test_not_ordered_an_item_that_needs_nothing_is_not_kept_waiting():
    net, _ = network()
    work = [("new", {"x": pixels(1)})] + [(f"known-{i}", {}) for i in range(3)]
    stream = featurize(work, net, batch_size=4)
    assert [item for item, _ in next(stream).items] == ["known-0"]  # "new" still waits for a full batch


def test_ordered_keeps_the_input_order_and_bounds_what_waits():
    net, counting = network()
    batch = 4
    work = [("first", {"x": pixels(1)})] + [(i, {}) for i in range(HELD_BATCHES * batch)]
    seen = [item for done in featurize(work, net, batch_size=batch, ordered=True) for item, _ in done.items]
    assert seen == ["first", *range(HELD_BATCHES * batch)]
    assert counting.batches == [1]  # started early: more than HELD_BATCHES batches of items waited behind it
