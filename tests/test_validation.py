"""The one error helper: the message's one format, the errors that carry it, counts, kinds of
number, and declared fields: each constraint one object giving its check and its text, enums
coerced from the annotations, checked in order and named with their section."""

import dataclasses
import enum
import math
from typing import ClassVar

import pytest

from dynmoe_jax import validation
from dynmoe_jax.validation import (
    BOOL,
    Choice,
    ConfigError,
    Given,
    OrNone,
    PerLayer,
    Range,
    Site,
    Text,
)


class _Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class _Section:
    SECTION: ClassVar[str] = "section"
    size: int = validation.declared(2, "a size", Range(1))
    share: float | None = validation.declared(
        None, "a share of the size", OrNone(Range(0, "size", integer=False, open_high=True))
    )
    color: _Color = validation.declared(_Color.RED, "a color")
    tint: _Color | None = validation.declared(None, "a tint")

    def __post_init__(self):
        validation.check_declared(self)


def test_the_one_message_and_the_errors_that_carry_it():
    assert validation.message("moe.top_k", 9, "1..8") == "moe.top_k=9 is invalid: allowed 1..8"
    with pytest.raises(ConfigError) as err:
        validation.invalid("dataset", "x", "'kjv' | 'pydoc'")
    assert str(err.value) == "dataset='x' is invalid: allowed 'kjv' | 'pydoc'"
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working

    class Narrow(ConfigError):
        pass

    with pytest.raises(Narrow):
        validation.invalid("f", 1, "2", Narrow)
    validation.check(True, "f", 1, "2")
    with pytest.raises(ConfigError, match=r"^f=1 is invalid: allowed 2$"):
        validation.check(False, "f", 1, "2")


def test_counts_and_kinds_of_number():
    counts = [validation.counted(n, "batch", "batches") for n in (0, 1, 2)]
    assert counts == ["0 batches", "1 batch", "2 batches"]
    assert validation.is_int(3) and not validation.is_int(True) and not validation.is_int(3.0)
    assert validation.number(2.5) and validation.number(2)
    assert not validation.number(False) and not validation.number("2")


def test_declared_fields_are_checked_in_order_naming_their_section():
    assert (_Section().size, _Section(size=3, share=2.5).share) == (2, 2.5)
    with pytest.raises(ConfigError) as err:
        _Section(size=0, share=5.0)  # both are wrong: the first field is named
    assert str(err.value) == "section.size=0 is invalid: allowed an integer >= 1"
    with pytest.raises(ConfigError) as err:
        _Section(size=3, share=3.0)
    assert str(err.value) == "section.share=3.0 is invalid: allowed None or 0 <= share < " \
        "section.size=3"  # fmt: skip
    share = dataclasses.fields(_Section)[1]
    assert share.metadata["doc"] == "a share of the size"
    # The docs' text names the bound's field without a value.
    assert share.metadata["allows"].text(Site(_Section, "share")) == (
        "None or 0 <= share < section.size"
    )


def test_enums_are_coerced_from_the_annotations():
    assert (_Section(color="blue").color, _Section(tint="red").tint) == (_Color.BLUE, _Color.RED)
    assert _Section().tint is None
    for field, text in [("color", "'red' | 'blue'"), ("tint", "None or 'red' | 'blue'")]:
        with pytest.raises(ConfigError) as err:
            _Section(**{field: "green"})
        assert str(err.value) == f"section.{field}='green' is invalid: allowed {text}"


@pytest.mark.parametrize(
    "rule, good, bad, text",
    [
        (Range(1), [1, 10**9], [0, 1.0, True, "2", None], "an integer >= 1"),
        (Range(16, 1_000_000), [16, 1_000_000], [15, 1_000_001], "16..1000000"),
        (Range(0, integer=False, open_low=True), [1e-9, 3], [0, 0.0, -1.0, math.nan, False],
         "a number > 0"),
        (Range(0, 1, integer=False, open_high=True, note="1 excluded"), [0, 0.5],
         [1, 1.0, -0.1, math.nan], "0 <= x < 1 (1 excluded)"),
        (Range(2, even=True), [2, 4], [3, 0], "an even integer >= 2"),
        (OrNone(Range(1), "all"), [None, 1], [0], "None (all) or an integer >= 1"),
        (BOOL, [True, False], [1, 0, None, "True"], "True | False"),
        (Choice(("a", "b")), ["a"], ["c", None], "'a' | 'b'"),
        (Text("a folder", nonempty=True), ["x"], ["", 3, None], "a folder"),
        (PerLayer(Range(1, 4)), [2, (1, 4), (3,)], [(), (1, 5), 0, "2"],
         "1..4, or one such value per layer (comma-separated)"),
    ],
)  # fmt: skip
def test_each_constraint_gives_its_check_and_its_text(rule, good, bad, text):
    assert all(rule.ok(v, None) for v in good)
    assert not any(rule.ok(v, None) for v in bad)
    assert rule.text(Site(_Section, "x")) == text


def test_a_per_layer_value_converts_each_entry_and_a_list_to_a_tuple():
    rule = PerLayer(Choice(_Color))
    assert rule.convert(["red", "blue"]) == (_Color.RED, _Color.BLUE)
    assert rule.convert("red") is _Color.RED


def test_constraints_between_fields_show_the_other_field_s_value():
    config = _Section(size=4, color="blue")
    divides = Range(1, divides="size")
    assert divides.ok(2, config) and not divides.ok(3, config)
    assert divides.text(Site(_Section, "x", config)) == "an integer >= 1 dividing section.size=4"
    given = OrNone(Given(Range(1), "color", _Color.RED))
    assert given.ok(None, config) and not given.ok(2, config)
    assert given.ok(2, _Section(size=4))
    assert given.text(Site(_Section, "x")) == "None or an integer >= 1, with section.color='red'"
    needed = OrNone(Range(1), unless=("color", _Color.BLUE))
    assert not needed.ok(None, config) and needed.ok(None, _Section())
    assert needed.text(Site(_Section, "x")) == (
        "None (not with section.color='blue') or an integer >= 1"
    )
