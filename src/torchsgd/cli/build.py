"""``torchsgd build``: compile the native CPU kernel into the cache ahead of time, with progress.

A first ``step()`` that finds no valid build compiles it then (1-3 minutes on 2 cores); this command does
it beforehand, so an image or a CI step can bake it in. Standard library and torchsgd only: it works
without the ``cli`` extra. Exit status 0 when a verified kernel is in the cache and loads, 1 otherwise
(with the compiler's error).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from torchsgd.engines import build as kernel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build is cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the whole compiler command line")


class Ticker:
    """Elapsed seconds and a spinner on one terminal line while the compiler runs (nothing off a TTY)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.stream.isatty():
            return
        self.thread = threading.Thread(target=self._tick, args=(time.perf_counter(),), daemon=True)
        self.thread.start()

    def _tick(self, start: float) -> None:
        spinner = "|/-\\"
        i = 0
        while not self.stop_event.wait(0.25 if i else 0):
            self.stream.write(f"\r  {spinner[i % 4]} {time.perf_counter() - start:4.0f} s")
            self.stream.flush()
            i += 1

    def stop(self) -> None:
        if self.thread is not None:
            self.stop_event.set()
            self.thread.join()
            self.thread = None
            self.stream.write("\r" + " " * 16 + "\r")
            self.stream.flush()


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    ticker = Ticker(out)
    built = False

    def progress(event: str, info: dict[str, Any]) -> None:
        nonlocal built
        if event == "wait":
            print(
                f"another process is compiling the kernel into {info['dir']}; waiting for it ...", file=out, flush=True
            )
        elif event == "compile":
            flags = " ".join(info["flags"])
            print(
                f"compiling {Path(info['source']).name} with {Path(info['compiler']).name} ({flags}) "
                f"into {info['dir']} ...",
                file=out,
                flush=True,
            )
            if not info["reason"].startswith(("no build in", "--force")):
                print(f"  (rebuilding: {info['reason']})", file=out, flush=True)
            ticker.start()
        elif event == "done":
            ticker.stop()
            built = True
            print(f"built in {info['seconds']:.0f} s: {info['path']}", file=out, flush=True)

    try:
        try:
            path = kernel.build(args.verbose, force=args.force, progress=progress)
        finally:
            ticker.stop()
    except RuntimeError as error:
        print(f"torchsgd build: {error}", file=sys.stderr)
        return 1
    try:
        kernel.load(path)
    except Exception as error:  # a build that does not load is a failed build
        print(f"torchsgd build: {path} was built but does not load: {error}", file=sys.stderr)
        return 1
    if not built:
        manifest = kernel.read_manifest(path.parent) or {}
        print(
            f"up to date: {path} (built by {manifest.get('compiler_version', '?')} in "
            f"{manifest.get('seconds', '?')} s; --force rebuilds)",
            file=out,
        )
    return 0
