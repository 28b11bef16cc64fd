"""The test suite. Under pytest-xdist (`make test` runs `pytest -n`), each xdist worker gets Redis
databases and MariaDB databases of its own, chosen here before any test module reads them, so the
workers never flush or read each other's data; a variable already set by the caller wins."""

import os

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER[2:].isdigit() and int(_WORKER[2:]) > 0:
    _N = int(_WORKER[2:])
    # gw0 keeps the defaults (Redis 15 and 14); gw1 takes 13 and 12, gw2 11 and 10, and so on.
    os.environ.setdefault("UDEMY_DL_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{15 - 2 * _N}")
    os.environ.setdefault("UDEMY_DL_E2E_REDIS_URL", f"redis://127.0.0.1:6379/{14 - 2 * _N}")
    for _VARIABLE, _DATABASE in (
        ("UDEMY_DL_TEST_MYSQL_DB", "udemy_dl_test"),
        ("UDEMY_DL_E2E_MYSQL_DB", "udemy_dl_e2e"),
        ("UDEMY_DL_FAULTS_MYSQL_DB", "udemy_dl_faults"),
        ("UDEMY_DL_HOSTS_MYSQL_DB", "udemy_dl_hosts"),
    ):
        os.environ.setdefault(_VARIABLE, f"{_DATABASE}_{_WORKER}")
