"""The baseline job for part (c): plain `rq worker` runs this no-op function."""


def noop() -> None:
    return None
