"""Serving handed-over uffds: real processes map memory, hand it over, and check every byte.

The peers are separate Python processes (a script below) that read their memory
from plain Python, GIL held, and compare it with a model of what it must hold;
fork children (os.fork in the peer: the handler is in another process) check
their own copies. Hostile peers are real sockets sending real fds: each one is
refused, its fds closed (the autouse leak guard checks), and a good peer is
served afterwards by the same server.
"""

from __future__ import annotations

import array
import contextlib
import functools
import inspect
import json
import logging
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from anyio.abc import ByteReceiveStream

import uffd_async as ua
from uffd_async._core._memory import huge_page_size
from uffd_async._serve import _server
from uffd_async._serve._server import _Server

from ._support import TIMEOUT, Lab, finished, source_bytes, with_huge_pages
from .conftest import needs_root

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

P = ua.PAGE_SIZE
PAGES = 64
SNAPSHOT = source_bytes(PAGES)  # page n reads "page 0000000n page ..."
U64 = 1 << 64

#: A peer: maps ``memory`` pages in one region, registers all of it, declares
#: ``mappings`` ([first page in memory, pages, first page in the snapshot]), hands
#: its uffd over and runs ``steps`` against a model of what its memory must hold.
PEER = textwrap.dedent(
    """
    import ctypes, json, os, signal, socket, sys, time
    import uffd_async as ua

    config = json.loads(sys.argv[1])
    P = config["page_size"]  # hugetlbfs memory when larger than the base page
    signal.alarm(60)  # a page that never comes ends this process, not the test run
    with open(config["snapshot"], "rb") as f:
        snapshot = f.read()
    steps = config["steps"]
    text = json.dumps(steps)
    features = ua.Feature.EVENT_REMOVE
    if '"fork"' in text or '"orphan"' in text:
        features |= ua.Feature.EVENT_FORK
    if '"remap"' in text:
        features |= ua.Feature.EVENT_REMAP
    uffd = ua.Userfaultfd.open(features)
    if P == ua.PAGE_SIZE:
        region = ua.Region.anonymous(config["memory"] * P)
    else:
        region = ua.Region.hugetlb(config["memory"] * P)
    uffd.register(region.address, region.length)
    model = bytearray(region.length)  # what the memory must read as
    mappings = []
    for page, pages, snap in config["mappings"]:
        model[page * P : (page + pages) * P] = snapshot[snap * P : (snap + pages) * P]
        mappings.append(ua.GuestMapping(base_host_virt_addr=region.address + page * P,
                                        size=pages * P, offset=snap * P, page_size=P))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(config["socket"])
    ua.send_uffd(sock, uffd, mappings)

    def fail(message):
        print(f"pid {os.getpid()}: {message}", flush=True)
        os._exit(1)

    def run(steps):
        for step in steps:
            kind, args = step[0], step[1:]
            if kind == "read":  # from Python, GIL held: the handler is another process
                page, pages = args
                got = ctypes.string_at(region.address + page * P, pages * P)
                want = bytes(model[page * P : (page + pages) * P])
                if got != want:
                    bad = next(i for i in range(pages) if got[i*P:(i+1)*P] != want[i*P:(i+1)*P])
                    fail(f"page {page + bad} holds {got[bad*P:bad*P+24]!r}, "
                         f"not {want[bad*P:bad*P+24]!r}")
            elif kind == "discard":
                page, pages = args
                region.discard(page * P, pages * P)
                model[page * P : (page + pages) * P] = bytes(pages * P)
            elif kind == "remap":
                region.move()
            elif kind == "fork":
                pid = os.fork()
                if pid == 0:
                    run(args[0])
                    os._exit(0)
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                if code != 0:
                    fail(f"the fork child exited with {code}")
            elif kind == "slowly":  # a page at a time, each a fault the handler reads alone
                for page in range(args[0], args[0] + args[1]):
                    time.sleep(0.002)
                    run([["read", page, 1]])
            elif kind == "orphan":  # the parent exits at once; the child outlives it
                parent = os.getpid()
                if os.fork():
                    os._exit(0)
                sock.close()  # as Firecracker before 1.12 does: the hangup says nothing
                while os.getppid() == parent:
                    time.sleep(0.002)
                if sys.stdin.readline() != "go\\n":  # the test says when
                    fail("stdin ended")
                run(args[0])
                print("ok", flush=True)
                os._exit(0)
            elif kind == "touch":  # a page no mapping declares: poisoned, SIGBUS
                ctypes.string_at(region.address + args[0] * P, 1)
                fail("read an undeclared page")
    run(steps)
    print("ok", flush=True)
    """
)

