"""The job payload: a small JSON dict, turned at once into a validated, frozen TaskPayload."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidTaskError
from .safety import describe_char, first_control_char, first_url_unsafe_char

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+$")
REQUIRED_KEYS = ("taskId", "email", "courseUrl")


@dataclass(frozen=True)
class TaskPayload:
    """One download order as the job receives it."""

    task_id: int
    email: str
    course_url: str

    def to_payload(self) -> dict[str, Any]:
        """The JSON-able dict a job is enqueued with."""
        return {"taskId": self.task_id, "email": self.email, "courseUrl": self.course_url}


def parse_task_id(value: object) -> int:
    """Return *value* as a positive task id, or raise InvalidTaskError naming it."""
    if isinstance(value, bool):
        raise InvalidTaskError(f"taskId must be a positive integer, got {value!r}")
    if isinstance(value, int):
        task_id = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value.strip()):
        task_id = int(value.strip())
    else:
        raise InvalidTaskError(f"taskId must be a positive integer, got {value!r}")
    if task_id <= 0:
        raise InvalidTaskError(f"taskId must be a positive integer, got {value!r}")
    return task_id


def parse_task(data: object) -> TaskPayload:
    """Validate a job payload; the error names the missing key or the bad value."""
    if not isinstance(data, Mapping):
        raise InvalidTaskError(f"task data must be a dict, got {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS if data.get(key) in (None, "")]
    if missing:
        raise InvalidTaskError(f"task data is missing {', '.join(missing)}")
    task_id = parse_task_id(data["taskId"])
    email = data["email"]
    if isinstance(email, str):
        _refuse_controls("email", email)
    if not isinstance(email, str) or not EMAIL_RE.fullmatch(email.strip()):
        raise InvalidTaskError(f"email is not a valid address: {email!r}")
    course_url = data["courseUrl"]
    if not isinstance(course_url, str):
        raise InvalidTaskError(f"courseUrl must be a string, got {course_url!r}")
    _refuse_controls("courseUrl", course_url)
    bad = first_url_unsafe_char(course_url.strip())
    if bad is not None:
        raise InvalidTaskError(
            f"courseUrl holds {describe_char(bad)}; whitespace and backslashes are refused inside a URL: {course_url!r}"
        )
    return TaskPayload(task_id=task_id, email=email.strip(), course_url=course_url.strip())


def _refuse_controls(key: str, value: str) -> None:
    """Control, format and line-separator characters would forge log lines or hide text: refused, shown with repr."""
    bad = first_control_char(value)
    if bad is not None:
        raise InvalidTaskError(f"{key} holds control character {describe_char(bad)}: {value!r}")
