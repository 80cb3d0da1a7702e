# What this shows: a page-fault handler for other processes, Firecracker's protocol. It
# listens on a Unix socket; every process that connects and sends its userfaultfd with
# Firecracker's JSON mappings (Firecracker restoring a VM, or examples/snapshot_client.py)
# gets its memory filled in lazily from a snapshot file: each page is copied from the file
# the first time the process touches it, pages it discarded (a balloon) come back as zeros,
# and its fork children are served too, until it exits (whichever Firecracker release it is,
# however it treats its socket after the handshake). One event loop (asyncio or trio) serves every
# connection; peers of another uid, malformed messages and silent peers are refused without
# disturbing the others. A progress line is printed every second; Ctrl-C or SIGTERM stops
# the server and removes the socket.
#
# Run it:
#   head -c 8M /dev/urandom > /tmp/snapshot.bin
#   python examples/snapshot_server.py /tmp/snapshot.bin --socket /tmp/uffd.sock &
#   python examples/snapshot_client.py /tmp/snapshot.bin --socket /tmp/uffd.sock
# As Firecracker's page-fault handler: give Firecracker's snapshot-load request
# `"mem_backend": {"backend_type": "Uffd", "backend_path": "/tmp/uffd.sock"}`, serve the
# snapshot's memory file, and pass --allow-uid with the uid Firecracker runs as (the
# jailer's): by default only this process's own uid may hand a uffd over. A jailed
# Firecracker also needs to be allowed to connect to the socket file: see the README's
# "A jailed Firecracker" (`--socket-mode`, `--socket-group` of `python -m uffd_async serve`).
# (`python -m uffd_async serve` is the same server, with more options.)
from __future__ import annotations

import argparse
import functools
import logging
import signal

import anyio

import uffd_async as ua


async def report(server: ua.HandoffServer) -> None:
    while True:
        await anyio.sleep(1)
        stats = server.stats
        print(
            f"connections {stats.connections} ({stats.active} active, {stats.refused} refused)"
            f"  faults {stats.faults:,}  pages copied {stats.pages:,}  forks {stats.forks}",
            flush=True,
        )


async def main(snapshot: str, path: str, allowed_uids: list[int] | None) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            # The server runs under our task group; start() returns once it is listening.
            server = await tg.start(
                functools.partial(ua.serve_handoffs, path, snapshot, allowed_uids=allowed_uids)
            )
            print(f"serving {snapshot} on {path}", flush=True)
            tg.start_soon(report, server)
            async for _ in signals:
                break
            tg.cancel_scope.cancel()  # every connection's fds are closed, the socket removed
    print(f"stopped after serving {server.stats.served} processes", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a snapshot file to uffd handoffs.")
    parser.add_argument("snapshot", help="the memory snapshot file")
    parser.add_argument("--socket", required=True, help="the Unix socket path to listen on")
    parser.add_argument(
        "--allow-uid", type=int, action="append", help="another uid peers may run as"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)  # connections, refusals, errors: "uffd_async"
    anyio.run(main, args.snapshot, args.socket, args.allow_uid, backend=args.backend)
