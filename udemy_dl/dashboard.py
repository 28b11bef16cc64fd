"""`udemy-dl dashboard`: rq-dashboard, the web UI RQ users know, on the service's own Redis.

rq-dashboard is an optional extra (requirements-dashboard.txt, or `pip install .[dashboard]`): workers
do not need it. This module builds its Flask app from our Settings rather than from its own command
line, so it reaches Redis exactly as the workers do (REDIS_URL, or the Sentinels with their master and
passwords; TLS; timeouts), and no password is ever put on a command line or in a log.

What it changes in rq-dashboard 0.9.0, and why:

- Redis: the client is ours (connection.redis_connection). rq-dashboard would build one from a URL for
  every request, and its URL form cannot carry a user name, TLS options or our timeouts.
- Requeue: a failed download's row in download_tasks is `failed`, so RQ's own requeue_job would run a
  job that skips the task at once. A download job is requeued the way `udemy-dl requeue-failed` does
  it (the row back to `processing`, then enqueued once); webhook deliveries go through RQ's requeue.
  Requeue-all answers POST only (it answered GET too: a link could trigger it).
- Delete and empty are off: deleting a paid order's job does not cancel the order (the reconciler
  enqueues a `processing` task that has no job again), so they would only mislead.
- Our three queues are listed from the start, not only after their first job.
- Basic auth (DASHBOARD_USERNAME/DASHBOARD_PASSWORD) guards every page, static files included, and
  is compared in constant time; listening on anything but loopback without it is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
from typing import Any

from redis import Redis
from rq import Queue, requeue_job
from rq.exceptions import NoSuchJobError
from rq.registry import FailedJobRegistry

from .connection import redis_connection
from .errors import ConfigError, UdemyDlError
from .producer import Producer
from .queues import worker_queues
from .settings import Settings, redact_url, redis_db_of

log = logging.getLogger(__name__)

DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 9181
"""rq-dashboard's own default port, so links and habits carry over."""
REALM = "udemy-dl dashboard"
_DOWNLOAD_JOB = re.compile(r"download-([0-9]+)")


class DashboardNotInstalled(UdemyDlError):
    """Raised when the optional extra (rq-dashboard and Flask) is not installed."""


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); any other name is taken as exposed."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, bind: str) -> None:
    """Refuse (ConfigError, exit 3) to listen beyond loopback without a login."""
    if not is_loopback(bind) and not settings.dashboard_username:
        raise ConfigError(
            "DASHBOARD_USERNAME",
            f"required (with DASHBOARD_PASSWORD) to listen on {bind!r}, which is not a loopback address: "
            "set both, or keep the default --bind 127.0.0.1 and reach it through an SSH tunnel",
        )


def redis_shown(settings: Settings) -> str:
    """Where the dashboard reads, for its header and the start-up line: never a password."""
    if not settings.redis_sentinels:
        return settings.redis_url_redacted
    hosts = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
    return f"redis+sentinel://{hosts}/{settings.redis_sentinel_master}/{redis_db_of(settings.redis_url)}"


def register_queues(settings: Settings, connection: Redis) -> None:
    """List our queues in RQ's set of queues (as their first enqueue would), so every view shows them."""
    connection.sadd(Queue.redis_queues_keys, *(queue.key for queue in worker_queues(settings, connection)))


def _import_rq_dashboard() -> tuple[Any, Any, Any]:
    try:
        import flask
        import rq_dashboard.web as web
        from rq_dashboard.version import VERSION
    except ImportError as exc:
        raise DashboardNotInstalled(
            f"the dashboard is an optional extra and is not installed ({exc}): "
            "pip install -r requirements-dashboard.txt (or pip install '.[dashboard]')"
        ) from None
    return flask, web, VERSION


class _Requeue:
    """Requeue failed jobs: downloads through the task rows (as `udemy-dl requeue-failed`), others as RQ does."""

    def __init__(self, settings: Settings, connection: Redis) -> None:
        self.settings = settings
        self.connection = connection

    def jobs(self, job_ids: list[str]) -> dict[str, Any]:
        task_ids = [int(m.group(1)) for m in map(_DOWNLOAD_JOB.fullmatch, job_ids) if m is not None]
        requeued: list[str] = []
        refused: list[dict[str, Any]] = []
        for job_id in job_ids:
            if _DOWNLOAD_JOB.fullmatch(job_id):
                continue
            try:
                requeue_job(job_id, connection=self.connection)
            except NoSuchJobError:
                refused.append({"job": job_id, "reason": "no such job"})
                continue
            requeued.append(job_id)
        if task_ids:
            try:
                producer = Producer(self.settings, connection=self.connection)
                result = producer.requeue_failed(task_ids)
            except ConfigError as exc:
                refused += [{"job": f"download-{task_id}", "reason": str(exc)} for task_id in task_ids]
            else:
                requeued += [f"download-{task_id}" for task_id in result.enqueued + result.already_queued]
                refused += [{"job": f"download-{item['taskId']}", "reason": item["reason"]} for item in result.refused]
        for item in refused:
            log.warning("dashboard: %s not requeued: %s", item["job"], item["reason"])
        if requeued:
            log.info("dashboard: requeued %s", ", ".join(requeued))
        return {"status": "ERROR" if refused else "OK", "requeued": requeued, "refused": refused}


