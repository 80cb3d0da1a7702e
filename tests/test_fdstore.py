"""systemd's fd store: a server killed mid-stream loses no uffd, and its restart serves on.

A notify socket of the test's own plays systemd: it keeps every fd pushed with
``FDSTORE=1`` under its ``FDNAME``, drops those named by ``FDSTOREREMOVE=1``, and
starts the next server with them as systemd would (``LISTEN_FDS``, ``LISTEN_PID``,
``LISTEN_FDNAMES``, the fds from 3 up, the listening socket it made first, named
``handoff``). A real peer (``_takeover_peer.py``: it discards a few pages, forks,
and parent and child keep faulting at a steady pace, every page checked) is mid-stream
when the server is SIGKILLed: its threads wait (the store's copies keep every uffd
open, the fork child's too, whose only other holder died), never read zeros, and
finish with every byte right once the restarted server picks everything up.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._support import TIMEOUT, short_directory, source_bytes
from .conftest import needs_root

PAGES = 512
P = 4096
ROOT = Path(__file__).resolve().parent.parent


class FakeSystemd:
    """The notify socket and the fd store behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.stored: dict[str, int] = {}
        self.messages: list[list[str]] = []

    def pump(self, until: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Take notify messages in until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{what} did not happen; the store holds {sorted(self.stored)}"
            if select.select([self.sock], [], [], min(remaining, 0.05))[0]:
                self._take()

    def _take(self) -> None:
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 16))
        fds = array.array("i")
        for _, _, payload in ancillary:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        fields = data.decode().split("\n")
        self.messages.append(fields)
        name = next((f[7:] for f in fields if f.startswith("FDNAME=")), "stored")
        if "FDSTORE=1" in fields:
            assert len(fds) == 1 and name not in self.stored, fields
            self.stored[name] = fds[0]
        else:
            for fd in fds:
                os.close(fd)
        if "FDSTOREREMOVE=1" in fields and name in self.stored:
            os.close(self.stored.pop(name))

    def read_until(self, stream: Any, marker: bytes, timeout: float = TIMEOUT * 3) -> bytes:
        """``stream``'s output up to ``marker``, taking notify messages in meanwhile (a
        notify socket nobody reads fills after 10 messages, and its sender blocks)."""
        seen = b""
        deadline = time.monotonic() + timeout
        while marker not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{marker!r} did not show within {timeout}s; got {seen!r}"
            ready = select.select([stream, self.sock], [], [], remaining)[0]
            if self.sock in ready:
                self._take()
            if stream in ready:
                chunk = os.read(stream.fileno(), 65536)
                assert chunk, f"the stream ended before {marker!r} showed; got {seen!r}"
                seen += chunk
        return seen

    def take_queued(self) -> None:
        """Take every notify message already sent (a dead server's last ones too)."""
        while select.select([self.sock], [], [], 0)[0]:
            self._take()

    def names(self, prefix: str) -> list[str]:
        return [name for name in self.stored if name.startswith(prefix)]

    def close(self) -> None:
        for fd in self.stored.values():
            os.close(fd)
        self.stored.clear()
        self.sock.close()


@pytest.fixture
def place() -> Iterator[Path]:
    with short_directory("ua-fdstore-") as path:
        (path / "guest.mem").write_bytes(source_bytes(PAGES))
        yield path


@contextlib.contextmanager
def systemd(place: Path) -> Iterator[tuple[FakeSystemd, socket.socket]]:
    """The notify socket with its store, and the listening socket a .socket unit makes."""
    store = FakeSystemd(place / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(place / "uffd.sock"))
        listener.listen()
        yield store, listener
    finally:
        listener.close()
        store.close()


def start(
    place: Path, backend: str, store: FakeSystemd, passed: list[tuple[int, str]], *more: str
) -> tuple[subprocess.Popen[bytes], bytes]:
    """``serve`` as systemd starts it: ``passed`` at fds 3 and up, named; and what it
    logged up to listening."""
    targets = list(range(3, 3 + len(passed)))
    environment = {
        "NOTIFY_SOCKET": str(store.path),
        "FDSTORE": "64",
        "LISTEN_FDS": str(len(passed)),
        "LISTEN_FDNAMES": ":".join(name for _, name in passed),
    }

    def as_systemd_does() -> None:
        parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 256) for fd, _ in passed]
        for fd, target in zip(parked, targets, strict=True):
            os.dup2(fd, target)
        os.environ.update(environment, LISTEN_PID=str(os.getpid()))

    command = [sys.executable, "-m", "uffd_async", "serve", str(place / "guest.mem")]
    command += ["--interval", "0.05", "--backend", backend, *more]
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=targets,
        preexec_fn=as_systemd_does,
    )
    assert server.stderr is not None
    return server, store.read_until(server.stderr, b"listening")


