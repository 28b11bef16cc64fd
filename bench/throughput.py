"""Part (a): a 1 GiB course of 40 files, fetched by one real forking worker, against curl with `xargs -P 4`."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

from dev.devservers import write_sample_file
from udemy_dl import defaults

from .harness import Bench, row_time, split_evenly
from .report import Part, Row
from .support import BenchError, Child, RssMonitor, median, remove, say, sync_disks

TARGET_RATIO = 1.1
TARGET_RSS_MB = 150


def _make_course(bench: Bench) -> tuple[str, list[str], int]:
    """Write the course's files and manifest; return (manifest URL, file URLs, total bytes)."""
    profile = bench.profile
    sizes = split_evenly(profile.course_bytes, profile.course_files)
    say(f"(a) writing a course of {len(sizes)} files, {sum(sizes) / 2**20:,.0f} MiB")
    entries = []
    for number, size in enumerate(sizes, start=1):
        name = f"lecture-{number:02d}.bin"
        sha = write_sample_file(bench.data / "files" / "course" / name, size, f"bench-course/{name}")
        entries.append({"path": name, "url": f"/files/course/{name}", "size": size, "sha256": sha})
    manifest_url = bench.origin.publish_manifest("course", {"title": "Bench course", "files": entries})
    urls = [bench.origin.base_url + str(entry["url"]) for entry in entries]
    return manifest_url, urls, sum(sizes)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _xargs(urls: list[str], out: Path, parallel: int, verify: bool) -> tuple[float, float]:
    """curl every URL into *out*, *parallel* at a time; with *verify*, sha256 each file after (openssl).

    Returns (wall seconds, CPU seconds of curl and its helpers).
    """
    sync_disks()  # first, so the output deleted next is clean and its pages are free at once
    remove(out)
    out.mkdir(parents=True)
    if verify:
        argv = [
            "xargs",
            "-P",
            str(parallel),
            "-n",
            "1",
            "sh",
            "-c",
            'curl -sS --fail --remote-name "$0" && openssl dgst -sha256 -r "${0##*/}"',
        ]
    else:
        argv = ["xargs", "-P", str(parallel), "-n", "1", "curl", "--silent", "--show-error", "--fail", "--remote-name"]
    cpu = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        argv, input="\n".join(urls) + "\n", text=True, cwd=out, capture_output=True, check=False, timeout=600
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"curl baseline failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, _children_cpu() - cpu


def _ours(bench: Bench, worker: Child, manifest_url: str, total: int) -> tuple[float, RssMonitor]:
    """One task through the real path: enqueue, the worker's horse fetches, the row turns completed."""
    sync_disks()  # first, as for curl
    remove(bench.download_dir)
    task_id = bench.new_task(manifest_url)
    with RssMonitor(bench.children, worker, interval=0.05) as monitor:
        enqueued = time.time()
        bench.enqueue(task_id, manifest_url)
        # The clock stops at the row's finished_at, so a slower poll costs no accuracy, only less CPU.
        row = bench.wait_settled(task_id, timeout=600, logs=[worker], interval=0.1)
        polled = time.time()
    finished = row_time(row.finished_at)
    wall = (finished if finished is not None else polled) - enqueued
    if row.bytes != total:
        raise BenchError(f"task {task_id} completed with {row.bytes} bytes, expected {total}")
    folder = bench.download_dir / str(task_id)
    on_disk = sum(path.stat().st_size for path in folder.glob("*.bin"))
    if on_disk != total or not (folder / "manifest.json").is_file():
        raise BenchError(f"task {task_id}: {on_disk} bytes in {folder}, expected {total} and a manifest.json")
    # Left until just before the next run, as curl's output is (see the note on freed memory).
    return wall, monitor


