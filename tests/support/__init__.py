"""What the test suites share, as modules (the conftests only turn it into fixtures).

- ci: whether a missing service is a skip or (under CI) a failure
- ports, waiting, files: free ports, waiting with a deadline, checksums and listings
- processes: /proc, killing process trees, marked processes, processes started with a log
- scripts: the venv's console scripts, start/stop_workers.sh PID files, `rq info`, a clean environment
- deployment: one installation run as an operator runs it (environment, folders, CLI, scripts, pool)
- redis_servers, mariadb, relay, rq_state: Redis servers of a test's own, MariaDB, a cuttable TCP relay, RQ's state
- http_servers: the dev origin and receiver, courses and paid tasks, received events
- service, intake, fetching: the service in this process (main suite), the intake and its client, fetchers
- horses: real workers' kept work horses seen from outside (which process ran each attempt), a hung receiver
- e2e, faults, hosts, sentinel, measurements: each slow suite's world, and its measured times
"""
