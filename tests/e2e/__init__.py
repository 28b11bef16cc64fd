"""End-to-end tests: the real shell scripts, real forking RQ workers, real Redis and MariaDB."""