@contextlib.contextmanager
def peer(place: Path, **extra: Any) -> Iterator[subprocess.Popen[bytes]]:
    config = {"socket": str(place / "uffd.sock"), "snapshot": str(place / "guest.mem")}
    command = [sys.executable, "-m", "tests._takeover_peer"]
    command.append(json.dumps({**config, "pages": PAGES, "interval": 0.004, **extra}))
    stdin = subprocess.PIPE if extra.get("hold") else None
    with subprocess.Popen(command, cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=TIMEOUT)


# The peer forks (its child's uffd goes to the store), so it asks for EVENT_FORK, which
# needs CAP_SYS_PTRACE: the kernel's refusal is in the peer's process, where the suite's
# skip-on-refusal cannot see it.
@needs_root
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_killed_server_loses_nothing_and_its_restart_serves_on(place: Path, backend: str) -> None:
    with systemd(place) as (store, listener):
        first, _ = start(place, backend, store, [(listener.fileno(), "handoff")])
        try:
            with peer(place) as process:
                assert process.stdout is not None
                store.read_until(process.stdout, b"forked")
                # every fd it needs is stored, and a state that names the fork child's uffd
                store.pump(lambda: bool(store.names("child.")), "the child's uffd stored")
                generation = max(int(n.split(".")[1]) for n in store.names("ua-state."))
                store.pump(
                    lambda: any(
                        int(n.split(".")[1]) > generation for n in store.names("ua-state.")
                    ),
                    "a state naming the child",
                    timeout=TIMEOUT,
                )
                assert store.names("uffd.") and store.names("conn.")
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=TIMEOUT)
                time.sleep(0.2)  # the peer's faults wait meanwhile, in its uffd
                assert process.poll() is None
                passed = [
                    (listener.fileno(), "handoff"),
                    *((fd, n) for n, fd in store.stored.items()),
                ]
                second, started = start(place, backend, store, passed)
                try:
                    out = store.read_until(process.stdout, b"ok\n")
                    assert process.wait(timeout=TIMEOUT) == 0, out
                    assert b"wrong" not in out
                    # the peer is gone: its fds leave the store (the state stays)
                    store.pump(
                        lambda: not store.names("uffd.") and not store.names("child."),
                        "the peer's fds removed",
                    )
                    second.send_signal(signal.SIGINT)
                    assert second.stderr is not None
                    err = store.read_until(second.stderr, b"stopped; ")
                    _, rest = second.communicate(timeout=TIMEOUT * 3)
                    err += rest
                finally:
                    if second.poll() is None:
                        second.kill()
                        second.communicate(timeout=TIMEOUT)
            assert second.returncode == 0, err
            assert b"resumed from the fd store: 1 processes served again" in started
            assert b"forks 1" in err  # the counters went on from the killed server's state
        finally:
            if first.poll() is None:
                first.kill()
            first.communicate(timeout=TIMEOUT)