def build_app(settings: Settings, connection: Redis | None = None) -> Any:
    """rq-dashboard's Flask app on *connection* (default: a client for *settings*), as described above."""
    flask, web, _ = _import_rq_dashboard()
    connection = connection or redis_connection(settings)
    # Its templates link the favicon through the app's own static route: serve rq-dashboard's folder there.
    app = flask.Flask(__name__, static_folder=os.path.join(web.blueprint.root_path, "static"))
    app.config.update(
        RQ_DASHBOARD_REDIS_URL=(redis_shown(settings),),
        RQ_DASHBOARD_DISABLE_DELETE=True,
        RQ_DASHBOARD_POLL_INTERVAL=2500,
    )
    app.register_blueprint(web.blueprint, url_prefix="")
    app.redis_conn = connection  # what every rq-dashboard view reads
    register_queues(settings, connection)

    # rq-dashboard's push_rq_connection builds a client from the URL list for each request: keep ours.
    hooks = app.before_request_funcs.get(web.blueprint.name, [])
    if web.push_rq_connection not in hooks:
        raise DashboardNotInstalled("this rq-dashboard version is not the one pinned in requirements-dashboard.txt")

    def one_instance() -> None:
        if (flask.request.view_args or {}).get("instance_number", 0) != 0:
            flask.abort(404)

    app.before_request_funcs[web.blueprint.name] = [
        one_instance if hook is web.push_rq_connection else hook for hook in hooks
    ]

    username, password = settings.dashboard_username, settings.dashboard_password
    if username and password:
        expected = (username.encode(), password.encode())

        def basic_auth() -> Any:
            auth = flask.request.authorization
            given = (
                ((auth.username or "").encode(), (auth.password or "").encode())
                if auth is not None and auth.type == "basic"
                else (b"", b"")
            )
            # Both compared, always: how long it takes says nothing about which part was wrong.
            name_ok = hmac.compare_digest(given[0], expected[0])
            password_ok = hmac.compare_digest(given[1], expected[1])
            if name_ok and password_ok:
                return None
            return flask.Response("login required\n", 401, {"WWW-Authenticate": f'Basic realm="{REALM}"'})

        app.before_request(basic_auth)  # the app's hooks run before the blueprint's: every page, static too

    requeue = _Requeue(settings, connection)

    def requeue_one(job_id: str) -> Any:
        return flask.jsonify(requeue.jobs([job_id])), {"Cache-Control": "no-store"}

    def requeue_all(queue_name: str) -> Any:
        if flask.request.method != "POST":
            return flask.Response("POST to requeue\n", 405, {"Allow": "POST"})
        job_ids = FailedJobRegistry(queue_name, connection=connection).get_job_ids(cleanup=False)
        result = requeue.jobs(job_ids)
        return flask.jsonify({**result, "count": len(result["requeued"])}), {"Cache-Control": "no-store"}

    app.view_functions[f"{web.blueprint.name}.requeue_job_view"] = requeue_one
    app.view_functions[f"{web.blueprint.name}.requeue_all"] = requeue_all
    return app


def run_dashboard(settings: Settings, bind: str = DEFAULT_BIND, port: int = DEFAULT_PORT) -> None:
    """Serve the dashboard until SIGINT/SIGTERM. Refuses an exposed bind without a login (ConfigError)."""
    check_exposure(settings, bind)
    _, _, version = _import_rq_dashboard()
    from werkzeug.serving import make_server

    app = build_app(settings)
    server = make_server(bind, port, app, threaded=True)
    host = f"[{bind}]" if ":" in bind else bind
    login = "basic auth on" if settings.dashboard_username else "no login (loopback only)"
    log.info(
        "dashboard (rq-dashboard %s) on http://%s:%s/ reading %s; %s",
        version,
        host,
        server.server_port,
        redact_url(redis_shown(settings)),
        login,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
