"""A tenant for fairness tests and benchmarks: a process that hands its memory over and
then faults, either as fast as it can ("heavy") or one page at a time ("light").

    python -m tests._storm_peer '{"socket": ..., "role": "heavy", "pages": 64, "bound": 10}'

Both map ``pages`` anonymous pages, register them MISSING (the heavy one with
EVENT_REMOVE, as Firecracker does, unless ``remove`` is false), and hand the
uffd over with one mapping at offset 0 of the snapshot, which must hold at
least ``pages`` pages. Each prints ``ready`` first, then connects as soon as
the socket is there (polling every millisecond), so a test can start it before
its server.

* heavy: ``threads`` threads (default 1), each on its share of the pages, read
  every page of it (one C loop, ``ua.touch``: the faults come back to back),
  discard them (MADV_DONTNEED: a Remove event, which blocks the thread until
  the server reads it; with ``remove`` false no event, the pages just fault
  again), and again, until a line arrives on stdin or ``bound`` seconds
  passed. It prints ``storming`` once each thread made a pass, and at the end
  ``stopped N`` (told to) or ``bound N`` (its own bound), N the pages read.
  The test asserts on which: a server that starves the others is seen as the
  storm outliving its bound.
* light: every ``interval`` seconds, reads the first word of its next page and
  prints ``served I NS`` (the fault's latency, from the access to its return,
  in ns), ``count`` times; each word must be the snapshot's (``snapshot``, the
  file), else it prints ``wrong I`` and exits 1. Then ``done``.

``signal.alarm(60)``: a page that never comes ends the peer, not the test run.

:func:`tenant` runs one from a test or a benchmark (``benchmarks/_fairness.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

import uffd_async as ua

P = ua.PAGE_SIZE


def main() -> None:
    config = json.loads(sys.argv[1])
    signal.alarm(60)
    pages = config["pages"]
    heavy = config["role"] == "heavy"
    removes = heavy and config.get("remove", True)
    uffd = ua.Userfaultfd.open(ua.Feature.EVENT_REMOVE if removes else ua.Feature(0))
    region = ua.Region.anonymous(pages * P)
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    print("ready", flush=True)
    while True:
        try:
            sock.connect(config["socket"])
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.001)
    ua.send_uffd(sock, uffd, [mapping])
    if heavy:
        storm(region, config["bound"], config.get("threads", 1))
    else:
        tick(region, config)


def storm(region: ua.Region, bound: float, threads: int) -> None:
    """``threads`` threads, each on its share of the pages, until stdin or ``bound``."""
    share = region.length // P // threads * P
    passes = [0] * threads
    stop = threading.Event()

    def run(index: int) -> None:
        start = index * share
        while not stop.is_set():
            ua.touch(region.address + start, share, write=False)
            region.discard(start, share)
            passes[index] += 1

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + bound
    while not all(passes) and time.monotonic() < deadline:
        time.sleep(0.001)
    print("storming", flush=True)
    told = select.select([sys.stdin], [], [], max(0.0, deadline - time.monotonic()))[0]
    stop.set()
    for worker in workers:
        worker.join()
    print(f"{'stopped' if told else 'bound'} {sum(passes) * share // P}", flush=True)


def tick(region: ua.Region, config: dict[str, object]) -> None:
    with open(str(config["snapshot"]), "rb") as f:
        snapshot = f.read()
    interval = float(config["interval"])  # type: ignore[arg-type]
    count = int(config["count"])  # type: ignore[call-overload]
    pages = region.length // P
    for index in range(count):
        page = index % pages
        started = time.perf_counter_ns()
        word = ctypes.string_at(region.address + page * P, 8)  # the fault
        took = time.perf_counter_ns() - started
        if word != snapshot[page * P : page * P + 8]:
            print(f"wrong {index}", flush=True)
            sys.exit(1)
        print(f"served {index} {took}", flush=True)
        if page == pages - 1:
            region.discard(0, region.length)  # no EVENT_REMOVE: they fault again
        time.sleep(interval)
    print("done", flush=True)


# -- driving one (the test's or the benchmark's side) -------------------------------

_ROOT = Path(__file__).resolve().parent.parent


class Tenant:
    """A running peer: its output a line at a time, every wait bounded by ``timeout``."""

    def __init__(self, process: Process, timeout: float) -> None:
        assert process.stdout is not None
        self.process = process
        self.lines: list[str] = []
        self._stream = process.stdout
        self._seen = b""
        self._timeout = timeout

    async def line(self) -> str:
        with anyio.fail_after(self._timeout):
            while b"\n" not in self._seen:
                self._seen += await self._stream.receive()
        line, self._seen = self._seen.split(b"\n", 1)
        self.lines.append(line.decode())
        return self.lines[-1]

    async def stop(self) -> tuple[str, int]:
        """Tell a heavy peer to stop: how its storm ended (``stopped`` or ``bound``),
        and the pages it read."""
        assert self.process.stdin is not None
        with contextlib.suppress(anyio.BrokenResourceError):
            await self.process.stdin.send(b"stop\n")
        while (words := (await self.line()).split())[0] not in ("stopped", "bound"):
            pass
        with anyio.fail_after(self._timeout):
            code = await self.process.wait()
        assert code == 0, self.lines
        return words[0], int(words[1])


@contextlib.asynccontextmanager
async def tenant(
    socket_path: str | os.PathLike[str],
    snapshot: str | os.PathLike[str],
    role: str,
    *,
    timeout: float,
    **config: Any,
) -> AsyncIterator[Tenant]:
    """A peer process (``role`` and ``config`` as in the module's docstring), killed on exit."""
    settings = {"socket": os.fspath(socket_path), "snapshot": os.fspath(snapshot), "role": role}
    command = [sys.executable, "-m", "tests._storm_peer", json.dumps({**settings, **config})]
    async with await anyio.open_process(
        command, cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        try:
            yield Tenant(process, timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()


if __name__ == "__main__":
    main()
