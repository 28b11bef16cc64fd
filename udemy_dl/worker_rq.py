"""The RQ entry points. Every queued job stores the path of its function
(`udemy_dl.worker_rq.process_download`, `udemy_dl.worker_rq.deliver_webhook`): keep this module's
name and these names, so jobs queued before an upgrade still run after it. The jobs themselves
live in job.py."""

from .job import deliver_webhook, process_download

__all__ = ["deliver_webhook", "process_download"]
