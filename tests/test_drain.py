"""Draining: no new process is accepted, those connected are served until they exit.

Real peers (``_firecracker_peer.py``: a process that hands its uffd over as
Firecracker does and reads all of its memory from plain Python) are mid-fault
when the drain starts: a gate holds every fault's answer until the drain is
under way. Each one must then finish with every byte right, while a new
``connect()`` fails at once (the socket file is gone), and ``serve()`` must
return by itself once the last one has exited. From the command line, on both
loops: SIGTERM drains and exits 0, a second SIGTERM or ``--drain-timeout``
stops at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

import uffd_async as ua
from uffd_async._handoff import _server as handoff_server

from ._processes import cli_server, read_until
from ._support import TIMEOUT, short_directory, source_bytes

P = ua.PAGE_SIZE
PAGES = 16  # of each of the peer's two regions
PEER = (Path(__file__).parent / "_firecracker_peer.py").read_text()
#: What one peer's default steps copy in: both regions, then the discarded quarter again.
PAGES_PER_PEER = 2 * PAGES + PAGES // 4


@pytest.fixture
def place() -> Iterator[Path]:
    with short_directory("ua-drain-") as path:
        (path / "guest.mem").write_bytes(source_bytes(2 * PAGES))
        yield path


def peer_config(place: Path, version: str = "1.12", **extra: Any) -> str:
    return json.dumps(
        {
            "socket": str(place / "uffd.sock"),
            "snapshot": str(place / "guest.mem"),
            "version": version,
            "page_size": P,
            "pages": PAGES,
            **extra,
        }
    )


class Gated(ua.Resolver):
    """Answers each fault from the snapshot once ``gate`` is set: till then, mid-fault.
    (It hides the snapshot resolver's handling of REMOVE: its peers do not discard.)"""

    def __init__(self, inner: ua.Resolver, gate: anyio.Event) -> None:
        self.inner, self.gate = inner, gate

    async def resolve(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await self.gate.wait()
        await self.inner.resolve(fault, uffd)


@contextlib.asynccontextmanager
async def serving(
    place: Path, gate: anyio.Event | None = None, **options: Any
) -> AsyncIterator[tuple[ua.HandoffServer, anyio.Event]]:
    """A handoff server on ``place``'s snapshot (answers held by ``gate``), and an event set
    when its ``serve()`` returned by itself."""
    with ua.Snapshot(place / "guest.mem") as snapshot:

        def factory(handoff: ua.Handoff) -> ua.Resolver:
            inner = snapshot.resolver(handoff.mappings)
            return inner if gate is None else Gated(inner, gate)

        returned = anyio.Event()

        async def serve(*, task_status: Any) -> None:
            await ua.serve_handoffs(
                str(place / "uffd.sock"), factory, task_status=task_status, **options
            )
            returned.set()

        async with anyio.create_task_group() as tg:
            server: ua.HandoffServer = await tg.start(serve)
            yield server, returned
            tg.cancel_scope.cancel()


async def start_peer(place: Path, **extra: Any) -> Process:
    return await anyio.open_process([sys.executable, "-c", PEER, peer_config(place, **extra)])


async def finished_ok(process: Process) -> None:
    """The peer read every byte right and exited 0."""
    assert process.stdout is not None
    with anyio.fail_after(TIMEOUT * 3):
        output = b""
        async for chunk in process.stdout:
            output += chunk
        assert await process.wait() == 0, output
    assert output.endswith(b"ok\n"), output


async def until(condition: Any, what: str) -> None:
    with anyio.fail_after(TIMEOUT):
        while not condition():
            await anyio.sleep(0.005)


def connect_fails_at_once(path: Path) -> None:
    """A new peer's ``connect()``: refused at once, never left waiting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)  # a connect that would wait raises BlockingIOError instead
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            sock.connect(str(path))


@pytest.mark.anyio
async def test_drain_serves_peers_mid_fault_to_the_end(
    place: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "uffd_async")
    # The drain must end when the last peer does, not at its next report.
    monkeypatch.setattr(handoff_server, "DRAIN_REPORT_INTERVAL", TIMEOUT * 100)
    gate = anyio.Event()
    async with serving(place, gate) as (server, returned):
        peers = [
            await start_peer(place, version=version, steps=["read"]) for version in ("1.7", "1.12")
        ]
        try:
            await until(lambda: server.stats.faults >= 2, "both peers mid-fault")
            assert server.stats.resolved == 0
            server.drain()
            server.drain()  # again: nothing more
            assert server.draining and server.stats.draining
            await until(lambda: not (place / "uffd.sock").exists(), "the socket file removed")
            connect_fails_at_once(place / "uffd.sock")
            assert not returned.is_set()
            gate.set()
            for peer in peers:
                await finished_ok(peer)
        finally:
            for peer in peers:
                with contextlib.suppress(ProcessLookupError):
                    peer.kill()
                await peer.aclose()
        with anyio.fail_after(TIMEOUT):
            await returned.wait()  # serve() returned by itself: drained
        stats = server.stats
        assert (stats.connections, stats.served, stats.refused, stats.failed) == (2, 2, 0, 0)
        assert (stats.active, stats.pages, stats.errors) == (0, 2 * 2 * PAGES, 0)
        assert stats.draining and server.peers == []
    assert "draining: no new process is accepted" in caplog.text
    assert "; 2 served until they exit" in caplog.text
    assert "drained: every process served has exited" in caplog.text


@pytest.mark.anyio
async def test_drain_says_who_is_still_served(
    place: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "uffd_async")
    monkeypatch.setattr(handoff_server, "DRAIN_REPORT_INTERVAL", 0.05)
    async with serving(place) as (server, returned):
        peer = await start_peer(place, steps=["wait", "read"])
        try:
            await until(lambda: server.stats.served == 1, "the handoff")
            [(pid, seconds)] = server.peers
            assert pid == peer.pid and seconds >= 0
            server.drain()
            await until(lambda: "draining: still serving 1: pid" in caplog.text, "a report")
            assert f"still serving 1: pid {peer.pid} for " in caplog.text
            assert peer.stdin is not None
            await peer.stdin.send(b"go\n")
            await finished_ok(peer)
        finally:
            with contextlib.suppress(ProcessLookupError):
                peer.kill()
            await peer.aclose()
        with anyio.fail_after(TIMEOUT):
            await returned.wait()
        assert server.stats.pages == 2 * PAGES


@pytest.mark.anyio
async def test_drain_with_nobody_served_returns_at_once(place: Path) -> None:
    async with serving(place) as (server, returned):
        server.drain()
        with anyio.fail_after(TIMEOUT):
            await returned.wait()
        assert not (place / "uffd.sock").exists()


@pytest.mark.anyio
async def test_drain_needs_a_serving_server(place: Path) -> None:
    server = ua.HandoffServer(place / "uffd.sock", place / "guest.mem")
    with pytest.raises(RuntimeError, match="while it serves"):
        server.drain()


# -- the command line, in its own process --------------------------------------------------


@contextlib.contextmanager
def waiting_peer(place: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A peer that has handed its uffd over and waits for a line before reading."""
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, peer_config(place, steps=["wait", "read", "discard", "read"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert peer.stdout is not None
        read_until(peer.stdout, b"sent")
        yield peer
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.communicate(timeout=TIMEOUT)


def rest_of(server: subprocess.Popen[bytes]) -> str:
    _, err = server.communicate(timeout=TIMEOUT * 3)
    return err.decode(errors="replace")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigterm_drains_then_exits_0(place: Path, backend: str) -> None:
    with cli_server(place, backend) as server, waiting_peer(place) as peer:
        assert server.stderr is not None
        log = read_until(server.stderr, b"connections 1 (1 active")
        server.send_signal(signal.SIGTERM)
        log += read_until(server.stderr, b"SIGTERM: stopping: draining")
        log += read_until(server.stderr, b"draining: no new process is accepted")
        assert not (place / "uffd.sock").exists()
        connect_fails_at_once(place / "uffd.sock")
        assert server.poll() is None  # still serving its peer
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write(b"go\n")
        peer.stdin.flush()
        out = read_until(peer.stdout, b"ok\n")  # every byte right, read during the drain
        assert peer.wait(timeout=TIMEOUT) == 0, out
        text = log.decode() + rest_of(server)
    assert server.returncode == 0, text
    assert "drained: every process served has exited" in text
    assert (
        f"stopped; connections 1 (0 active, 0 refused, 0 failed)  faults {PAGES_PER_PEER}" in text
    )
    assert "draining\n" in text  # the progress lines say so


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_second_signal_stops_at_once(place: Path, backend: str, second: int) -> None:
    with cli_server(place, backend) as server, waiting_peer(place):
        assert server.stderr is not None
        read_until(server.stderr, b"connections 1 (1 active")
        server.send_signal(signal.SIGTERM)
        read_until(server.stderr, b"draining: no new process is accepted")
        server.send_signal(second)
        text = rest_of(server)  # bounded: it exits without its peer exiting
        assert server.returncode == 0, text
        assert f"{signal.Signals(second).name}: stopping\n" in text
        assert "stopped; connections 1 (0 active" in text


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_drain_timeout_stops_at_once(place: Path, backend: str) -> None:
    with (
        cli_server(place, backend, "--drain-timeout", "0.2") as server,
        waiting_peer(place) as peer,
    ):
        assert server.stderr is not None
        read_until(server.stderr, b"connections 1 (1 active")
        server.send_signal(signal.SIGTERM)
        text = rest_of(server)
        assert server.returncode == 0, text
        assert f"--drain-timeout 0.2: stopping; still served, whose faults are no longer " \
               f"answered: pid {peer.pid}" in text  # fmt: skip
