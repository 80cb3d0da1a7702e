"""Taking over from a running handoff server without a pause a process can feel.

Real peers (``_takeover_peer.py``: a process that hands its uffd over, discards a
few pages, forks, and parent and child keep faulting at a steady pace, every page
checked) are mid-stream when a successor takes over: each must finish with every
byte right (the discarded pages zeros: the successor knows of the Remove the
predecessor read), the predecessor's ``serve()`` returns by itself, and the
successor's counters and recording go on from the predecessor's. A successor
that speaks no version the running server speaks is refused in one line, and one
that dies mid-handover leaves the running server serving: its peers never notice.
From the command line, ``serve --takeover`` takes over and the old process exits 0.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
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
from uffd_async._handoff import _succession, _takeover
from uffd_async._handoff._server import HandoffServer

from ._processes import cli_server, read_until
from ._support import TIMEOUT, short_directory, source_bytes
from .conftest import needs_root

P = ua.PAGE_SIZE
PAGES = 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def place() -> Iterator[Path]:
    with short_directory("ua-takeover-") as path:
        (path / "guest.mem").write_bytes(source_bytes(PAGES))
        yield path


async def start_peer(place: Path, **extra: Any) -> Process:
    config = {
        "socket": str(place / "uffd.sock"),
        "snapshot": str(place / "guest.mem"),
        "pages": PAGES,
        **extra,
    }
    process = await anyio.open_process(
        [sys.executable, "-m", "tests._takeover_peer", json.dumps(config)], cwd=ROOT
    )
    try:
        await expect_line(process, b"ready")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
        raise
    return process


async def expect_line(process: Process, wanted: bytes) -> bytes:
    assert process.stdout is not None
    with anyio.fail_after(TIMEOUT):
        line = b""
        buffered = getattr(process, "_takeover_buffer", b"")
        while True:
            if b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if line.startswith(wanted) or line.startswith(b"wrong"):
                    break
                continue
            buffered += await process.stdout.receive()
        process._takeover_buffer = buffered  # type: ignore[attr-defined]
    assert line.startswith(wanted), line
    return line


async def finished_ok(process: Process) -> int:
    """The peer (and its fork child) read every byte right; its longest access in ns."""
    line = await expect_line(process, b"max_ns")
    await expect_line(process, b"ok")
    with anyio.fail_after(TIMEOUT):
        assert await process.wait() == 0
    return int(line.split()[1])


@contextlib.asynccontextmanager
async def running(server: HandoffServer) -> AsyncIterator[anyio.Event]:
    """``server.serve()`` in the background; the event is set when it returned by itself."""
    returned = anyio.Event()

    async def serve(*, task_status: Any) -> None:
        await server.serve(task_status=task_status)
        returned.set()

    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        yield returned
        tg.cancel_scope.cancel()


@contextlib.contextmanager
def control(place: Path) -> Iterator[socket.socket]:
    """A connection to the running server's control socket, as a successor makes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(_takeover.control_address(str(place / "uffd.sock")))
        sock.setblocking(False)
        yield sock


