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
    """(bytes per second the origin sent, seconds measured) while every transfer ran: from *skip*
    seconds after the last one started (its first moments fill socket buffers faster than anyone
    reads) to the moment the first one ended (from then on, its client reads what its buffers hold
    while the origin sends it nothing more)."""
    with origin.lock:
        sends = list(origin.sends)
        transfers = list(origin.transfers)
    assert sends and transfers, "the origin sent nothing"
    start = max(at for at, _, step in transfers if step > 0) + skip
    end = min(at for at, _, step in transfers if step < 0)
    assert end > start + 1, f"the transfers ran together for {end - start + skip:.2f} s only"
    sent = sum(count for at, count in sends if start < at <= end)
    return sent / (end - start), end - start
