"""udemy_dl: the download-order worker service (RQ workers, MySQL record, signed webhooks)."""

__version__ = "0.1.0"

from . import tokens
from .producer import add_download_job, close, confirm_payment, get_queue_stats
from .settings import get_settings


def status_token(task_id: int, ttl: int = tokens.DEFAULT_TTL) -> str:
    """A token that lets a customer's browser watch task *task_id* live for *ttl* seconds (docs/STATUS.md),
    signed with STATUS_TOKEN_SECRET from the settings (ConfigError when it is not set)."""
    return tokens.status_token(task_id, ttl, secret=get_settings().require_status_tokens())


__all__ = ["__version__", "add_download_job", "close", "confirm_payment", "get_queue_stats", "status_token"]
