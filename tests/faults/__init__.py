"""Fault injection: killed workers and horses, Redis and MySQL outages, a receiver that is down (`make test-faults`)."""