async def received(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds it carried (the server runs in this very loop: never block)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            await anyio.wait_readable(sock)
            try:
                data, ancillary, _, _ = sock.recvmsg(512, socket.CMSG_SPACE(4 * 253))
            except BlockingIOError:
                continue
            fds = array.array("i")
            for _, _, payload in ancillary:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            return data, list(fds)


def server(place: Path, **options: Any) -> HandoffServer:
    return HandoffServer(place / "uffd.sock", place / "guest.mem", **options)


# A forking peer asks for EVENT_FORK, which needs CAP_SYS_PTRACE, refused in the peer's own
# process (where the suite's skip-on-refusal cannot see it): root runs both peers, an
# unprivileged user the one that does not fork.
FORKING = pytest.param(True, marks=needs_root, id="forking")
SINGLE = pytest.param(False, id="single")
peer_forks = pytest.mark.parametrize("forks", [FORKING, SINGLE])


@needs_root  # the peer forks: it asks for EVENT_FORK (CAP_SYS_PTRACE), in its own process
@pytest.mark.anyio
async def test_successors_take_over_mid_stream(
    place: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "uffd_async")
    record = place / "recorded.ws"
    first = server(place, record=record)
    async with running(first) as first_returned:
        peer = await start_peer(place)
        try:
            await expect_line(peer, b"forked")  # the child's uffd is one more to hand over
            before = first.stats
            second = server(place, record=record, takeover=True)
            async with running(second) as second_returned:
                with anyio.fail_after(TIMEOUT):
                    await first_returned.wait()  # handed over: it returned by itself
                assert first.handed_over and not second.handed_over
                assert second.stats.served == 1 and second.stats.active == 1
                assert second.stats.faults >= before.faults
                late = await start_peer(place, fork=False, discard=0)  # the socket is still there
                await finished_ok(late)
                third = server(place, record=record, takeover=True)  # and on again
                async with running(third) as third_returned:
                    with anyio.fail_after(TIMEOUT):
                        await second_returned.wait()
                    await finished_ok(peer)
                    with anyio.fail_after(TIMEOUT):
                        while third.stats.active:
                            await anyio.sleep(0.01)
                    stats = third.stats
                    assert not third_returned.is_set()
                # every fault read, over the three servers: each page once, the discarded ones
                # twice (a woken fault read again after a switch counts again)
                assert stats.faults >= 2 * PAGES + 8  # both peers', the first's discarded twice
                assert stats.forks == 1
                assert stats.connections == 2 and stats.served == 2
        finally:
            with contextlib.suppress(ProcessLookupError):
                peer.kill()
            await peer.aclose()
    recorded = ua.WorkingSet.load(record)
    # the recording went on across both (a fork child's pages are not recorded, but the
    # late peer read them all)
    assert set(recorded.pages) == set(range(PAGES))
    assert recorded.pages[:16] == tuple(range(16))  # the first server's, first
    assert "handed over to pid" in caplog.text


@peer_forks
@pytest.mark.anyio
async def test_a_successor_of_another_version_is_refused_and_serving_goes_on(
    place: Path, forks: bool
) -> None:
    first = server(place)
    async with running(first) as returned:
        peer = await start_peer(place, fork=forks)
        with control(place) as forged:
            forged.send(b"UFFD_ASYNC TAKEOVER 7,9\n")
            answer = (await received(forged))[0]
        assert answer.startswith(b"NO ") and b"versions 1" in answer and b"7, 9" in answer
        with pytest.raises(ua.HandoffError, match=r"refused the takeover: .*versions 1"):
            _succession.parse_reply(answer)
        await finished_ok(peer)
        assert not returned.is_set()
        assert first.stats.forks == forks


@peer_forks
@pytest.mark.anyio
async def test_a_successor_that_dies_mid_handover_leaves_the_server_serving(
    place: Path, forks: bool
) -> None:
    first = server(place)
    async with running(first) as returned:
        peer = await start_peer(place, fork=forks)
        with control(place) as dying:
            dying.send(_succession.encode_hello())
            assert (await received(dying))[0] == b"OK 1\n"
            head, memfd = await received(dying)  # the state (a memfd), then the fds it names
            expected = int.from_bytes(head[5:9], "little")
            fds: list[int] = []
            while len(fds) < expected:
                fds += (await received(dying))[1]
            for fd in memfd + fds:  # it dies with everything, before its ACK
                os.close(fd)
        # gone before its ACK: every handoff resumes, the peer never notices
        await finished_ok(peer)
        assert not returned.is_set()
        second = await start_peer(place, fork=False)  # and it accepts again
        await finished_ok(second)


# -- the command line, in processes of their own ---------------------------------------------


@contextlib.contextmanager
def cli_peer(place: Path, forks: bool) -> Iterator[subprocess.Popen[bytes]]:
    config: dict[str, Any] = {"socket": str(place / "uffd.sock"), "pages": PAGES, "fork": forks}
    config.update(snapshot=str(place / "guest.mem"), interval=0.004)  # slow: still faulting
    # when the successor is up
    command = [sys.executable, "-m", "tests._takeover_peer", json.dumps(config)]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE) as peer:
        try:
            assert peer.stdout is not None
            read_until(peer.stdout, b"ready")
            yield peer
        finally:
            if peer.poll() is None:
                peer.kill()
            peer.communicate(timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("backend", "forks"),
    [
        pytest.param("asyncio", True, marks=needs_root, id="asyncio-forking"),
        pytest.param("trio", True, marks=needs_root, id="trio-forking"),
        pytest.param("asyncio", False, id="asyncio-single"),
    ],
)
def test_serve_takeover_takes_over_and_the_old_one_exits_0(
    place: Path, backend: str, forks: bool
) -> None:
    with cli_server(place, backend) as old, cli_peer(place, forks) as peer:
        with cli_server(place, backend, "--takeover") as new:
            _, err = old.communicate(timeout=TIMEOUT * 3)
            assert old.returncode == 0, err
            assert b"handed over to a successor; connections 1 (0 active" in err
            assert peer.stdout is not None
            out = read_until(peer.stdout, b"ok\n")
            assert peer.wait(timeout=TIMEOUT) == 0, out
            assert new.stderr is not None
            read_until(new.stderr, b"connections 1 (0 active")  # the peer's end, seen there
            new.send_signal(signal.SIGINT)
            _, err = new.communicate(timeout=TIMEOUT * 3)
        assert new.returncode == 0, err
        faults = int(err.split(b"  faults ")[1].split()[0].replace(b",", b""))
        reread = 8 if forks else 0  # the forking parent reads the discarded pages again
        assert faults >= PAGES + reread  # the predecessor's faults are counted on


