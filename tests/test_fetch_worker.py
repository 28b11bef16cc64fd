"""The fetch fixes seen from the task's side, with real RQ workers, Redis and MariaDB: a complete part file left by
a killed run completes the task; an unwritable manifest fails it on the first attempt; a symlink planted in the
staging folder never reaches the final folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fetching import cut_transfer, killed_at_part_rename
from tests.support.service import Service
from udemy_dl.fetch import PARTS_DIRNAME, Fetcher
from udemy_dl.folders import staging_path
from udemy_dl.store import COMPLETED, FAILED


def test_complete_part_left_by_a_killed_run_completes_the_task(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed between the last write and the rename left every byte in the part file: the next run
    verifies it and completes the task (it used to fail for good on the origin's 416)."""

    url = svc.origin.add_course("killed", {"big.bin": 2_000_000})
    task_id = svc.confirm(url)
    with killed_at_part_rename():
        Fetcher({svc.origin.host_port}).fetch(url, staging_path(svc.settings, task_id))
    svc.run_jobs()
    row = svc.row(task_id)
    assert (row.status, row.attempts, row.error_message) == (COMPLETED, 1, None)
    assert svc.origin.bytes_sent["/files/killed/big.bin"] == 2_000_000


def test_chunked_body_cut_before_its_last_chunk_completes_the_task(svc: Service) -> None:
    """Every byte arrived but not the final empty chunk: the retry's Range request meets a 416 `bytes */N`, and the
    task completes on its second attempt instead of failing."""
    size = 8 * 256 * 1024  # whole chunks of the origin's, whole reads of ours: every byte reaches the part
    url = svc.origin.add_course("chunked", {"big.bin": size}, with_checksums=False)
    svc.origin.chunked = True
    task_id = svc.paid_task(url)
    with cut_transfer(svc.origin, "/files/chunked/big.bin", size):
        Fetcher({svc.origin.host_port}).fetch(url, staging_path(svc.settings, task_id))
    svc.store.begin_attempt(task_id, svc.settings.max_attempts)
    svc.producer().add_download_job(svc.payload(task_id))
    svc.run_jobs()
    row = svc.row(task_id)
    assert (row.status, row.error_message) == (COMPLETED, None)


def test_a_resumed_download_reports_the_rate_of_what_it_fetched(svc: Service) -> None:
    """A run that resumes 3 MB an earlier attempt left and fetches the last 1 MB at 1 MB/s reports about 1 MB/s
    (the rate `stats` shows), not the 4 MB on disk over its one second."""
    url = svc.origin.add_course("resumed", {"big.bin": 4_000_000})
    task_id = svc.confirm(url)
    with cut_transfer(svc.origin, "/files/resumed/big.bin", 3_000_000):
        Fetcher({svc.origin.host_port}).fetch(url, staging_path(svc.settings, task_id))
    svc.origin.throttle = 1_000_000
    svc.run_jobs()
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (COMPLETED, 1)
    assert svc.origin.bytes_sent["/files/resumed/big.bin"] == 4_000_000  # 3 MB cut, then the last 1 MB
    progress = svc.job(task_id).meta["progress"]
    assert progress["bytes"] == 4_000_000
    # About 1 MB/s (the origin's pace, a little over it for what the socket buffers let through at once);
    # counting the resumed bytes too would make it 4 MB/s or more.
    assert 500_000 <= progress["rate"] <= 2_000_000, progress


@pytest.mark.parametrize("paths", [["a", "a/b"], ["é" * 200 + ".mp4"]], ids=["file-and-folder", "long-name"])
def test_unwritable_manifest_fails_on_the_first_attempt(svc: Service, paths: list[str]) -> None:
    """A manifest whose paths cannot exist on the disk fails the task at once: one attempt, no retry scheduled."""
    files = [{"path": path, "url": "/files/x/data.bin"} for path in paths]
    task_id = svc.confirm(svc.origin.set_manifest("/courses/unwritable", {"files": files}))
    svc.run_jobs()
    row = svc.row(task_id)
    assert (row.status, row.attempts) == (FAILED, 1)
    assert svc.origin.requests.paths() == ["/courses/unwritable"]


def test_symlink_planted_in_staging_never_reaches_the_final_folder(svc: Service, tmp_path: Path) -> None:
    """A `.parts` symlink and a stray symlink in the task's staging folder: the task completes, nothing is written
    through them, and the final folder holds regular files and folders only."""
    outside = tmp_path / "outside"
    outside.mkdir()
    url = svc.origin.add_course("planted", {"a.bin": 5000})
    task_id = svc.confirm(url)
    staging = staging_path(svc.settings, task_id)
    staging.mkdir(parents=True)
    (staging / PARTS_DIRNAME).symlink_to(outside, target_is_directory=True)
    (staging / "stray").symlink_to("/etc/passwd")
    svc.run_jobs()
    row = svc.row(task_id)
    assert row.status == COMPLETED
    final = Path(row.output_path or "")
    assert sorted(p.name for p in final.iterdir()) == ["a.bin", "manifest.json"]
    assert not any(p.is_symlink() for p in final.rglob("*"))
    assert list(outside.iterdir()) == []
