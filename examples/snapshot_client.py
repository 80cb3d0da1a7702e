# What this shows: a process whose memory another process fills in, page by page, the way
# Firecracker hands a restored VM's guest memory to its page-fault handler. This process
# maps empty memory for a snapshot file as two regions (two "guest memory regions"),
# registers them with a userfaultfd (MISSING faults, with EVENT_REMOVE, and EVENT_FORK when
# it may), connects to the handler's Unix socket and sends it the uffd with the mappings as
# Firecracker's JSON. Then it reads its memory from plain Python, GIL held and all (the
# handler is another process), and checks every byte against the snapshot file; forks a
# child that checks its own copy, served through the uffd the kernel gives the handler for
# it; discards a range as a balloon would (MADV_DONTNEED) and checks it now reads zeros.
# It exits 0 when every check passed.
#
# Run it against examples/snapshot_server.py or `python -m uffd_async serve`:
#   head -c 8M /dev/urandom > /tmp/snapshot.bin
#   python -m uffd_async serve /tmp/snapshot.bin --socket /tmp/uffd.sock &
#   python examples/snapshot_client.py /tmp/snapshot.bin --socket /tmp/uffd.sock
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys

import uffd_async as ua

P = ua.PAGE_SIZE
CHUNK = 1 << 20


def check(memory: ua.Region, snapshot: int, offset: int, start: int, end: int) -> bool:
    """Read [start, end) of ``memory`` from Python and compare it with the snapshot file."""
    for at in range(start, end, CHUNK):
        n = min(CHUNK, end - at)
        # ctypes.string_at holds the GIL while it faults: fine, the handler is elsewhere.
        if ctypes.string_at(memory.address + at, n) != os.pread(snapshot, n, offset + at):
            print(f"  MISMATCH in [{offset + at:#x}, {offset + at + n:#x}) of the snapshot")
            return False
    return True


def open_uffd() -> ua.Userfaultfd:
    """EVENT_REMOVE as Firecracker asks; EVENT_FORK too when allowed (CAP_SYS_PTRACE)."""
    try:
        return ua.Userfaultfd.open(ua.Feature.EVENT_REMOVE | ua.Feature.EVENT_FORK)
    except ua.UffdPermissionError:
        return ua.Userfaultfd.open(ua.Feature.EVENT_REMOVE)


def run(path: str, socket_path: str) -> bool:
    snapshot = os.open(path, os.O_RDONLY)
    size = os.fstat(snapshot).st_size // P * P
    if size < 16 * P:
        sys.exit(f"{path} is smaller than 16 pages: make a larger snapshot")
    half = size // P // 2 * P
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, snapshot)
        # Two regions, laid end to end in the snapshot file, as Firecracker's guest regions are.
        regions = [stack.enter_context(ua.Region.anonymous(n)) for n in (half, size - half)]
        offsets = [0, half]
        uffd = stack.enter_context(open_uffd())
        mappings = []
        for region, offset in zip(regions, offsets, strict=True):
            uffd.register(region.address, region.length)
            mappings.append(
                ua.GuestMapping(
                    base_host_virt_addr=region.address,
                    size=region.length,
                    offset=offset,
                    page_size=P,
                )
            )
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.connect(socket_path)
        ua.send_uffd(sock, uffd, mappings)  # served until we exit, the socket open or not
        print(f"handed over {len(regions)} regions, {size >> 10} KiB; reading them from Python")

        def check_all(start: int, end: int) -> bool:
            """The same slice of every region: ``end`` is clipped to each region's length."""
            return all(
                check(region, snapshot, offset, start, min(end, region.length))
                for region, offset in zip(regions, offsets, strict=True)
            )

        ok = check_all(0, 4 * P)
        print("the first pages of each region match the snapshot:", ok)

        if ok and uffd.features & ua.Feature.EVENT_FORK:
            pid = os.fork()  # returns once the handler has read the FORK event
            if pid == 0:  # the child: its untouched pages come through the handler too
                os._exit(0 if check_all(0, size) else 1)
            ok = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            print("a forked child read all of its memory, and it matches:", ok)

        ok = ok and check_all(4 * P, size)
        print("every byte matches the snapshot:", ok)

        if ok:
            region, offset = regions[-1], offsets[-1]
            region.discard(P, 4 * P)  # a balloon inflating: MADV_DONTNEED, a REMOVE event
            ok = ctypes.string_at(region.address + P, 4 * P) == bytes(4 * P)
            ok = ok and check(region, snapshot, offset, 0, P)
            ok = ok and check(region, snapshot, offset, 5 * P, region.length)
            print("4 discarded pages read zeros afterwards, the others the snapshot:", ok)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("snapshot", help="the snapshot file the handler serves")
    parser.add_argument("--socket", required=True, help="the handler's Unix socket")
    parser.add_argument("--timeout", type=int, default=120, help="give up after this many seconds")
    args = parser.parse_args()
    signal.alarm(args.timeout)  # a page that never comes must not hang us forever
    sys.exit(0 if run(args.snapshot, args.socket) else 1)


if __name__ == "__main__":
    main()
