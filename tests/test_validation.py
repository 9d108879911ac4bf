"""The one error helper: the message's one format, the errors that carry it, enum values,
counts, kinds of number, and declared fields checked in order."""

import dataclasses
import enum

import pytest

from dynmoe_jax import validation
from dynmoe_jax.validation import ConfigError


class _Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class _Section:
    size: int = validation.declared(2, "a size", "an integer >= 1", validation.int_at_least(1))
    share: float | None = validation.declared(
        None,
        "a share of the size",
        lambda c: f"None or a number below size={c.size}",
        validation.optional(lambda v, c: validation.number(v) and v < c.size),
    )

    def __post_init__(self):
        validation.check_declared(self, "section.")


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


def test_enum_values_counts_and_kinds_of_number():
    assert validation.enum_value(_Color, "color", "blue") is _Color.BLUE
    with pytest.raises(ConfigError) as err:
        validation.enum_value(_Color, "color", "green")
    assert str(err.value) == "color='green' is invalid: allowed 'red' | 'blue'"
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
        _Section(size=3, share=3.5)
    assert str(err.value) == "section.share=3.5 is invalid: allowed None or a number below size=3"
    share = dataclasses.fields(_Section)[1]
    assert share.metadata["doc"] == "a share of the size"
    assert validation.allowed_text(share, _Section(size=4)) == "None or a number below size=4"
