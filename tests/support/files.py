"""Files on disk: checksums (the dev servers' own sha256, so the tests and the origin agree) and listings."""

from __future__ import annotations

from pathlib import Path

from dev.devservers import sha256_of as sha256_of


def files_under(folder: Path) -> list[str]:
    """Every file (or symlink) below *folder*, as sorted relative paths."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