def test_serve_takeover_with_nothing_running_says_so(place: Path) -> None:
    command = [sys.executable, "-m", "uffd_async", "serve", str(place / "guest.mem")]
    command += ["--socket", str(place / "uffd.sock"), "--takeover"]
    done = subprocess.run(command, capture_output=True, timeout=TIMEOUT * 3)
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines()[-1] == (
        f"cannot serve: no server runs on {place / 'uffd.sock'} to take over from "
        "(nothing listens for a successor)"
    )


class Held(ua.Resolver):
    """Answers from ``inner`` (awaiting, never inline) the first ``answered`` faults, and
    holds every later one until cancelled: read, and never answered."""

    def __init__(self, inner: ua.Resolver, answered: list[int]) -> None:
        self.inner, self.answered = inner, answered

    async def resolve(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        if self.answered[0] <= 0:
            await anyio.sleep_forever()
        self.answered[0] -= 1
        await self.inner.resolve(fault, uffd)

    def apply(self, event: Any) -> None:
        self.inner.apply(event)

    def fork(self) -> ua.Resolver:
        return Held(self.inner.fork(), self.answered)


@peer_forks
@pytest.mark.anyio
async def test_faults_read_and_not_answered_are_woken_for_the_successor(
    place: Path, forks: bool
) -> None:
    with ua.Snapshot(place / "guest.mem") as snapshot:
        answered = [24]  # warm-up (16) and the discarded 8 again: then the old one holds all

        def holding(handoff: ua.Handoff) -> ua.Resolver:
            return Held(snapshot.resolver(handoff.mappings), answered)

        def answering(handoff: ua.Handoff) -> ua.Resolver:
            return snapshot.resolver(handoff.mappings)

        first = HandoffServer(place / "uffd.sock", holding)
        async with running(first) as first_returned:
            peer = await start_peer(place, fork=forks)
            if forks:
                await expect_line(peer, b"forked")
            waiting = 2 if forks else 1  # parent and child each wait on one
            with anyio.fail_after(TIMEOUT):
                while first.stats.faults < 24 + waiting:
                    await anyio.sleep(0.005)
            second = HandoffServer(place / "uffd.sock", answering, takeover=True)
            async with running(second):
                with anyio.fail_after(TIMEOUT):
                    await first_returned.wait()
                await finished_ok(peer)  # woken, they faulted again, and the successor answered


# -- the messages, without I/O ----------------------------------------------------------------


def a_state(**changes: Any) -> _succession.Succession:
    mapping = ua.GuestMapping(
        base_host_virt_addr=0x7F0000000000, size=16 * P, offset=0, page_size=P
    )
    handoff = _succession.CarriedHandoff(
        mappings=(mapping,),
        shape=ua.MessageShape.PAGE_SIZE_KIB,
        pid=1234,
        uid=1000,
        gid=1000,
        uffd=2,
        conn=3,
        memfd=4,
        events=(
            ua.Remove(start=0x7F0000000000, end=0x7F0000002000),
            ua.Remap(from_address=0x7F0000004000, to_address=0x7F1000000000, length=P),
            ua.Unmap(start=0x7F0000008000, end=0x7F0000009000),
        ),
        children=(_succession.Carried(uffd=5, events=(ua.Remove(start=1 << 20, end=2 << 20),)),),
        prefetch=_succession.Prefetched(prefetched=7, runs=3, working_set_done=True),
    )
    fields: dict[str, Any] = {
        "version": 1,
        "fds": 6,
        "listener": 0,
        "control": 1,
        "handoffs": (handoff,),
        "totals": {"faults": 99, "connections": 2},
        "latency": (1, 2, 3),
        "latency_ns": 12345,
        "recording": (5, 6, 7, 1, 2, 9),
    }
    return _succession.Succession(**{**fields, **changes})


def test_the_state_goes_through_whole() -> None:
    state = a_state()
    assert _succession.decode_state(_succession.encode_state(state), fds=6) == state
    empty = a_state(handoffs=(), fds=2, recording=None)
    assert _succession.decode_state(_succession.encode_state(empty)) == empty


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"X" + b[1:], "magic"),
        (lambda b: b[:8] + b"\x07\x00" + b[10:], "version 7"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "CRC32"),
        (lambda b: b[:-1], "says"),
        (lambda b: b[:10], "too short"),
    ],
)
def test_a_damaged_state_is_refused(damage: Any, message: str) -> None:
    with pytest.raises(ua.HandoffError, match=message):
        _succession.decode_state(damage(_succession.encode_state(a_state())))