#: Two mappings over one contiguous region, their snapshot offsets in reverse order.
SPLIT = [[0, 24, 40], [24, 40, 0]]
READ_ALL = ["read", 0, PAGES]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path holds at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="ua-") as name:
        yield Path(name)


@pytest.fixture
def snapshot_path(short_dir: Path) -> str:
    path = short_dir / "snapshot.bin"
    path.write_bytes(SNAPSHOT)
    return str(path)


@pytest.fixture
def socket_path(short_dir: Path) -> str:
    return str(short_dir / "uffd.sock")


@contextlib.asynccontextmanager
async def running(path: str, source: Any, **options: Any) -> AsyncIterator[ua.HandoffServer]:
    async with anyio.create_task_group() as tg:
        server = await tg.start(functools.partial(ua.serve_handoffs, path, source, **options))
        yield server
        tg.cancel_scope.cancel()


def peer_argv(
    socket_path: str,
    snapshot_path: str,
    steps: list[Any],
    *,
    mappings: list[list[int]] = SPLIT,
    memory: int = PAGES,
    page_size: int = P,
) -> list[str]:
    """The command line of a peer process (see ``PEER``)."""
    config = {
        "socket": socket_path,
        "snapshot": snapshot_path,
        "memory": memory,
        "page_size": page_size,
        "mappings": mappings,
        "steps": steps,
    }
    return [sys.executable, "-c", PEER, json.dumps(config)]


async def peer(
    socket_path: str, snapshot_path: str, steps: list[Any], **options: Any
) -> subprocess.CompletedProcess[bytes]:
    """Run a peer process to the end (bounded); its output is in ``.stdout``."""
    with anyio.fail_after(TIMEOUT * 3):
        return await anyio.run_process(
            peer_argv(socket_path, snapshot_path, steps, **options),
            check=False,
            stderr=subprocess.STDOUT,
        )


async def received(stream: ByteReceiveStream | None) -> bytes:
    """Everything a child process writes to ``stream`` until every writer closed it (bounded)."""
    assert stream is not None
    data = b""
    with anyio.fail_after(TIMEOUT * 3):
        async for chunk in stream:
            data += chunk
    return data


async def served(socket_path: str, snapshot_path: str, steps: list[Any] | None = None) -> None:
    """A good peer, run to the end: it must find every byte it reads right."""
    result = await peer(socket_path, snapshot_path, steps or [READ_ALL])
    assert result.returncode == 0, result.stdout.decode()
    assert result.stdout.endswith(b"ok\n")


async def until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(TIMEOUT):
        while not predicate():
            await anyio.sleep(0.005)


# -- serving real processes -------------------------------------------------------


async def test_every_byte_of_every_mapping_is_served(socket_path: str, snapshot_path: str) -> None:
    async with running(socket_path, snapshot_path) as server:
        await served(socket_path, snapshot_path, [["read", 30, 10], READ_ALL])
        await until(lambda: server.stats.active == 0)  # it hung up by exiting
    stats = server.stats
    assert (stats.connections, stats.served, stats.refused, stats.failed) == (1, 1, 0, 0)
    assert stats.resolved == PAGES and stats.errors == 0
    assert not os.path.exists(socket_path)


async def test_several_processes_at_once(socket_path: str, snapshot_path: str) -> None:
    async with running(socket_path, snapshot_path, readahead=3) as server:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(served, socket_path, snapshot_path)
    assert server.stats.served == 4 and server.stats.failed == 0


