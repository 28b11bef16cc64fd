"""udemy_dl: the download-order worker service (RQ workers, MySQL record, signed webhooks)."""

__version__ = "0.1.0"

from .producer import add_download_job, close, confirm_payment, get_queue_stats

__all__ = ["__version__", "add_download_job", "close", "confirm_payment", "get_queue_stats"]