def _forged(document: dict[str, Any]) -> bytes:
    body = json.dumps(document).encode()
    import struct
    import zlib

    return (
        struct.pack("<8sHQ", b"UASUCC\r\n", 1, len(body))
        + body
        + struct.pack("<I", zlib.crc32(body))
    )


def _document(**changes: Any) -> dict[str, Any]:
    body = _succession.encode_state(a_state())[18:-4]
    return {**json.loads(body), **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listener": 6}, "names fd 6 of 6"),
        ({"control": 0}, "which something else is"),
        ({"fds": -1}, "fds must be an integer"),
        ({"fds": True}, "fds must be an integer"),
        ({"recording": [[1, 2, 3]]}, "recorded run"),
        ({"latency": [[1]]}, r"latency must be \[counts, sum\]"),
        ({"handoffs": [{}]}, "handoff 0 mappings must be a list"),
        ({"handoffs": "x"}, "handoffs must be a list"),
    ],
)
def test_a_bad_state_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ua.HandoffError, match=message):
        _succession.decode_state(_forged(_document(**changes)))


def test_a_bad_handoff_in_the_state_is_refused() -> None:
    handoff = _document()["handoffs"][0]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"events": [["forget", 1, 2]]}, "not an event"),
        ({"events": [["remove", 1]]}, "not an event"),
        ({"shape": "2.0"}, "handoff 0"),
        ({"mappings": [[1, 2, 3]]}, "must have 4 numbers"),
        ({"mappings": [[0, 0, 0, 4096]]}, "handoff 0"),
        ({"prefetch": {"prefetched": 0, "runs": 0, "working_set_done": 1, "populated": False}},
         "working_set_done must be true or false"),
        ({"uffd": 2, "conn": 2}, "which something else is"),
        ({"pid": 1 << 40}, "pid must be an integer"),
    ]  # fmt: skip
    for changes, message in cases:
        with pytest.raises(ua.HandoffError, match=message):
            _succession.decode_state(_forged(_document(handoffs=[{**handoff, **changes}])))
    with pytest.raises(ua.HandoffError, match="came"):
        _succession.decode_state(_succession.encode_state(a_state()), fds=5)


