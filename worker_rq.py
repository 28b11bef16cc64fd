"""The first design's entry point, from the repository root:

    python3 -c "from worker_rq import process_download; print(process_download({...}))"

It runs one download job in this process with the settings from the environment (or .env), as a
worker's horse would. The service itself lives in the udemy_dl package; this file only makes it
importable from a checkout, using the checkout's .venv when the running Python lacks the
dependencies (`make install` creates it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def _use_checkout_venv() -> None:
    """Put .venv's site-packages on sys.path when this Python has no rq (same Python version only)."""
    if importlib.util.find_spec("rq") is None:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site_packages = _ROOT / ".venv" / "lib" / version / "site-packages"
        if not site_packages.is_dir():
            raise SystemExit(
                f"worker_rq: the service's dependencies are not installed for {sys.executable}; "
                "run `make install` (creates .venv) or `pip install -r requirements.txt`"
            ) from None
        sys.path.append(str(site_packages))


_use_checkout_venv()
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

try:
    from udemy_dl.worker_rq import deliver_webhook, process_download
except ModuleNotFoundError as exc:  # .venv's packages, borrowed by another build of this Python version
    raise SystemExit(
        f"worker_rq: {exc} for {sys.executable} (Python {sys.version.split()[0]}); run this with "
        f"{_ROOT / '.venv' / 'bin' / 'python'}, or `pip install -r requirements.txt` for this Python"
    ) from None

__all__ = ["deliver_webhook", "process_download"]