def run_throughput(bench: Bench) -> Part:
    parallel = defaults.FETCH_CONCURRENCY
    part = Part(
        "a",
        "throughput: one task, a course of "
        f"{bench.profile.course_files} files ({bench.profile.course_bytes / 2**30:.3g} GiB), "
        f"fetched {parallel} at a time",
        f"curl, the same files with `xargs -P {parallel}` into a temp dir, from the same {bench.origin.kind} "
        "origin on loopback",
    )
    manifest_url, urls, total = _make_course(bench)
    worker = bench.start_worker("bench-a")
    bench.wait_registered([worker])
    curl_out = bench.workdir / "curl-out"
    verify = shutil.which("openssl") is not None
    curl_walls: list[float] = []
    curl_cpus: list[float] = []
    verify_walls: list[float] = []
    our_walls: list[float] = []
    horse_mb: list[float] = []
    horse_cpu: list[float] = []
    worker_mb = 0.0
    others_mb = 0.0
    # One untimed run of each side first: caches, connections and the memory their files land in
    # are then in the same state for every timed round.
    warm_curl, _ = _xargs(urls, curl_out, parallel, verify=False)
    warm_ours, _ = _ours(bench, worker, manifest_url, total)
    say(f"(a) warm-up, not counted: curl {warm_curl:.2f} s, ours {warm_ours:.2f} s")
    for number in range(1, bench.profile.rounds + 1):
        wall, cpu = _xargs(urls, curl_out, parallel, verify=False)
        curl_walls.append(wall)
        curl_cpus.append(cpu)
        say(f"(a) round {number}: curl {wall:.2f} s")
        wall, monitor = _ours(bench, worker, manifest_url, total)
        our_walls.append(wall)
        horse_mb.append(monitor.horse_mb)
        horse_cpu.append(monitor.horse_cpu)
        worker_mb = max(worker_mb, monitor.worker_mb)
        others_mb = max(others_mb, monitor.others_mb)
        say(f"(a) round {number}: ours {wall:.2f} s (horse peak RSS {monitor.horse_mb:.0f} MB)")
        if verify:
            wall, _ = _xargs(urls, curl_out, parallel, verify=True)
            verify_walls.append(wall)
            say(f"(a) round {number}: curl + openssl sha256 {wall:.2f} s")
    remove(curl_out)
    remove(bench.download_dir)
    bench.children.stop(worker)
    if not max(horse_mb):
        raise BenchError("no work horse was seen under the worker: its memory could not be measured")

    ours, curl = median(our_walls), median(curl_walls)
    mb = total / 1e6
    part.rows += [
        Row("wall time, median", ours, curl, "s", f"ratio <= {TARGET_RATIO}", ours / curl <= TARGET_RATIO),
        Row("throughput", mb / ours, mb / curl, "MB/s", digits=0),
        Row(
            "peak RSS, work horse (fetching)",
            max(horse_mb),
            None,
            "MB",
            f"< {TARGET_RSS_MB} MB",
            max(horse_mb) < TARGET_RSS_MB,
            digits=0,
        ),
        Row(
            "peak RSS, worker (parent)",
            worker_mb,
            None,
            "MB",
            f"< {TARGET_RSS_MB} MB",
            worker_mb < TARGET_RSS_MB,
            digits=0,
        ),
        Row("CPU time, client side, median", median(horse_cpu), median(curl_cpus), "s"),
    ]
    if verify_walls:
        part.rows.append(Row("reference: curl then `openssl dgst -sha256` per file", ours, median(verify_walls), "s"))
    part.notes += [
        f"{bench.profile.rounds} rounds alternating curl and ours (then the curl+openssl reference), after one "
        "untimed run of each; dirty pages synced, then the side's previous output deleted, before each run; "
        "medians reported",
        "each side deletes its previous output just before its own run, so each writes into pages freed a moment "
        "before: on a VM whose host takes freed guest memory back after a few seconds, the first write to such a "
        "page costs about 4 s/GiB (measured here), and a side writing into pages freed long before would pay it",
        "ours = enqueue (Producer.add_download_job) until download_tasks.finished_at of the `completed` row; "
        "a long-running `udemy-dl worker` (registered before the clock starts) hands it to its work horse (forked "
        "for the first run, then kept), which fetches, "
        "hashes (sha256 while streaming), verifies size and sha256 against the manifest, moves the folder into "
        "place and records it",
        "peak RSS = VmHWM sampled every 50 ms from /proc for the worker and its horse; CPU time of ours = the "
        "horse's user+system time during the run (sampled), of curl = all curl processes",
    ]
    if bench.origin.kind != "nginx":
        part.notes.append(
            "WARNING: served by the Python ContentOrigin, not nginx: the origin is the bottleneck, so the ratio "
            "says little about the client"
        )
    if others_mb:
        part.notes.append(f"RQ's scheduler process (a child of the worker) peaked at {others_mb:.0f} MB")
    part.raw = {
        "total_bytes": total,
        "files": bench.profile.course_files,
        "parallel": parallel,
        "warm_up_wall_s": {"curl": warm_curl, "ours": warm_ours},
        "curl_wall_s": curl_walls,
        "curl_cpu_s": curl_cpus,
        "curl_openssl_wall_s": verify_walls,
        "ours_wall_s": our_walls,
        "ours_horse_peak_rss_mb": horse_mb,
        "ours_horse_cpu_s": horse_cpu,
        "ours_worker_peak_rss_mb": worker_mb,
        "chunk_size": defaults.CHUNK_SIZE,
        "cpu_count": os.cpu_count(),
    }
    return part
