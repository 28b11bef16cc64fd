"""Logging set-up for the command line and the workers; the library itself never configures logging."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": FORMAT}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "loggers": {"udemy_dl": {"level": level, "handlers": ["stderr"], "propagate": False}},
        }
    )


_task: int | None = None
"""The task this process is working on: every line it logs meanwhile carries `task <id>: `."""
_base_factory = logging.getLogRecordFactory()


def set_task(task_id: int | None) -> None:
    """From now on, until set_task(None), prefix every log record this process makes (any logger:
    ours, RQ's, a library's) with `task <id>: `, unless its message already names the task. A
    worker sets it from the dequeue of a job to its end, and a work horse for each job it runs,
    so RQ's own lines about the job ("Successfully completed …", "Job OK") are found by
    `grep 'task 42:'` too."""
    global _task
    _task = task_id
    if task_id is not None and logging.getLogRecordFactory() is not _with_task:
        logging.setLogRecordFactory(_with_task)


def _with_task(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if _task is None:
        return record
    label = f"task {_task}:"
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed call: logging reports it when the line is written
        message = str(record.msg)
    if label not in message:
        record.msg = f"{label} {record.msg}"
    return record
