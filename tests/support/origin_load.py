"""What the dev origin saw of a load: how many courses it served at once, and at what rate."""

from __future__ import annotations

from dev.devservers import ContentOrigin


def course_of(path: str) -> str:
    """The course a file path belongs to: `/files/<slug>/...` -> `<slug>`."""
    return path.split("/")[2]


def most_courses_at_once(origin: ContentOrigin) -> int:
    """The most distinct courses (tasks) whose files the origin was sending at the same moment."""
    with origin.lock:
        transfers = sorted(origin.transfers, key=lambda item: (item[0], item[2]))  # an end before a start at a tie
    open_files: dict[str, int] = {}
    most = 0
    for _, path, step in transfers:
        course = course_of(path)
        open_files[course] = open_files.get(course, 0) + step
        most = max(most, sum(1 for count in open_files.values() if count > 0))
    return most


def steady_rate(origin: ContentOrigin, skip: float) -> tuple[float, float]:
    """(bytes per second the origin sent, seconds measured) from *skip* seconds after its first block to
    its last: the first moments go to filling socket buffers, faster than anyone reads."""
    with origin.lock:
        sends = list(origin.sends)
    assert sends, "the origin sent nothing"
    start = sends[0][0] + skip
    end = sends[-1][0]
    assert end > start, f"the transfer lasted {end - sends[0][0]:.2f} s, not more than {skip} s"
    sent = sum(count for at, count in sends if start < at <= end)
    return sent / (end - start), end - start