def test_hello_and_replies() -> None:
    assert _succession.encode_hello() == b"UFFD_ASYNC TAKEOVER 1\n"
    assert _succession.parse_hello(b"UFFD_ASYNC TAKEOVER 1,2,3\n") == (1, 2, 3)
    assert _succession.choose_version((2, 1, 3)) == 1
    assert _succession.choose_version((2, 1), spoken=(1, 2)) == 2
    assert _succession.choose_version((7,)) is None
    hello = b"UFFD_ASYNC TAKEOVER "
    bad_hellos = [b"HELLO 1\n", hello + b"1", hello + b"x\n", hello + b"123456\n"]
    for bad in [*bad_hellos, hello + b"1," * 20 + b"1\n"]:
        with pytest.raises(ua.HandoffError, match="hello"):
            _succession.parse_hello(bad)
    assert _succession.parse_reply(_succession.encode_acceptance(1)) == 1
    with pytest.raises(ua.HandoffError, match="chose version 2"):
        _succession.parse_reply(b"OK 2\n")
    with pytest.raises(ua.HandoffError, match="refused the takeover: no reason"):
        _succession.parse_reply(_succession.encode_refusal("no\nreason"))
    with pytest.raises(ua.HandoffError, match="neither OK nor NO"):
        _succession.parse_reply(b"MAYBE\n")
    assert len(_succession.encode_refusal("x" * 2000)) <= _succession.MAX_LINE


@pytest.mark.anyio
async def test_a_prefetch_goes_on_from_where_it_stopped() -> None:
    from uffd_async._restore._prefetch import PrefetchStats
    from uffd_async._restore._replay import Replay

    pages = (*range(10, 20), *range(40, 45), 3)  # runs of 10, 5, 1 (at most 8 pages a run: 4)
    working_set = ua.WorkingSet(snapshot_size=64 * P, identity=b"\0" * 32, pages=pages)
    replay = Replay(prefetch=working_set, run_bytes=8 * P)
    assert replay._rest(working_set, 0) == working_set
    assert replay._rest(working_set, 2).pages == (*range(40, 45), 3)  # 8 + 2 pages skipped
    assert replay._rest(working_set, 4).pages == ()
    stats = PrefetchStats()
    # gone through already: nothing to copy, so nothing touches the (absent) uffd and resolver
    done = PrefetchStats(working_set_done=True, runs=4)
    await replay.run(None, None, stats, resume=done)  # type: ignore[arg-type]
    assert stats == PrefetchStats()

    class Copier:
        """A prefetchable resolver that notes which runs it was asked to copy."""

        chunk_fill = None
        can_prefetch = True

        def __init__(self) -> None:
            self.copied: list[tuple[int, int]] = []

        def prefetch_pages(self, uffd: object, first: int, count: int) -> None:
            self.copied.append((first, count))

        def guide(self, runs: object, readahead: int = 0) -> None:
            pass

        def source_runs(self) -> list[tuple[int, int]]:
            return []

        def memory_parts(self) -> None:
            return None  # no native replay: every run through prefetch_pages

    class Uffd:
        _filled = 0
        closed = False

        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

    copier = Copier()
    reader, writer = os.pipe()  # never readable: no demand fault waits
    try:
        halfway = PrefetchStats(runs=2)
        await replay.run(Uffd(reader), copier, stats, resume=halfway)  # type: ignore[arg-type]
    finally:
        os.close(reader)
        os.close(writer)
    assert copier.copied == [(40, 5), (3, 1)]  # the two runs left, not the whole set again
    assert stats.working_set_done
