"""`make bench`: the fetch step and the queue path measured against plain tools in one run.

Run it as `python -m bench` (or `--quick` for a reduced smoke run); see docs/BENCHMARKS.md.
This package must stay light to import: `bench.noop` is the job plain `rq worker` runs.
"""
