"""Serve a folder as a course, to try the service on your own files without writing code:

    python -m dev.origin FOLDER [--slug NAME] [--host 127.0.0.1] [--port 8000] [--token TOKEN]

Every regular file under FOLDER (hidden files and symlinks left out) is listed in a manifest at
/courses/<slug>, with its size and sha256 computed from the file; the files are served with the
Range requests a resumed download makes. It prints the course URL and the ALLOWED_HOSTS entry to
set; confirm a task with that URL and watch a worker fetch it. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from pathlib import Path

from dev.devservers import ContentOrigin


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dev.origin", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder whose files make the course")
    parser.add_argument("--slug", help="the course's name in its URL (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks one)")
    parser.add_argument("--token", help="answer 401 unless requests carry `Authorization: Bearer TOKEN`")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, ready: threading.Event | None = None) -> int:
    args = parse_args(argv)
    folder: Path = args.folder
    if not folder.is_dir():
        print(f"dev.origin: {str(folder)!r} is not a folder", file=sys.stderr)
        return 2
    slug = args.slug or re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name).strip("-") or "course"
    try:
        origin = ContentOrigin(folder, token=args.token, port=args.port, host=args.host)
    except OSError as exc:
        print(f"dev.origin: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    url = origin.add_folder(slug, folder)
    count = len(origin.manifests[f"/courses/{slug}"]["files"])
    print(f"serving {count} file(s) of {str(folder)!r} as the course {url}", flush=True)
    print(f"set ALLOWED_HOSTS={origin.host_port}" + (" and CONTENT_TOKEN to the token" if args.token else ""))
    print("Ctrl-C stops it.", flush=True)
    origin.start()
    if ready is not None:
        ready.set()
    try:
        origin.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        origin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