async def test_removed_pages_read_zeros_across_mappings(
    socket_path: str, snapshot_path: str
) -> None:
    """One MADV_DONTNEED spans both mappings: each one's bookkeeping gets its part."""
    steps = [READ_ALL, ["discard", 20, 8], READ_ALL, ["discard", 50, 2], READ_ALL]
    async with running(socket_path, snapshot_path) as server:
        await served(socket_path, snapshot_path, steps)
    assert server.stats.events == 2


async def test_remapped_memory_is_served_at_its_new_address(
    socket_path: str, snapshot_path: str
) -> None:
    steps = [["read", 0, 8], ["discard", 2, 2], ["remap"], READ_ALL]
    async with running(socket_path, snapshot_path):
        await served(socket_path, snapshot_path, steps)


@needs_root
async def test_fork_children_are_served_with_their_own_state(
    socket_path: str, snapshot_path: str
) -> None:
    """The grandchild discards pages the parent never touched: the parent still gets the
    snapshot's bytes there (each process has its own copy of the bookkeeping)."""
    grandchild = [["read", 0, 4], ["discard", 2, 12], READ_ALL, ["discard", 40, 4], READ_ALL]
    steps = [["read", 0, 8], ["fork", grandchild], READ_ALL]
    async with running(socket_path, snapshot_path) as server:
        await served(socket_path, snapshot_path, steps)
        await until(lambda: server.stats.active == 0)
    assert server.stats.forks == 1
    # The stats sum every process: the parent's 64 pages, and the child's 62 + 4 after
    # its discards (pages 0 to 7 it had from the parent at the fork).
    assert (server.stats.faults, server.stats.resolved, server.stats.pages) == (130, 130, 130)


@needs_root
async def test_a_fork_child_forks_again(socket_path: str, snapshot_path: str) -> None:
    steps = [["read", 0, 2], ["fork", [["read", 2, 2], ["fork", [READ_ALL]], READ_ALL]]]
    async with running(socket_path, snapshot_path) as server:
        await served(socket_path, snapshot_path, steps)
    assert server.stats.forks == 2  # the child's and the grandchild's
    # 2 pages before the fork, 2 in the child, then 60 in the grandchild and 60 in the child.
    assert server.stats.resolved == server.stats.pages == 124


