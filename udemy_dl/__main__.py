"""`python -m udemy_dl`."""

import sys

from .cli import main

sys.exit(main())
