"""A peer for takeover tests and the takeover benchmark: faults at a steady pace, forks.

    python -m tests._takeover_peer '{"socket": ..., "snapshot": ..., "pages": 2048}'

It maps ``pages`` anonymous pages, registers them MISSING with EVENT_REMOVE (as
Firecracker registers), and EVENT_FORK only when it will fork (EVENT_FORK needs
CAP_SYS_PTRACE: a peer with ``fork: false`` runs as any user), hands the uffd over with
one mapping at offset 0 of ``snapshot``, reads the first ``warm`` pages (default
16), discards the first ``discard`` of them (default 8: a Remove event, read by
the server before any takeover), and prints ``ready``. Then, with ``fork``
(default true), it forks: the child reads the second half of the pages, the parent
the first (after printing ``forked``), one page every ``interval`` seconds
(default 0.0005), each checked
whole: the discarded pages must read zeros, every other page the snapshot's bytes.
Without ``fork``, it reads from page ``warm`` on, or with ``again`` from page 0 (the
discarded pages first); with ``hold``, before ``ready`` it reads the ``after`` pages
from ``warm`` on (default 1: a fault answered after its server applied the Remove, as
the kernel lets the discard return once the server has only read it), and after
``ready`` it waits for a line on stdin (its server can be killed and another started
meanwhile).
At the end the parent prints ``max_ns N faults K`` (the longest single access, in
ns, over both processes, and how many pages were read), then ``ok``, or ``wrong``
and exits 1 when a page read wrong or the child failed.

``signal.alarm(60)``: a page that never comes ends the peer, not the test run.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time

import uffd_async as ua

P = ua.PAGE_SIZE


def main() -> None:
    config = json.loads(sys.argv[1])
    signal.alarm(60)
    pages = int(config["pages"])
    warm, discard = int(config.get("warm", 16)), int(config.get("discard", 8))
    interval = float(config.get("interval", 0.0005))
    with open(config["snapshot"], "rb") as file:
        snapshot = file.read(pages * P)
    forks = bool(config.get("fork", True))
    features = ua.Feature.EVENT_REMOVE | (ua.Feature.EVENT_FORK if forks else ua.Feature(0))
    uffd = ua.Userfaultfd.open(features)
    region = ua.Region.anonymous(pages * P)
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.connect(config["socket"])
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
    ua.send_uffd(sock, uffd, [mapping])
    zeros = bytes(P)
    discarded = [0]  # pages from 0 that read zeros from now on

    def expected(page: int) -> bytes:
        return zeros if page < discarded[0] else snapshot[page * P : (page + 1) * P]

    def read(first: int, end: int, pace: float) -> tuple[int, bool]:
        longest, right = 0, True
        for page in range(first, end):
            started = time.perf_counter_ns()
            data = ctypes.string_at(region.address + page * P, P)  # the fault
            longest = max(longest, time.perf_counter_ns() - started)
            if data != expected(page):
                print(f"wrong page {page} in pid {os.getpid()}", flush=True)
                right = False
            if pace:
                time.sleep(pace)
        return longest, right

    read(0, warm, 0)
    if discard:
        region.discard(0, discard * P)  # returns once the server has read the Remove
    discarded[0] = discard
    hold = bool(config.get("hold", False))
    if hold:
        read(warm, warm + int(config.get("after", 1)), 0)
    print("ready", flush=True)
    if hold:
        sys.stdin.readline()
    half = pages // 2
    if not forks:
        first = 0 if config.get("again", False) else warm
        longest, right = read(first, pages, interval)
        finish(longest, right, pages - first)
        return
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        longest, right = read(half, pages, interval)
        os.write(writer, b"%d %d" % (longest, right))
        os._exit(0 if right else 1)
    os.close(writer)
    print("forked", flush=True)  # the server has read the fork: the child's uffd is its own
    longest, right = read(0, half, interval)
    report = b""
    while chunk := os.read(reader, 64):
        report += chunk
    _, status = os.waitpid(child, 0)
    child_longest, child_right = (int(field) for field in report.split() or (0, 0))
    right = right and bool(child_right) and os.waitstatus_to_exitcode(status) == 0
    finish(max(longest, child_longest), right, pages)


def finish(longest: int, right: bool, faults: int) -> None:
    print(f"max_ns {longest} faults {faults}", flush=True)
    if not right:
        print("wrong", flush=True)
        sys.exit(1)
    print("ok", flush=True)


if __name__ == "__main__":
    main()
