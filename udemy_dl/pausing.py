"""Pause and resume: RQ's own suspension (`rq suspend`) for every queue, or one queue at a time.

Pausing everything is RQ's suspension key itself (`rq:suspended`), so `rq suspend` and
`udemy-dl pause` are one thing, as are `rq resume` and `udemy-dl resume`. One queue is paused with
`udemy_dl:paused:<queue>`. DownloadWorker looks at both after every dequeue and puts a job it
took from a held queue back at the front, so a worker already blocked on its queues when the
pause came starts nothing; running jobs finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from redis import Redis
from rq.suspension import WORKERS_SUSPENDED

PAUSE_KEY = "udemy_dl:paused:{}"


def pause_key(queue: str) -> str:
    return PAUSE_KEY.format(queue)


@dataclass(frozen=True)
class PauseState:
    """What is paused: everything (RQ's suspension), and which queues on their own."""

    everything: bool = False
    queues: frozenset[str] = field(default_factory=frozenset)

    def holds(self, queue: str) -> bool:
        return self.everything or queue in self.queues

    def held(self, queues: Sequence[str]) -> list[str]:
        return [name for name in queues if self.holds(name)]

    def __bool__(self) -> bool:
        return self.everything or bool(self.queues)


def pause_state(connection: Redis, queues: Sequence[str]) -> PauseState:
    """One round trip: RQ's suspension key and the pause key of each of *queues*."""
    values: list[bytes | None] = connection.mget([WORKERS_SUSPENDED, *(pause_key(name) for name in queues)])  # type: ignore[assignment]
    return PauseState(
        everything=values[0] is not None,
        queues=frozenset(name for name, value in zip(queues, values[1:], strict=True) if value is not None),
    )


def pause(connection: Redis, queue: str | None = None) -> None:
    """Hold every worker (None: RQ's own suspension, as `rq suspend`) or those taking from *queue*."""
    connection.set(WORKERS_SUSPENDED if queue is None else pause_key(queue), 1)


def resume(connection: Redis, queue: str | None, queues: Sequence[str]) -> None:
    """Let workers take jobs again: from *queue*, or (None) from everything: RQ's suspension and
    the pause of each of *queues* are lifted."""
    if queue is not None:
        connection.delete(pause_key(queue))
        return
    connection.delete(WORKERS_SUSPENDED, *(pause_key(name) for name in queues))
