"""Request bodies (api/schemas.py): what a 422 says about a bad field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.schemas import CandidateCreate, ProgramCreate

BODY = {"name": "lr sweep", "instructions": "# Goal\n"}


def _errors(model: Any, **fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as err:
        model(**fields)
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in err.value.errors()]


def test_a_deadline_with_no_utc_equivalent_is_refused() -> None:
    """Found by review: "9999-12-31T23:00:00-12:00" was taken (201), and turning it into UTC raised OverflowError
    on every pass of the scheduler."""
    for deadline in ("9999-12-31T23:00:00-12:00", "0001-01-01T00:00:00+01:00"):
        assert _errors(ProgramCreate, **BODY, stop_rules={"deadline": deadline}) == [
            ("stop_rules.deadline", "Value error, out of range: in UTC it would fall outside the years 1 to 9999")]
    rules = ProgramCreate(**BODY, stop_rules={"deadline": "2030-01-01T05:00:00+05:00"}).stop_rules
    assert rules.model_dump(mode="json", exclude_none=True) == {"deadline": "2030-01-01T00:00:00Z"}
    # a naive time is kept as given (the scheduler reads it as UTC), to the end of the range
    rules = ProgramCreate(**BODY, stop_rules={"deadline": "9999-12-31T23:59:59"}).stop_rules
    assert rules.model_dump(mode="json", exclude_none=True) == {"deadline": "9999-12-31T23:59:59"}


def test_text_lengths_are_counted_in_characters() -> None:
    """Found by review: the length constraints sat after the text validator and said "Value should have at least 1
    item after validation"."""
    assert _errors(ProgramCreate, name="", instructions="x") == [("name", "String should have at least 1 character")]
    assert _errors(ProgramCreate, name="a" * 201, instructions="x") == [
        ("name", "String should have at most 200 characters")]
    assert _errors(ProgramCreate, **BODY, hw_class="") == [("hw_class", "String should have at least 1 character")]
    assert _errors(ProgramCreate, **BODY, editable_files=[""]) == [
        ("editable_files.0", "String should have at least 1 character")]
    assert _errors(ProgramCreate, **BODY, proposer={"model": "m" * 201}) == [
        ("proposer.model", "String should have at most 200 characters")]
    assert _errors(CandidateCreate, description="", files={"": "x"}) == [
        ("description", "String should have at least 1 character"),
        ("files..[key]", "String should have at least 1 character")]
    # the text checks still run, and the patterns
    assert _errors(ProgramCreate, name="a\x00", instructions="x") == [
        ("name", "Value error, must not contain NUL characters")]
    assert _errors(ProgramCreate, **BODY, hw_class="GPU") == [
        ("hw_class", "String should match pattern '^[a-z0-9][a-z0-9._-]*$'")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_numbers_must_be_finite(value: float) -> None:
    """Found by review: "weight": NaN was answered "Input should be less than or equal to 1000"."""
    finite = "Input should be a finite number"
    assert _errors(ProgramCreate, **BODY, weight=value) == [("weight", finite)]
    assert _errors(ProgramCreate, **BODY, time_budget=value, policy={"k_sigma": value},
                   proposer={"temperature": value}, stop_rules={"max_hours": value}) == [
        ("time_budget", finite), ("proposer.temperature", finite), ("policy.k_sigma", finite),
        ("stop_rules.max_hours", finite)]
