"""`python -m bench [--quick]`: see bench/run.py and docs/BENCHMARKS.md."""

from bench.run import main

raise SystemExit(main())
