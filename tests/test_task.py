"""Task payload parsing: a valid dict becomes a frozen TaskPayload; every kind of bad data is named."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from udemy_dl.errors import InvalidTaskError, PermanentError
from udemy_dl.payload import TaskPayload, parse_task, parse_task_id

T = TypeVar("T", bound=Callable[..., object])

GOOD: dict[str, Any] = {"taskId": 42, "email": "buyer@shop.example", "courseUrl": "https://cdn.example/courses/x"}


def test_valid_payload_becomes_task_data() -> None:
    """A well-formed payload parses into TaskPayload with the same values."""
    assert parse_task(GOOD) == TaskPayload(42, "buyer@shop.example", "https://cdn.example/courses/x")


def test_task_data_round_trips_through_its_payload() -> None:
    """to_payload() gives back the dict a job is enqueued with, which parses to the same TaskPayload."""
    task = parse_task(GOOD)
    assert task.to_payload() == GOOD
    assert parse_task(task.to_payload()) == task


def test_task_data_is_frozen() -> None:
    """TaskPayload cannot be changed after validation."""
    task = parse_task(GOOD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.task_id = 1  # type: ignore[misc]


def test_numeric_string_task_id_and_padded_values_are_normalised() -> None:
    """A taskId given as a digit string is accepted; email and URL are stripped of surrounding blanks."""
    task = parse_task({"taskId": " 7 ", "email": " a@b.example ", "courseUrl": " https://cdn.example/c "})
    assert task == TaskPayload(7, "a@b.example", "https://cdn.example/c")


def test_invalid_task_error_is_permanent() -> None:
    """Bad input is a permanent error: the job is never retried for it."""
    assert issubclass(InvalidTaskError, PermanentError)


@pytest.mark.parametrize(
    ("data", "missing"),
    [
        ({"email": "a@b.example", "courseUrl": "https://cdn.example/c"}, "taskId"),
        ({"taskId": 1, "courseUrl": "https://cdn.example/c"}, "email"),
        ({"taskId": 1, "email": "a@b.example"}, "courseUrl"),
        ({"taskId": 1, "email": "", "courseUrl": "https://cdn.example/c"}, "email"),
        ({"taskId": None, "email": "a@b.example", "courseUrl": "https://cdn.example/c"}, "taskId"),
    ],
    ids=["no-taskId", "no-email", "no-courseUrl", "empty-email", "null-taskId"],
)
def test_missing_key_is_named(data: dict[str, Any], missing: str) -> None:
    """A payload without a required key (or with it empty) names that key."""
    with pytest.raises(InvalidTaskError, match=f"missing .*{missing}"):
        parse_task(data)


def test_every_missing_key_is_named_at_once() -> None:
    """An empty payload names all three required keys."""
    with pytest.raises(InvalidTaskError) as caught:
        parse_task({})
    assert all(key in str(caught.value) for key in ("taskId", "email", "courseUrl"))


@pytest.mark.parametrize("data", [["taskId", 1], "taskId=1", None, 42])
def test_non_dict_payload_is_refused(data: object) -> None:
    """Task data must be a dict; the error names the type it got."""
    with pytest.raises(InvalidTaskError, match=f"must be a dict, got {type(data).__name__}"):
        parse_task(data)


@pytest.mark.parametrize("value", ["abc", -1, True, False, 1.5, 0, "-1", "1.5", "", " ", "0x10", [1], {"id": 1}])
def test_bad_task_id_is_refused_naming_the_value(value: object) -> None:
    """taskId must be a positive integer (or digit string); anything else is refused and shown."""
    with pytest.raises(InvalidTaskError) as caught:
        parse_task_id(value)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("value", ["abc", -1, True, 1.5])
def test_bad_task_id_in_a_payload_is_refused_naming_the_value(value: object) -> None:
    """parse_task reports a bad taskId with its value, not a generic error."""
    with pytest.raises(InvalidTaskError, match="taskId") as caught:
        parse_task({**GOOD, "taskId": value})
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("value", ["²", "1²"])
def test_unicode_digit_task_id_is_refused_as_invalid_task(value: str) -> None:
    """A taskId of non-ASCII 'digits' is bad input (InvalidTaskError), not an unexpected ValueError."""
    with pytest.raises(InvalidTaskError):
        parse_task_id(value)


@pytest.mark.parametrize(
    "email",
    ["not-an-email", "a@b", "a b@shop.example", "@shop.example", "a@-shop.example", "a@shop..example", 42, ["a@b.c"]],
)
def test_invalid_email_is_refused_naming_the_value(email: object) -> None:
    """A malformed or non-string email is refused and shown in the message."""
    with pytest.raises(InvalidTaskError, match="email") as caught:
        parse_task({**GOOD, "email": email})
    assert repr(email) in str(caught.value)


@pytest.mark.parametrize("url", [123, ["https://cdn.example/c"], {"url": "https://cdn.example/c"}, 1.5])
def test_non_string_course_url_is_refused_naming_the_value(url: object) -> None:
    """courseUrl must be a string; the message shows what was given."""
    with pytest.raises(InvalidTaskError, match="courseUrl") as caught:
        parse_task({**GOOD, "courseUrl": url})
    assert repr(url) in str(caught.value)


# -- control characters in task data (issue 8, item 14) -------------------------------------------

CONTROLS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u200b", "\ufeff"]


def control_cases(*wheres: str) -> Callable[[T], T]:
    """The test for each control character (id U+XXXX), placed at each of *wheres*."""

    places = pytest.mark.parametrize("where", list(wheres))
    chars = pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")

    def apply(test: T) -> T:
        marked: T = chars(places(test))
        return marked

    return apply


def assert_refused_naming(field: str, value: str, char: str) -> None:
    """A payload whose *field* is *value* is refused, the value shown with repr (no raw *char* in the message)."""
    with pytest.raises(InvalidTaskError, match=field) as caught:
        parse_task({**GOOD, field: value})
    assert repr(value) in str(caught.value)
    assert char not in str(caught.value)


@control_cases("middle", "end", "start")
def test_control_character_in_course_url_is_refused_naming_the_value(char: str, where: str) -> None:
    """A newline (or any control/format character) in courseUrl would forge log lines: refused, shown with repr."""
    placed = {"middle": f"https://cdn.example/c{char}INFO task 1: completed", "end": f"https://cdn.example/c{char}"}
    assert_refused_naming("courseUrl", placed.get(where, f"{char}https://cdn.example/c"), char)


@control_cases("local", "end", "start")
def test_control_character_in_email_is_refused_naming_the_value(char: str, where: str) -> None:
    """An email holding a control or format character is refused, shown with repr (no raw control in the message)."""
    placed = {"local": f"bu{char}yer@shop.example", "end": f"buyer@shop.example{char}"}
    assert_refused_naming("email", placed.get(where, f"{char}buyer@shop.example"), char)


@pytest.mark.parametrize("url", ["https://cdn.example/a b", "https://cdn.example/a\\b", "https://cdn.example/a\xa0b"])
def test_whitespace_or_backslash_inside_course_url_is_refused(url: str) -> None:
    """Blanks around courseUrl are trimmed, but whitespace or a backslash inside it is refused at once."""
    with pytest.raises(InvalidTaskError, match="courseUrl") as caught:
        parse_task({**GOOD, "courseUrl": url})
    assert repr(url) in str(caught.value)


def test_email_local_part_with_printable_unicode_is_still_accepted() -> None:
    """Refusing controls does not refuse ordinary non-ASCII letters."""
    assert parse_task({**GOOD, "email": "josé@shop.example"}).email == "josé@shop.example"