@needs_root
async def test_a_fork_child_that_outlives_its_parent_is_served_until_it_exits(
    socket_path: str, snapshot_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The parent forks and exits, the child has closed the socket: the pidfd and the
    hangup both say the peer is gone, yet the child is served (its uffd kept open: closed,
    its missing pages would read as zeros) until its memory says it exited too."""
    caplog.set_level(logging.INFO, logger="uffd_async")
    steps = [["read", 0, 4], ["orphan", [READ_ALL]]]
    async with running(socket_path, snapshot_path) as server:
        command = peer_argv(socket_path, snapshot_path, steps)
        async with await anyio.open_process(command, stderr=subprocess.STDOUT) as process:
            with anyio.fail_after(TIMEOUT):
                assert await process.wait() == 0  # the parent, gone at once
            await until(lambda: f"pid {process.pid}: " in caplog.text)  # the server saw it
            assert f"pid {process.pid}: gone; its fork children are served" in caplog.text
            assert server.stats.active == 1
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
            assert await received(process.stdout) == b"ok\n"  # every byte right
        await until(lambda: server.stats.active == 0)  # its exit ended the handoff
    stats = server.stats
    assert (stats.forks, stats.failed, stats.errors) == (1, 0, 0)
    assert stats.resolved == PAGES  # 4 by the parent, the 60 others by the child


def thread_reads() -> int:
    """read(2) calls made so far by the calling thread (``syscr``, task I/O accounting)."""
    with open("/proc/thread-self/io") as io:
        for line in io:
            if line.startswith("syscr:"):
                return int(line.split()[1])
    raise AssertionError("no syscr in /proc/thread-self/io")


async def accepted(listener: socket.socket) -> socket.socket:
    with anyio.fail_after(TIMEOUT):
        while True:
            await anyio.wait_readable(listener)
            try:
                return listener.accept()[0]
            except BlockingIOError:
                continue


@needs_root
async def test_a_fork_child_is_served_with_the_servers_options(
    socket_path: str, snapshot_path: str
) -> None:
    """``spin=0`` (no busy reading) reaches the fork child's server: each of the child's
    faults, a few ms apart, costs the event loop's thread about one read(2), where a
    50 us spin makes dozens of them."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(socket_path)
        listener.listen()
        listener.setblocking(False)
        command = peer_argv(socket_path, snapshot_path, [["fork", [["slowly", 0, PAGES]]]])
        async with await anyio.open_process(command, stderr=subprocess.STDOUT) as process:
            conn = await accepted(listener)
            with conn, await ua.receive_uffd(conn) as handoff:
                with ua.Snapshot(snapshot_path) as snapshot:
                    resolver = snapshot.resolver(handoff.mappings)
                    before = thread_reads()
                    async with ua.FaultServer(handoff.uffd, resolver, spin=0) as server:
                        output = await received(process.stdout)
                        reads = thread_reads() - before
    assert output == b"ok\n"
    [child] = server.stats.children
    assert (server.stats.forks, child.resolved) == (1, PAGES)
    assert reads < 3 * PAGES, f"{reads} reads for {PAGES} faults: the child's server spins"


@pytest.fixture
def made_servers(monkeypatch: pytest.MonkeyPatch) -> list[_Server]:
    """Every fault server made from now on (fork children's included), in order."""
    made: list[_Server] = []

    class Recorded(_Server):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(_server, "_Server", Recorded)
    return made


#: A value other than the default for every serving option there is.
NOT_DEFAULT = ua.ServeOptions(
    limit=3, batch=7, on_error=ua.OnError(page="zero", propagate=False), page_size=P, spin=0.001
)


def test_not_default_sets_every_serving_option() -> None:
    made_with = {name for name in inspect.signature(_Server.__init__).parameters}
    assert made_with == {"self", "uffd", "resolver", "options"}  # nothing beside the object
    for field in attrs.fields(ua.ServeOptions):
        assert getattr(NOT_DEFAULT, field.name) != field.default, field.name


@needs_root
async def test_every_serving_option_reaches_a_fork_childs_server(
    socket_path: str, snapshot_path: str, made_servers: list[_Server]
) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(socket_path)
        listener.listen()
        listener.setblocking(False)
        command = peer_argv(socket_path, snapshot_path, [["fork", [READ_ALL]]])
        async with await anyio.open_process(command, stderr=subprocess.STDOUT) as process:
            conn = await accepted(listener)
            with conn, await ua.receive_uffd(conn) as handoff:
                with ua.Snapshot(snapshot_path) as snapshot:
                    resolver = snapshot.resolver(handoff.mappings)
                    async with ua.FaultServer(
                        handoff.uffd, resolver, options=NOT_DEFAULT
                    ) as server:
                        output = await received(process.stdout)
    assert output == b"ok\n"
    assert (server.stats.forks, server.stats.children[0].resolved) == (1, PAGES)
    parent, child = made_servers
    assert parent.options is NOT_DEFAULT and child.options is NOT_DEFAULT
    assert (child.page_size, child.on_error) == (P, NOT_DEFAULT.on_error)


@needs_root
async def test_every_option_reaches_a_handoff_peers_server(
    socket_path: str, snapshot_path: str, made_servers: list[_Server]
) -> None:
    """The serving options reach each peer's server and its fork child's (with the
    mappings' page size), the peer policy the handshake, the replay options the resolver."""
    serving = attrs.evolve(NOT_DEFAULT, page_size=None)  # a handoff's is its mappings'
    policy = ua.PeerPolicy(
        allowed_uids={4242}, socket_mode=0o600, socket_group=os.getegid(), timeout=3.0,
        max_message=4096, max_regions=2,
    )  # fmt: skip
    replay = ua.ReplayOptions(readahead=3)
    options = {"serving": serving, "policy": policy, "replay": replay}
    async with running(socket_path, snapshot_path, **options) as server:
        status = os.stat(socket_path)
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o600, os.getegid())
        assert server.allowed_uids == {os.geteuid(), 4242}
        await served(socket_path, snapshot_path, [["fork", [READ_ALL]], READ_ALL])
        await until(lambda: server.stats.active == 0)
        three = [[0, 1, 0], [1, 1, 1], [2, 1, 2]]  # one mapping more than max_regions
        await peer(socket_path, snapshot_path, [], mappings=three, memory=3)
        await until(lambda: server.stats.refused == 1)
    stats = server.stats
    assert (stats.served, stats.refused, stats.forks) == (1, 1, 1)
    assert stats.faults < stats.pages  # readahead=3: a fault brings up to 4 pages
    parent, child = made_servers
    assert parent.options == attrs.evolve(NOT_DEFAULT, page_size=P)
    assert child.options is parent.options


