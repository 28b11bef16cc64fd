"""Logging set-up for the command line and the workers; the library itself never configures logging."""

from __future__ import annotations

import logging.config

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
