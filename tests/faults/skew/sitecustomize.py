"""A clock set ahead, for one subprocess of the fault suite: put this folder first on PYTHONPATH
and set UDEMY_DL_CLOCK_SKEW to the seconds to add.

time.time, time.time_ns, datetime.datetime.now/utcnow/today and datetime.date.today read the wall
clock plus the skew; the monotonic clock is left alone (it has no epoch to disagree about). Only
the wall clock of this process moves: Redis, MariaDB and the workers keep the machine's time, as a
second host whose clock runs ahead would see them. Loaded before any other module, so
`from datetime import datetime` anywhere gets the skewed class.
"""

from __future__ import annotations

import copyreg
import datetime as _datetime_module
import os
import time as _time_module
from collections.abc import Callable
from typing import Any

_SKEW = float(os.environ.get("UDEMY_DL_CLOCK_SKEW") or 0)

if _SKEW:
    _real_time = _time_module.time
    _real_time_ns = _time_module.time_ns
    _real_datetime = _datetime_module.datetime
    _real_date = _datetime_module.date
    _delta = _datetime_module.timedelta(seconds=_SKEW)

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    def _skewed_time_ns() -> int:
        return _real_time_ns() + int(_SKEW * 1_000_000_000)

    class _RealInstances(type):
        """isinstance(x, the skewed class) is true for every real datetime (or date)."""

        def __instancecheck__(cls, instance: object) -> bool:
            return isinstance(instance, cls.__mro__[1])

        def __subclasscheck__(cls, subclass: type) -> bool:
            return issubclass(subclass, cls.__mro__[1])

    class SkewedDatetime(_real_datetime, metaclass=_RealInstances):
        @classmethod
        def now(cls, tz: _datetime_module.tzinfo | None = None) -> _datetime_module.datetime:  # type: ignore[override]
            return _real_datetime.now(tz) + _delta

        @classmethod
        def utcnow(cls) -> _datetime_module.datetime:  # type: ignore[override]
            return _real_datetime.utcnow() + _delta

        @classmethod
        def today(cls) -> _datetime_module.datetime:  # type: ignore[override]
            return _real_datetime.today() + _delta

    class SkewedDate(_real_date, metaclass=_RealInstances):
        @classmethod
        def today(cls) -> _datetime_module.date:  # type: ignore[override]
            return (_real_datetime.now() + _delta).date()

    # Pickled under their real names: a real instance pickles as the class now found at
    # datetime.datetime (pickle insists on that identity), and loads as a real one elsewhere.
    def _reducer(fake: type) -> Callable[[Any], tuple[Any, ...]]:
        return lambda value: (fake, value.__reduce__()[1])

    for _fake, _real in ((SkewedDatetime, _real_datetime), (SkewedDate, _real_date)):
        _fake.__module__ = "datetime"
        _fake.__name__ = _fake.__qualname__ = _real.__name__
        copyreg.pickle(_real, _reducer(_fake))

    _time_module.time = _skewed_time
    _time_module.time_ns = _skewed_time_ns
    _datetime_module.datetime = SkewedDatetime  # type: ignore[misc]
    _datetime_module.date = SkewedDate  # type: ignore[misc]