@pytest.mark.parametrize("discard", [8, 0])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_remove_read_just_before_a_crash_is_in_the_stored_state(
    place: Path, backend: str, discard: int
) -> None:
    """The state is pushed as soon as an event is applied, before the faults read with it
    are answered: a server killed the moment it answered the fault that follows a discard
    leaves a state with the Remove, and the next one serves zeros there. (Without a
    discard: a new peer's fds are stored before its first fault is answered.)"""
    with systemd(place) as (store, listener):
        first, _ = start(place, backend, store, [(listener.fileno(), "handoff")])
        try:
            options = {"fork": False, "hold": True, "again": True, "interval": 0}
            with peer(place, **options, discard=discard) as process:
                assert process.stdout is not None and process.stdin is not None
                store.read_until(process.stdout, b"ready")
                first.send_signal(signal.SIGKILL)  # at once: it applied the Remove just now
                first.wait(timeout=TIMEOUT)
                store.take_queued()
                passed = [
                    (listener.fileno(), "handoff"),
                    *((fd, n) for n, fd in store.stored.items()),
                ]
                second, started = start(place, backend, store, passed)
                try:
                    assert b"resumed from the fd store: 1 processes served again" in started
                    process.stdin.write(b"go\n")
                    process.stdin.flush()
                    out = store.read_until(process.stdout, b"ok\n")  # page 0 on: zeros first
                    assert process.wait(timeout=TIMEOUT) == 0, out
                finally:
                    second.kill()
                    second.communicate(timeout=TIMEOUT)
        finally:
            if first.poll() is None:
                first.kill()
            first.communicate(timeout=TIMEOUT)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_stopped_server_leaves_its_peers_in_the_store(place: Path, backend: str) -> None:
    """Stopping (SIGINT: cancelled) ends every handoff's serving, and removes none of their
    fds from the store: the next server serves them (only a peer gone has its fds removed)."""
    with systemd(place) as (store, listener):
        server, _ = start(place, backend, store, [(listener.fileno(), "handoff")])
        try:
            with peer(place, fork=False, hold=True, interval=0) as process:
                assert process.stdout is not None and server.stderr is not None
                store.read_until(process.stdout, b"ready")
                server.send_signal(signal.SIGINT)
                err = store.read_until(server.stderr, b"stopped; ")
                _, rest = server.communicate(timeout=TIMEOUT * 3)
                assert server.returncode == 0, err + rest
                store.take_queued()
                assert store.names("uffd.") and store.names("conn.")
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=TIMEOUT)


def test_pages_recorded_reach_the_store_at_the_next_look(place: Path) -> None:
    """An event's push carries the recording as the last look saw it (that push is quick:
    the faults read with the event wait for it); the next look pushes what was recorded
    before it, though nothing changed since."""
    from uffd_async._handoff._succession import decode_state
    from uffd_async._handoff._takeover import read_state

    def recorded() -> set[int]:
        newest = max(store.names("ua-state."), key=lambda name: int(name.split(".")[1]))
        return set(decode_state(read_state(store.stored[newest])).recording or ())

    with systemd(place) as (store, listener):
        passed = [(listener.fileno(), "handoff")]
        first, _ = start(place, "asyncio", store, passed, "--record", str(place / "ws"))
        try:
            with peer(place, fork=False, hold=True, after=0, interval=0) as process:
                assert process.stdout is not None
                store.read_until(process.stdout, b"ready")  # 16 pages read, a discard, nothing
                wanted = set(range(16))
                store.pump(lambda: wanted <= recorded(), "the pages read in the stored state")
        finally:
            first.kill()
            first.communicate(timeout=TIMEOUT)


@pytest.mark.anyio
async def test_faults_a_dead_server_read_are_woken_for_the_next(place: Path) -> None:
    """A server killed between reading a fault and answering it: the kernel never sends
    that fault again, so the next server wakes everything the stored uffds cover."""
    import anyio

    import uffd_async as ua
    from uffd_async._handoff import _succession
    from uffd_async._handoff._takeover import sealed_memfd

    from .test_takeover import finished_ok

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(place / "uffd.sock"))
    listener.listen()
    config = {"socket": str(place / "uffd.sock"), "snapshot": str(place / "guest.mem")}
    command = [sys.executable, "-m", "tests._takeover_peer"]
    command.append(json.dumps({**config, "pages": 64, "fork": False, "interval": 0}))
    process = await anyio.open_process(command, cwd=ROOT)
    listener.settimeout(TIMEOUT)  # a peer that never connects fails the test, never hangs it
    try:
        with listener:
            conn, _ = await anyio.to_thread.run_sync(listener.accept)
        with conn, await ua.receive_uffd(conn) as handoff:
            with anyio.fail_after(TIMEOUT):  # the dead server's last deed: it read the fault
                while not (read := handoff.uffd.read_events(4)):
                    await anyio.sleep(0.001)
            assert isinstance(read[0], ua.PageFault)
            carried = _succession.CarriedHandoff(
                mappings=handoff.mappings, shape=handoff.shape, pid=handoff.pid,
                uid=handoff.uid, gid=handoff.gid, uffd=0, conn=1,
            )  # fmt: skip
            state = _succession.Succession(
                version=1, fds=2, handoffs=(carried,), names=("uffd.7", "conn.7")
            )
            stored = [
                (os.dup(handoff.uffd.fileno()), "uffd.7"),
                (os.dup(conn.fileno()), "conn.7"),
                (sealed_memfd(_succession.encode_state(state)), "ua-state.3"),
            ]
            server = ua.HandoffServer(place / "next.sock", place / "guest.mem", stored_fds=stored)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                assert process.stdout is not None
                await finished_ok(process)
                tg.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
