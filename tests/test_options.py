import re
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
import pytest

from extract import Augmentation, FeatureConfig, Interval, StrOptions, UsageError, check_options
from extract.options import EXTRACT_FEATURES

SIZE = {"--size": Interval(Integral, 1, 1024)}
RATE = {"--rate": Interval(Real, 0, 1, closed="left")}
FORMAT = re.compile(r"Expected --[a-z-]+ .+; received .+\.")  # the one format of every message


def refusal(values, constraints) -> str:
    with pytest.raises(UsageError) as error:
        check_options(values, constraints)
    assert FORMAT.fullmatch(str(error.value)), str(error.value)
    return str(error.value)


@pytest.mark.parametrize("value", [1, 512, 1024, np.int64(7), np.uint8(255)])
def test_whole_numbers_within_the_ends_are_taken(value):
    check_options({"--size": value}, SIZE)


@pytest.mark.parametrize("value", [0, -1, 1025, 10**400])
def test_whole_numbers_past_an_end_are_refused_with_the_bounds_and_the_value(value):
    assert refusal({"--size": value}, SIZE) == f"Expected --size between 1 and 1024; received {value}."


@pytest.mark.parametrize("value", [2.0, 2.5, np.float64(3.0)])
def test_a_number_that_is_not_whole_is_refused_for_whole_numbers_and_told_so(value):
    assert refusal({"--size": value}, SIZE) == f"Expected --size to be a whole number between 1 and 1024; received {value}."


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_bools_are_not_numbers(value):
    assert refusal({"--size": value}, SIZE) == f"Expected --size between 1 and 1024; received {value!r}."
    refusal({"--rate": value}, RATE)


@pytest.mark.parametrize("value", ["3", None, [3], b"3"])
def test_what_is_not_a_number_is_refused_and_shown_as_python_writes_it(value):
    assert refusal({"--size": value}, SIZE) == f"Expected --size between 1 and 1024; received {value!r}."


@pytest.mark.parametrize("closed, taken, refused, excluded", [
    ("both", [0, 0.5, 1], [-0.01, 1.01], ""),
    ("left", [0, 0.999], [1, 1.0], " (1 excluded)"),
    ("right", [1, 1e-9], [0, 0.0], " (0 excluded)"),
    ("neither", [0.5], [0, 1], " (0 and 1 excluded)"),
])
def test_each_end_is_included_or_excluded_as_closed_says(closed, taken, refused, excluded):
    constraints = {"--rate": Interval(Real, 0, 1, closed=closed)}
    for value in taken:
        check_options({"--rate": value}, constraints)
    for value in refused:
        assert refusal({"--rate": value}, constraints) == f"Expected --rate between 0 and 1{excluded}; received {value}."


@pytest.mark.parametrize("value", [float("nan"), np.float32("nan"), float("inf"), float("-inf")])
def test_nan_and_infinities_are_refused(value):
    assert refusal({"--rate": value}, RATE).endswith(f"; received {value}.")


def test_nan_is_refused_even_without_bounds():
    refusal({"--x": float("nan")}, {"--x": Interval(Real, None, None)})


def test_real_intervals_take_whole_numbers_and_fractions():
    check_options({"--rate": 0, "--size": 3}, {**RATE, "--size": Interval(Real, 0, 10)})
    check_options({"--rate": Fraction(1, 3)}, RATE)


@pytest.mark.parametrize("interval, value, words", [
    (Interval(Integral, 1, None), 0, "at least 1"),
    (Interval(Real, 0, None, closed="right"), 0, "above 0"),
    (Interval(Integral, None, 10), 11, "at most 10"),
    (Interval(Real, None, 10, closed="left"), 10, "below 10"),
])
def test_an_end_without_a_bound_is_unbounded_and_said_so(interval, value, words):
    check_options({"--n": 10**9 if interval.high is None else -10**9}, {"--n": interval})
    assert refusal({"--n": value}, {"--n": interval}) == f"Expected --n {words}; received {value}."


def test_a_note_says_why_the_low_end_is_there():
    interval = Interval(Integral, 32, 1024, note="VGG16's minimum without its top")
    assert refusal({"--input-size": 16}, {"--input-size": interval}) == (
        "Expected --input-size between 32 (VGG16's minimum without its top) and 1024; received 16.")


@pytest.mark.parametrize("arguments", [(float, 0, 1), (Integral, 0, 1, "open")])
def test_a_bad_declaration_is_refused_when_made(arguments):
    with pytest.raises(ValueError, match="Expected Interval"):
        Interval(*arguments)


def test_strings_are_one_of_the_options_named_in_their_order():
    compact = {"--compact": StrOptions(("auto", "full", "never"))}
    check_options({"--compact": "full"}, compact)
    for value in ("x", "FULL", None, 1, b"full"):
        assert refusal({"--compact": value}, compact) == (
            f"Expected --compact to be one of auto, full, never; received {value!r}.")


def test_a_single_option_is_named_alone():
    assert refusal({"--class-weight": "x"}, {"--class-weight": StrOptions(("balanced",))}) == (
        "Expected --class-weight to be balanced; received 'x'.")


def test_none_is_taken_only_where_the_table_lists_it():
    workers = {"--workers": [Interval(Integral, 1, 64), None]}
    check_options({"--workers": None}, workers)
    check_options({"--workers": 8}, workers)
    assert refusal({"--workers": 0}, workers) == "Expected --workers between 1 and 64; received 0."
    assert refusal({"--size": None}, SIZE) == "Expected --size between 1 and 1024; received None."


def test_the_first_refused_value_is_named_and_the_others_pass():
    constraints = {**SIZE, **RATE}
    assert refusal({"--size": 2, "--rate": 2, "--other": None}, {**constraints, "--other": [None]}).startswith(
        "Expected --rate ")
    assert refusal({"--size": 0, "--rate": 2}, constraints).startswith("Expected --size ")


def test_an_option_missing_from_the_table_is_a_programming_error():
    with pytest.raises(KeyError):
        check_options({"--nope": 1}, SIZE)


def test_the_api_objects_check_against_extract_features_table():
    with pytest.raises(UsageError, match=re.escape("Expected --seed between 0 and 4294967295; received True.")):
        FeatureConfig(seed=True).validate()
    with pytest.raises(UsageError, match=re.escape("Expected --zoom between 0 and 1 (1 excluded); received nan.")):
        Augmentation(zoom=float("nan")).validate()
    assert EXTRACT_FEATURES["--zoom"] == Interval(Real, 0, 1, closed="left")
