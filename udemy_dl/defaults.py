"""Named defaults: queue names, TTLs, timeouts and limits, in one place."""

DOWNLOAD_JOB_FUNCTION = "udemy_dl.worker_rq.process_download"
"""The download job, named as RQ stores it (producers need not import the worker code)."""

DELIVER_JOB_FUNCTION = "udemy_dl.worker_rq.deliver_webhook"
"""The webhook delivery job, named as RQ stores it."""

RENAMED_JOB_FUNCTIONS = {"udemy_dl.webhooks.deliver_webhook": DELIVER_JOB_FUNCTION}
"""Job functions queued under an earlier name: a worker runs them under their current one."""

DOWNLOAD_QUEUE = "downloads"
"""RQ queue that download jobs go on."""

WEBHOOK_QUEUE = "webhooks"
"""RQ queue that webhook deliveries go on (short jobs, listened to first)."""

WORKER_COUNT = 5
"""Worker processes started by start_workers.sh and by the pool."""

MAX_ATTEMPTS = 3
"""Attempts in all for one download job (the first run plus retries)."""

RETRY_DELAY = 20
"""Seconds before the first retry; each later retry waits twice as long."""

RETRY_JITTER = 0.25
"""Each retry delay is stretched by a random share of up to this fraction."""

JOB_TIMEOUT = 3600
"""Seconds one download may run before RQ stops it."""

RESULT_TTL = 86_400
"""Seconds a finished job stays in Redis (24 h)."""

FAILURE_TTL = 604_800
"""Seconds a failed job stays in Redis (7 days)."""

STOP_TIMEOUT = 30
"""Seconds stop_workers.sh waits for a worker before SIGKILL."""

WEBHOOK_RETRY_INTERVALS = (10, 30, 60, 120, 300, 600, 900, 1200, 1800)
"""Seconds between webhook delivery attempts: 5,020 s in all, more than an hour."""

WEBHOOK_TIMEOUT = 10
"""Seconds for one webhook POST (connect and read)."""

WEBHOOK_JOB_TIMEOUT = 60
"""Seconds one webhook delivery job may run."""

CONNECT_TIMEOUT = 10
"""Seconds to connect to the content origin."""

READ_TIMEOUT = 60
"""Seconds the content origin may stay silent mid-download."""

CHUNK_SIZE = 1024 * 1024
"""Bytes read per chunk when hashing files on disk, or streaming a compressed body."""

READ_BUFFER_SIZE = 256 * 1024
"""Bytes of the one buffer a download is read into: large enough to be cheap per byte, small
enough that an interrupted transfer loses little of what had arrived."""

MANIFEST_MAX_BYTES = 8 * 1024 * 1024
"""Largest manifest document accepted (bytes)."""

ENQUEUE_LOCK_TIMEOUT = 10
"""Seconds the per-task enqueue lock lives if its holder dies."""

REDIS_SENTINEL_MASTER = "mymaster"
"""The master name the Sentinels monitor, when REDIS_SENTINELS is set."""

MYSQL_PORT = 3306
REDIS_PORT = 6379

DOWNLOAD_DIR = "./downloads"
FAILED_DIR = "./failed"
LOG_DIR = "./logs"
PID_DIR = "./run"

STAGING_DIRNAME = ".staging"
"""Folder under DOWNLOAD_DIR where a task's files land before they are moved into place."""

PROGRESS_INTERVAL = 1.0
"""Seconds between progress writes (job.meta, database, log)."""

FETCH_CONCURRENCY = 4
"""Files of one manifest fetched at the same time."""

MAX_TASK_BYTES = 50 * 1024**3
"""Largest course one task may fetch (bytes, 50 GiB); 0 means no limit."""

DISK_HEADROOM = 256 * 1024 * 1024
"""Bytes kept free on the download disk beyond what a task needs."""

RECONCILE_INTERVAL = 300
"""Seconds between reconciler sweeps while workers run."""

RECOVERY_INTERVAL = 10
"""Seconds between the reconciler's Redis-only checks for jobs whose worker died."""

WORKER_TTL = 60
"""Seconds a worker's registration lives without a heartbeat (RQ's worker_ttl; its default is 420).
Idle workers heartbeat every WORKER_TTL - 15 s, busy ones every 30 s, so a dead worker on another
host is noticed within about 90 s."""

LEASE_TTL = 30
"""Seconds a task's lease lives unless its run renews it (every LEASE_TTL / 3 seconds)."""

ORIGIN_SLOT_WAIT = 5
"""Seconds a run waits for a free slot at its origin (ORIGIN_CONCURRENCY) before it hands its task back."""

ORIGIN_BUSY_DELAY = 5
"""Seconds a task handed back for a busy origin waits before it is queued again (plus up to RETRY_JITTER)."""

STORE_RETRY_SECONDS = 120
"""How long a worker keeps retrying a status update while the database is unreachable."""

SCHEDULER_TAKEOVER_INTERVAL = 10
"""Seconds between a worker's tries to take the scheduler locks while its own scheduler is not
running (a peer's holds them, or its own died): a dead scheduler's lock outlives it by a minute."""

HORSE_MAX_JOBS = 100
"""Downloads one work horse runs before its worker forks a fresh one (sooner after a job that
failed): a horse is kept from one download to the next, and this bounds what it may accumulate."""

HAND_BACK_SIGNAL_NAME = "SIGUSR1"
"""Signal a stopping worker sends its work horse: hand the task back to the queue now."""

PRIORITIES = ("normal", "high")
"""Order priorities: `high` (VIP) tasks go on their own queue, served first."""

HIGH_QUEUE_SUFFIX = "-high"
"""The VIP queue is QUEUE_NAME + this suffix (`downloads-high`)."""

HIGH_PICKUPS_BEFORE_NORMAL = 4
"""A worker takes at most this many VIP tasks in a row while normal ones wait: 1 pickup in 5 stays normal."""

PROGRESS_EVENT_STEP = 10
"""A download.progress webhook goes out every this many percent..."""

PROGRESS_EVENT_INTERVAL = 30
"""...or after this many seconds without one, whichever comes first."""

MAX_ERROR_LENGTH = 4000
"""Characters of a failure reason kept in download_tasks.error_message (and sent in download.failed)."""