async def test_an_undeclared_page_is_poisoned_and_serving_goes_on(
    socket_path: str, snapshot_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer registered a page it did not declare: no source, so SIGBUS, never zeros."""
    async with running(socket_path, snapshot_path) as server:
        result = await peer(
            socket_path,
            snapshot_path,
            [["read", 0, 8], ["touch", 9]],
            mappings=[[0, 8, 0]],
            memory=10,
        )
        assert result.returncode == -signal.SIGBUS, result.stdout.decode()
        await served(socket_path, snapshot_path)
    assert server.stats.errors == 1 and server.stats.failed == 0
    assert "no mapping holds the page" in caplog.text


async def test_a_peer_served_in_this_process(
    lab: Lab, socket_path: str, snapshot_path: str
) -> None:
    """A handoff from a thread of ours, with the memfd as Firecracker's forks send it, and
    bytes and fds after it, which are dropped. Its hangup does not end the serving: the
    process lives on (only stopping the server does)."""
    region = lab.anonymous(8)
    memfd = os.memfd_create("guest-memory", os.MFD_CLOEXEC)
    os.ftruncate(memfd, PAGES * P)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=16 * P, page_size=P
    )
    async with running(socket_path, snapshot_path) as server:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path)
            ua.send_uffd(sock, uffd, [mapping], memfd=memfd)
            os.close(memfd)
            await until(lambda: server.stats.active == 1)
            r, w = os.pipe()
            try:
                fds = array.array("i", [r, w])
                sock.sendmsg([b"more bytes"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            finally:
                os.close(r)
                os.close(w)
            await finished(lab.touch(region.address, region.length // 2, write=False))
        await anyio.sleep(0.1)  # the hangup has arrived by now, and changes nothing
        assert server.stats.active == 1
        await finished(lab.touch(region.address, region.length, write=False))
    assert region.read(0, region.length) == SNAPSHOT[16 * P : 24 * P]
    assert server.stats.resolved == server.stats.pages == 8
    assert server.stats.active == 0


def registered(lab: Lab, pages: int) -> tuple[ua.Region, ua.Userfaultfd, ua.GuestMapping]:
    """Memory of this process, registered with a uffd, and its mapping for a handoff (its
    bytes from the snapshot's start)."""
    region = lab.anonymous(pages)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
    )
    return region, uffd, mapping


# -- hostile peers ----------------------------------------------------------------------


def mapping_json(**fields: int) -> dict[str, int]:
    item = {"base_host_virt_addr": 0x7F00_0000_0000, "size": 4 * P, "offset": 0, "page_size": P}
    item.update(fields)
    return item


def json_message(*items: dict[str, int]) -> bytes:
    return json.dumps(list(items)).encode()


def send_message(payload: bytes) -> Callable[[socket.socket, Lab], None]:
    def send(sock: socket.socket, lab: Lab) -> None:
        ua.send_uffd(sock, lab.uffd(), payload)

    return send


def send_no_fd(sock: socket.socket, lab: Lab) -> None:
    sock.send(json_message(mapping_json()))


def send_three_fds(sock: socket.socket, lab: Lab) -> None:
    region = lab.shared(4)
    assert region.memfd is not None
    fds = array.array("i", [lab.uffd().fileno(), region.memfd, lab.uffd().fileno()])
    sock.sendmsg([json_message(mapping_json())], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def send_a_pipe(sock: socket.socket, lab: Lab) -> None:
    r, w = os.pipe()
    try:
        ua.send_uffd(sock, r, json_message(mapping_json()))
    finally:
        os.close(r)
        os.close(w)


HOSTILE: dict[str, tuple[Callable[[socket.socket, Lab], None], str]] = {
    "garbage JSON": (send_message(b"[{]}"), "not UTF-8 JSON"),
    "not JSON at all": (send_message(b"\xff\xfe\x00GET / HTTP/1.1"), "not UTF-8 JSON"),
    "overlapping regions": (
        send_message(
            json_message(mapping_json(), mapping_json(base_host_virt_addr=0x7F00_0000_1000))
        ),
        "overlaps mapping 0",
    ),
    "overflowing region": (
        send_message(json_message(mapping_json(base_host_virt_addr=U64 - P))),
        "overflows 64 bits",
    ),
    "past the snapshot": (
        send_message(json_message(mapping_json(offset=(PAGES - 2) * P))),
        "ends past the 0x40000-byte backing memory",
    ),
    "no fd": (send_no_fd, "carried no fd"),
    "three fds": (send_three_fds, "more than two fds"),
    "not a uffd": (send_a_pipe, "the first fd must be a userfaultfd"),
}


@pytest.mark.parametrize(("send", "reason"), HOSTILE.values(), ids=HOSTILE)
async def test_hostile_peers_are_refused_and_the_next_is_served(
    lab: Lab,
    socket_path: str,
    snapshot_path: str,
    caplog: pytest.LogCaptureFixture,
    send: Callable[[socket.socket, Lab], None],
    reason: str,
) -> None:
    async with running(socket_path, snapshot_path) as server:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path)
            send(sock, lab)
            with anyio.fail_after(TIMEOUT):
                await anyio.wait_readable(sock)
            assert sock.recv(1) == b""  # the server hung up on us
        await until(lambda: server.stats.refused == 1)
        await served(socket_path, snapshot_path)
    assert (server.stats.connections, server.stats.served, server.stats.failed) == (2, 1, 0)
    [refusal] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert refusal.name == "uffd_async" and reason in refusal.getMessage()


async def test_a_silent_peer_times_out_without_holding_up_the_others(
    socket_path: str, snapshot_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(socket_path, snapshot_path, timeout=TIMEOUT) as server:
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(socket_path)
            await until(lambda: server.stats.connections == 1)
            await served(socket_path, snapshot_path)  # while the silent one waits
            assert server.stats.refused == 0
        await until(lambda: server.stats.refused == 1)  # it hung up: refused at once
    async with running(socket_path, snapshot_path, timeout=0.2) as server:
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(socket_path)
            await until(lambda: server.stats.refused == 1)
            assert silent.recv(1) == b""
    assert "sent no uffd within 0.2 seconds" in caplog.text


async def test_a_peer_that_dies_mid_handshake(socket_path: str, snapshot_path: str) -> None:
    code = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    async with running(socket_path, snapshot_path) as server:
        with anyio.fail_after(TIMEOUT):
            await anyio.run_process([sys.executable, "-I", "-c", code, socket_path])
        await until(lambda: server.stats.refused == 1)
        await served(socket_path, snapshot_path)
    assert server.stats.served == 1


SYSTEM_PYTHON = "/usr/bin/python3"


@needs_root
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system python3")
async def test_a_peer_of_another_uid_is_refused(
    snapshot_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real process running as nobody (65534), on an abstract socket it can reach."""
    name = f"\0uffd-async-test-{uuid.uuid4().hex}"
    code = textwrap.dedent(
        """
        import array, socket, sys
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect("\\0" + sys.argv[1])
            fds = array.array("i", [0])
            try:  # the handler hangs up without reading: maybe before we even send
                sock.sendmsg([b"[]"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                assert sock.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass
        """
    )
    async with running(name, snapshot_path) as server:
        with anyio.fail_after(TIMEOUT):
            result = await anyio.run_process(
                [SYSTEM_PYTHON, "-I", "-S", "-c", code, name[1:]],  # argv holds no NUL
                check=False,
                user=65534,
                group=65534,
                extra_groups=[],
                cwd="/",
            )
        assert result.returncode == 0, result.stderr.decode()
        await until(lambda: server.stats.refused == 1)
        await served(name, snapshot_path)
    assert "runs as uid 65534, not one of [0]" in caplog.text


# -- the server itself ---------------------------------------------------------------------


async def test_a_factory_chooses_each_resolver_or_refuses(
    lab: Lab, socket_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    handoffs: list[ua.Handoff] = []

    def factory(handoff: ua.Handoff) -> ua.Resolver:
        handoffs.append(handoff)
        if len(handoffs) == 1:
            raise ua.HandoffError("not today")
        if len(handoffs) == 2:
            raise KeyError("a bug in the factory")
        return ua.zero_fill()

    region, uffd, region_mapping = registered(lab, 4)
    async with running(socket_path, factory) as server:
        for attempt in range(3):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(socket_path)
                ua.send_uffd(sock, uffd, [region_mapping])
                if attempt < 2:
                    with anyio.fail_after(TIMEOUT):
                        await anyio.wait_readable(sock)
                    assert sock.recv(1) == b""
                else:
                    await finished(lab.touch(region.address, region.length))
    assert region.read(0, region.length) == bytes(region.length)
    stats = server.stats
    assert (stats.refused, stats.failed, stats.served, stats.resolved) == (1, 1, 1, 4)
    assert "not today" in caplog.text and "a bug in the factory" in caplog.text
    assert all(handoff.uffd.closed for handoff in handoffs)


async def test_a_stale_socket_file_is_replaced_and_removed(
    socket_path: str, snapshot_path: str
) -> None:
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(socket_path)  # a server that died left this behind
    async with running(socket_path, snapshot_path):
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
        await served(socket_path, snapshot_path)
    assert not os.path.exists(socket_path)


async def refused_to_start(path: str | Path, source: Any, **options: Any) -> BaseException:
    """The error ``serve_handoffs`` must raise before it listens. Should it listen instead
    (it took ``path`` over), the test fails at once rather than wait on a server that
    serves until cancelled."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(ua.serve_handoffs, path, source, **options))
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        [error] = group.exceptions
        return error
    raise AssertionError(f"serve_handoffs listened on {path}: it should have refused to")


async def test_a_live_socket_or_another_file_is_left_alone(
    short_dir: Path, socket_path: str, snapshot_path: str
) -> None:
    async with running(socket_path, snapshot_path) as server:
        with pytest.raises(FileExistsError, match="another server is listening on"):
            raise await refused_to_start(socket_path, snapshot_path)
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
        await served(socket_path, snapshot_path)  # the first server still has it
        assert server.stats.served == 1
    regular = short_dir / "regular"
    regular.write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not a socket"):
        raise await refused_to_start(regular, snapshot_path)
    assert regular.read_text() == "precious"


async def test_a_socket_file_replaced_meanwhile_is_not_removed(
    short_dir: Path, socket_path: str, snapshot_path: str
) -> None:
    async with running(socket_path, snapshot_path):
        os.unlink(socket_path)
        Path(socket_path).write_text("someone else's")
    assert Path(socket_path).read_text() == "someone else's"


async def test_running_out_of_fds_for_a_moment_is_not_the_end(
    lab: Lab, socket_path: str, snapshot_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() fails with EMFILE while no fd is free: logged, retried; once fds are
    free again the waiting peer is accepted and served."""
    region, uffd, mapping = registered(lab, 4)
    async with running(socket_path, snapshot_path) as server:
        with socket.socket(socket.AF_UNIX) as sock:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.dup(0)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new fd now
            try:
                sock.connect(socket_path)
                await until(lambda: "retrying shortly" in caplog.text)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            ua.send_uffd(sock, uffd, [mapping])
            await finished(lab.touch(region.address, region.length, write=False))
    assert region.read(0, region.length) == SNAPSHOT[: 4 * P]
    assert (server.stats.connections, server.stats.served, server.stats.failed) == (1, 1, 0)
    assert "accepting a connection failed ([Errno 24] Too many open files)" in caplog.text


async def test_stopping_closes_every_connection(
    lab: Lab, socket_path: str, snapshot_path: str
) -> None:
    """Cancelled while a peer is connected and another is mid-handshake: every fd closed."""
    _, uffd, mapping = registered(lab, 4)
    with socket.socket(socket.AF_UNIX) as connected, socket.socket(socket.AF_UNIX) as silent:
        async with running(socket_path, snapshot_path) as server:
            connected.connect(socket_path)
            ua.send_uffd(connected, uffd, [mapping])
            silent.connect(socket_path)
            await until(lambda: server.stats.active == 1 and server.stats.connections == 2)
        assert connected.recv(1) == b"" and silent.recv(1) == b""
    assert not os.path.exists(socket_path)


async def test_bad_arguments(socket_path: str, snapshot_path: str) -> None:
    with pytest.raises(ValueError, match="readahead"):
        ua.HandoffServer(socket_path, snapshot_path, readahead=-1)
    with pytest.raises(ValueError, match="readahead applies to snapshot sources"):
        ua.HandoffServer(socket_path, lambda handoff: ua.zero_fill(), readahead=2)
    with pytest.raises(ValueError, match="timeout"):
        ua.HandoffServer(socket_path, snapshot_path, timeout=0)
    with pytest.raises(TypeError, match="on_error"):
        ua.HandoffServer(socket_path, snapshot_path, on_error="zero")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        raise await refused_to_start(socket_path, snapshot_path + ".missing")
    assert not os.path.exists(socket_path)


# -- hugetlbfs mappings ----------------------------------------------------------------------


#: Made free for the test as root (the ``huge_pages`` fixture); skips elsewhere.
needs_huge_pages = with_huge_pages(6)


@needs_huge_pages
async def test_huge_page_mappings_are_served_a_huge_page_at_a_time(
    lab: Lab, short_dir: Path
) -> None:
    huge = huge_page_size()
    contents = os.urandom(2 * huge)
    path = short_dir / "huge.bin"
    path.write_bytes(bytes(huge) + contents)  # the mapping's bytes start one huge page in
    region = lab.adopt_region(ua.Region.hugetlb(2 * huge))
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    mapping = ua.GuestMapping(
        base_host_virt_addr=region.address, size=region.length, offset=huge, page_size=huge
    )
    with ua.Snapshot(path) as snapshot:
        async with ua.FaultServer(uffd, snapshot.resolver([mapping])) as server:
            await finished(lab.touch(region.address + huge + 5 * P, 1, write=False))
            assert server.stats.faults == 1
            await finished(lab.touch(region.address, region.length, write=False))
            assert server.stats.faults == 2
            await finished(lab.run(lambda: region.discard(huge, huge)))
            await finished(lab.touch(region.address, region.length, write=False))
    assert region.read(0, huge) == contents[:huge]
    assert region.read(huge, huge) == bytes(huge)  # removed: zeros, through UFFDIO_COPY


@needs_huge_pages
async def test_a_process_with_huge_page_mappings(short_dir: Path) -> None:
    """Served whole huge pages; a removed one reads zeros; an undeclared one is poisoned
    whole (SIGBUS: hugetlbfs refuses to poison less than a huge page)."""
    huge = huge_page_size()
    snapshot_path, socket_path = str(short_dir / "huge.bin"), str(short_dir / "uffd.sock")
    Path(snapshot_path).write_bytes(os.urandom(4 * huge))
    steps = [["read", 0, 2], ["discard", 1, 1], ["read", 0, 2]]
    async with running(socket_path, snapshot_path) as server:
        result = await peer(
            socket_path, snapshot_path, [*steps, ["touch", 2]],
            mappings=[[0, 2, 1]], memory=3, page_size=huge,
        )  # fmt: skip
        assert result.returncode == -signal.SIGBUS, result.stdout.decode()
        result = await peer(
            socket_path, snapshot_path, steps, mappings=[[0, 2, 2]], memory=2, page_size=huge
        )
        assert result.returncode == 0, result.stdout.decode()
    assert server.stats.errors == 1 and server.stats.failed == 0
