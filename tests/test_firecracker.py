"""Every released Firecracker's handshake, byte for byte, served for the life of the process.

The peer (``_firecracker_peer.py``, standard library only) sends what each release
sends (see its docstring and :mod:`uffd_async._handoff._wire`) and does with its socket
what that release does: closed at once before 1.12, kept until exit since. It
reads all of its memory from plain Python, discards a range (a balloon) and reads
zeros there, then exits. For each shape, on both event loops and from the
command line: every byte right, the handoff over within a second of the exit,
nothing left open (the autouse leak guard checks the fds).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._handoff._wire import parse_message
from uffd_async._serve._peer_lifetime import SO_PEERPIDFD

from ._firecracker_peer import firecracker_message
from ._processes import read_until
from ._seccomp import ALLOW, ARCH, ERRNO, JEQ, LD, MACHINE, NR, RET, Instruction, arg, installing
from ._support import TIMEOUT, short_directory, source_bytes, with_huge_pages
from .conftest import needs_root
from .test_handoff_serving import PEER as HANDOFF_PEER
from .test_handoff_serving import refused_to_start

P = ua.PAGE_SIZE
PAGES = 8  # of each of the two regions
PEER = (Path(__file__).parent / "_firecracker_peer.py").read_text()
VERSIONS = ["1.1", "1.7", "1.12"]
SHAPES = {
    "1.1": ua.MessageShape.NO_PAGE_SIZE,
    "1.7": ua.MessageShape.PAGE_SIZE_KIB,
    "1.12": ua.MessageShape.PAGE_SIZE,
}
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
#: The issue's bound: a handoff ends within a second of its process exiting.
ENDS_WITHIN = 1.0


# -- the messages, without I/O ----------------------------------------------------------

BASE = 0x7F12_3460_0000


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("1.1", b'[{"base_host_virt_addr":139716164845568,"size":8192,"offset":0}]'),
        (
            "1.7",
            b'[{"base_host_virt_addr":139716164845568,"size":8192,"offset":0,'
            b'"page_size_kib":4096}]',
        ),
        (
            "1.12",
            b'[{"base_host_virt_addr":139716164845568,"size":8192,"offset":0,'
            b'"page_size":4096,"page_size_kib":4096}]',
        ),
    ],
)
def test_the_peer_sends_what_each_release_sends(version: str, expected: bytes) -> None:
    """Pins the test peer's bytes to the releases' (serde_json, struct field order)."""
    assert firecracker_message(version, [(BASE, 2 * P, 0)], P) == expected


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("page_size", [P, 2 << 20])
def test_every_release_message_parses(version: str, page_size: int) -> None:
    if version == "1.1" and page_size != P:
        pytest.skip("Firecracker 1.1 to 1.6 had no huge pages")
    regions = [(BASE, 4 * page_size, 0), (BASE + 8 * page_size, 2 * page_size, 4 * page_size)]
    mappings, shape = parse_message(firecracker_message(version, regions, page_size))
    assert shape is SHAPES[version]
    assert shape.keeps_connection is (version == "1.12")
    assert mappings == [
        ua.GuestMapping(base_host_virt_addr=a, size=s, offset=o, page_size=page_size)
        for a, s, o in regions
    ]


def test_page_sizes_that_disagree_are_refused() -> None:
    message = firecracker_message("1.12", [(BASE, 2 << 20, 0)], 2 << 20, page_size_kib=2048)
    with pytest.raises(ua.HandoffError, match="'page_size' 2097152 but 'page_size_kib' 2048"):
        ua.parse_mappings(message)


def test_fields_a_later_release_may_add_are_ignored() -> None:
    message = firecracker_message("1.12", [(BASE, 2 * P, 0)], P)
    future = message.replace(b"}]", b',"numa_node":1,"flags":{"shared":true}}]')
    assert ua.parse_mappings(future) == ua.parse_mappings(message)


def test_a_message_mixing_shapes_is_as_old_as_its_oldest_mapping() -> None:
    old = json.loads(firecracker_message("1.7", [(BASE, 2 * P, 0)], P))
    new = json.loads(firecracker_message("1.12", [(BASE + 4 * P, 2 * P, 2 * P)], P))
    _, shape = parse_message(json.dumps(new + old).encode())
    assert shape is ua.MessageShape.PAGE_SIZE_KIB


# -- real processes ----------------------------------------------------------------------


@pytest.fixture
def place() -> Iterator[Path]:
    """A short directory any user may enter (a socket path holds at most 107 bytes)."""
    with short_directory("ua-fc-") as path:
        yield path


def snapshot_for(place: Path, page_size: int) -> Path:
    path = place / "guest.mem"
    path.write_bytes(source_bytes(2 * PAGES * page_size // P))
    path.chmod(0o644)
    return path


def config(place: Path, version: str, page_size: int = P, **extra: Any) -> str:
    return json.dumps(
        {
            "socket": str(place / "uffd.sock"),
            "snapshot": str(place / "guest.mem"),
            "version": version,
            "page_size": page_size,
            "pages": PAGES,
            **extra,
        }
    )


def pages_copied(page_size: int) -> int:
    """Base pages a peer's steps fill: both regions, then the discarded quarter again."""
    return (2 * PAGES + PAGES // 4) * page_size // P


@contextlib.asynccontextmanager
async def running(place: Path, source: Any, **options: Any) -> AsyncIterator[ua.HandoffServer]:
    async with anyio.create_task_group() as tg:
        serve = functools.partial(ua.serve_handoffs, str(place / "uffd.sock"), source, **options)
        server = await tg.start(serve)
        yield server
        tg.cancel_scope.cancel()


async def run_peer(configuration: str, python: str = sys.executable, **kwargs: Any) -> str:
    with anyio.fail_after(TIMEOUT * 3):
        result = await anyio.run_process(
            [python, "-c", PEER, configuration], check=False, stderr=subprocess.STDOUT, **kwargs
        )
    output = result.stdout.decode()
    assert result.returncode == 0 and output.endswith("ok\n"), output
    return output


async def ends_soon(server: ua.HandoffServer, within: float = ENDS_WITHIN) -> None:
    """The handoff is over within ``within`` seconds of now (its process just exited)."""
    with anyio.fail_after(within):
        while server.stats.active:
            await anyio.sleep(0.002)


async def check_served(place: Path, version: str, page_size: int) -> None:
    snapshot = snapshot_for(place, page_size)
    async with running(place, snapshot) as server:
        await run_peer(config(place, version, page_size))
        await ends_soon(server)
        stats = server.stats
        assert (stats.connections, stats.served, stats.refused, stats.failed) == (1, 1, 0, 0)
        assert stats.pages == pages_copied(page_size) and stats.errors == 0
        assert stats.events == 1  # the balloon's REMOVE


@pytest.mark.anyio
@pytest.mark.parametrize("version", VERSIONS)
async def test_every_release_is_served_to_the_end(place: Path, version: str) -> None:
    await check_served(place, version, P)


@pytest.mark.anyio
@with_huge_pages(2 * PAGES)
@pytest.mark.parametrize("version", ["1.7", "1.12"])
async def test_huge_page_guests_are_served_to_the_end(place: Path, version: str) -> None:
    await check_served(place, version, 2 << 20)


@pytest.mark.anyio
async def test_page_sizes_that_disagree_are_refused_and_serving_goes_on(
    place: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = snapshot_for(place, P)
    async with running(place, snapshot) as server:
        with anyio.fail_after(TIMEOUT * 3):
            refused = await anyio.run_process(
                [sys.executable, "-c", PEER, config(place, "1.12", page_size_kib=2 * P, steps=[])],
                check=False,
            )
        assert refused.returncode == 0, refused.stderr
        await run_peer(config(place, "1.12"))
        await ends_soon(server)
        assert (server.stats.refused, server.stats.served, server.stats.failed) == (1, 1, 0)
    assert "'page_size' 4096 but 'page_size_kib' 8192" in caplog.text


class Blocked(ua.Resolver):
    """Never answers: the peer's thread stays blocked on its fault."""

    async def resolve(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await anyio.sleep_forever()


@contextlib.asynccontextmanager
async def first_blocked(place: Path) -> AsyncIterator[ua.HandoffServer]:
    """A server whose first handoff is never answered, and the next ones from the snapshot."""
    with ua.Snapshot(snapshot_for(place, P)) as snapshot:
        resolvers: list[ua.Resolver] = [Blocked()]

        def factory(handoff: ua.Handoff) -> ua.Resolver:
            return resolvers.pop() if resolvers else snapshot.resolver(handoff.mappings)

        async with running(place, factory) as server:
            yield server


async def until_faulted(server: ua.HandoffServer) -> None:
    with anyio.fail_after(TIMEOUT):
        while server.stats.faults < 1:
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("version", ["1.7", "1.12"])
async def test_a_peer_killed_mid_restore(place: Path, version: str) -> None:
    async with first_blocked(place) as server:
        async with await anyio.open_process(
            [sys.executable, "-c", PEER, config(place, version)]
        ) as process:
            await until_faulted(server)  # its first read is blocked on a fault we hold
            process.kill()
            with anyio.fail_after(TIMEOUT):
                assert await process.wait() == -signal.SIGKILL
        await ends_soon(server)
        stats = server.stats
        assert (stats.served, stats.active, stats.failed, stats.faults, stats.resolved) == (
            1, 0, 0, 1, 0,
        )  # fmt: skip
        await run_peer(config(place, version))  # the next one is served
        await ends_soon(server)
        assert (server.stats.served, server.stats.failed) == (2, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("version", ["1.1", "1.12"])
async def test_a_peer_that_exits_with_a_fault_pending(place: Path, version: str) -> None:
    async with first_blocked(place) as server:
        async with await anyio.open_process(
            [sys.executable, "-c", PEER, config(place, version, steps=["hold"])]
        ) as process:
            await until_faulted(server)
            assert process.stdin is not None
            await process.stdin.send(b"exit\n")
            with anyio.fail_after(TIMEOUT):
                assert await process.wait() == 0
        await ends_soon(server)
        assert (server.stats.served, server.stats.active, server.stats.failed) == (1, 0, 0)


# -- the command line, in its own process ------------------------------------------------


@contextlib.contextmanager
def cli_server(
    place: Path, *args: str, prefix: tuple[str, ...] = (), code: str = ""
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m uffd_async serve`` on ``place``'s snapshot, listening when this yields."""
    argv = ["serve", str(place / "guest.mem"), "--socket", str(place / "uffd.sock")]
    argv += ["--interval", "0.02", *args]
    main = f"import sys\n{code}\nfrom uffd_async.__main__ import main\nsys.exit(main({argv!r}))"
    command = [*prefix, sys.executable, "-c", main]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            yield server
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=TIMEOUT)


def stop(server: subprocess.Popen[bytes], pid: int | None = None) -> bytes:
    """SIGTERM it (or ``pid``, the server inside it); all it logged; it must exit with 0."""
    os.kill(pid or server.pid, signal.SIGTERM)
    _, rest = server.communicate(timeout=TIMEOUT * 3)
    assert server.returncode == 0, rest.decode()
    return rest


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("version", VERSIONS)
def test_the_command_line_serves_every_release(place: Path, version: str, backend: str) -> None:
    snapshot_for(place, P)
    with cli_server(place, "--backend", backend) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        anyio.run(run_peer, config(place, version), backend=backend)
        # The exit ends the handoff: a progress line says so within the bound.
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_WITHIN)
        log += stop(server)
    text = log.decode()
    assert f"Firecracker {SHAPES[version].value}'s message" in text
    assert "until it exits (pidfd from SO_PEERPIDFD)" in text
    assert f"pages copied {pages_copied(P)} " in text.rsplit("stopped;", 1)[1]


# -- a peer in another pid namespace, and a kernel without pidfds ------------------------

needs_filter = pytest.mark.skipif(
    MACHINE is None, reason=f"no seccomp filter for {platform.machine()}"
)
in_new_pid_namespace = ("unshare", "--pid", "--fork", "--kill-child")


def without_peer_pidfd(answer: int = errno.ENOPROTOOPT, *, pidfd_open: bool = True) -> str:
    """A kernel as this process sees it: ``getsockopt(SO_PEERPIDFD)`` says ``answer``
    (ENOPROTOOPT: before 6.5; EINVAL: 6.5 to 6.15, for a peer already gone), and
    without ``pidfd_open``: before 5.3."""
    assert MACHINE is not None
    rest: list[Instruction] = []
    if not pidfd_open:
        rest += [(JEQ, 0, 1, MACHINE["pidfd_open"]), (RET, 0, 0, ERRNO | errno.ENOSYS)]
    rest += [
        (JEQ, 0, 3, MACHINE["getsockopt"]),
        (LD, 0, 0, arg(2)),  # optname
        (JEQ, 0, 1, SO_PEERPIDFD),
        (RET, 0, 0, ERRNO | answer),
        (RET, 0, 0, ALLOW),
    ]
    arch = [(LD, 0, 0, ARCH), (JEQ, 0, len(rest), MACHINE["arch"]), (LD, 0, 0, NR)]
    return installing(arch + rest)


def no_pidfds() -> str:
    """A kernel before 5.3, as this process sees it: no SO_PEERPIDFD, no pidfd_open."""
    return without_peer_pidfd(pidfd_open=False)


def server_inside(unshare: subprocess.Popen[bytes]) -> int:
    """The pid (here) of the python process that ``unshare --fork`` started (it listens)."""
    children = [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and _parent(entry) == unshare.pid
    ]
    assert len(children) == 1, children
    return children[0]


def _parent(pid: str) -> int:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat_line.rsplit(")", 1)[1].split()[1])


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize("version", ["1.1", "1.12"])
def test_a_peer_in_a_pid_namespace_we_cannot_see(place: Path, version: str) -> None:
    """The server in a child pid namespace: SO_PEERCRED says pid 0, SO_PEERPIDFD still works."""
    snapshot_for(place, P)
    with cli_server(place, prefix=in_new_pid_namespace) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        anyio.run(run_peer, config(place, version))
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_WITHIN)
        log += stop(server, server_inside(server))
    text = log.decode()
    assert "serving pid 0 " in text and "until it exits (pidfd from SO_PEERPIDFD)" in text


@needs_root
@needs_filter
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_no_pidfd_and_a_peer_that_keeps_its_socket(place: Path) -> None:
    """A kernel without pidfds, a pid we cannot see: Firecracker 1.12 hangs up as it exits."""
    snapshot_for(place, P)
    with cli_server(place, prefix=in_new_pid_namespace, code=no_pidfds()) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        anyio.run(run_peer, config(place, "1.12"))
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_WITHIN)
        log += stop(server, server_inside(server))
    text = log.decode()
    assert "until it hangs up (no pidfd: SO_PEERPIDFD: Protocol not available" in text
    assert "SO_PEERCRED gives pid 0" in text


@needs_root
@needs_filter
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize("version", ["1.1", "1.7"])
def test_no_pidfd_and_a_peer_that_closes_its_socket_at_once(place: Path, version: str) -> None:
    """No pidfd, and a hangup that says nothing: the handoff is served through the
    hangup, and its memory tells when the process has exited (the log says so)."""
    snapshot_for(place, P)
    with cli_server(place, prefix=in_new_pid_namespace, code=no_pidfds()) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        anyio.run(run_peer, config(place, version))  # every byte, after the hangup
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_SOON)
        log += stop(server, server_inside(server))
    text = log.decode()
    assert "no pidfd (SO_PEERPIDFD: Protocol not available" in text
    assert "serving ends when its memory is found gone (asked every" in text
    assert "stopped; connections 1 (0 active, 0 refused, 0 failed)" in text
    assert f"pages copied {pages_copied(P)} " in text.rsplit("stopped;", 1)[1]


def line_from(stream: IO[bytes], start: bytes) -> bytes:
    """What ``stream`` says up to the end of the line where ``start`` shows (bounded)."""
    seen = read_until(stream, start)
    if b"\n" not in seen.rsplit(start, 1)[1]:
        seen += read_until(stream, b"\n")
    return seen


#: Where a pidfd cannot say it, a handoff ends within a few probes of the exit.
ENDS_SOON = 5.0


@needs_filter
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    "answer", [errno.ENOPROTOOPT, errno.EINVAL], ids=["before-6.5", "6.5-to-6.15"]
)
def test_no_peer_pidfd_and_a_peer_gone_before_it_is_accepted(
    place: Path, answer: int, backend: str
) -> None:
    """The peer connects, hands over and exits (reaped) while the server is stopped. On a
    kernel without SO_PEERPIDFD, pidfd_open finds its pid gone (ESRCH); where
    SO_PEERPIDFD says EINVAL, the peer is gone. Either way: never served forever."""
    snapshot_for(place, P)
    code = without_peer_pidfd(answer)
    with cli_server(place, "--backend", backend, code=code) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            anyio.run(run_peer, config(place, "1.1", steps=[]), backend=backend)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_SOON)
        log += stop(server)
    text = log.decode()
    assert "it has exited already" in text
    assert "stopped; connections 1 (0 active, 0 refused, 0 failed)" in text


@needs_root
@needs_filter
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_no_peer_pidfd_and_a_fork_child_that_outlives_the_peer(place: Path, backend: str) -> None:
    """Without SO_PEERPIDFD (pidfd_open on the SO_PEERCRED pid instead): the peer forks
    and exits, its child (which closed the socket) reads all of its memory after that, and
    is served every byte; its exit ends the handoff."""
    snapshot = snapshot_for(place, P)
    steps = [["read", 0, 2], ["orphan", [["read", 0, 2 * PAGES]]]]
    peer_config = {
        "socket": str(place / "uffd.sock"), "snapshot": str(snapshot), "memory": 2 * PAGES,
        "page_size": P, "mappings": [[0, 2 * PAGES, 0]], "steps": steps,
    }  # fmt: skip
    with cli_server(place, "--backend", backend, code=without_peer_pidfd()) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        command = [sys.executable, "-c", HANDOFF_PEER, json.dumps(peer_config)]
        with subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as peer:
            try:
                assert peer.wait(TIMEOUT) == 0  # the parent, gone at once
                log += line_from(server.stderr, f"pid {peer.pid}: ".encode())  # it saw that
                assert f"pid {peer.pid}: gone; its fork children are served" in log.decode()
                assert peer.stdin is not None and peer.stdout is not None
                peer.stdin.write(b"go\n")
                peer.stdin.flush()
                output = read_until(peer.stdout, b"\n")
            finally:
                peer.kill()
                peer.communicate(timeout=TIMEOUT)
        assert output == b"ok\n", output
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_SOON)
        log += stop(server)
    text = log.decode()
    assert "until it exits (pidfd from pidfd_open)" in text
    assert "stopped; connections 1 (0 active, 0 refused, 0 failed)" in text
    assert f"pages copied {2 * PAGES} " in text.rsplit("stopped;", 1)[1]


# -- a jailed Firecracker: another uid, connecting for real ------------------------------


@needs_root
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system python3")
def test_a_jailed_peer_of_another_uid_connects_and_is_served(place: Path) -> None:
    """Firecracker under its jailer runs as another uid: here nobody, through the CLI."""
    snapshot_for(place, P)
    as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}
    nobody_peer = functools.partial(
        run_peer, config(place, "1.12"), python=SYSTEM_PYTHON, **as_nobody
    )
    # The socket's mode from the umask: nobody may not even connect.
    with cli_server(place, "--allow-uid", str(NOBODY)) as server:
        assert server.stderr is not None
        read_until(server.stderr, b"listening")
        assert stat.S_IMODE(os.stat(place / "uffd.sock").st_mode) & 0o002 == 0
        with pytest.raises(AssertionError, match="PermissionError"):
            anyio.run(nobody_peer)
        stop(server)
    with cli_server(
        place, "--allow-uid", str(NOBODY), "--socket-mode", "660", "--socket-group", str(NOBODY)
    ) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        status = os.stat(place / "uffd.sock")
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o660, NOBODY)
        anyio.run(nobody_peer)
        log += read_until(server.stderr, b"connections 1 (0 active", timeout=ENDS_WITHIN)
        log += stop(server)
    text = log.decode()
    assert f"(uids [0, {NOBODY}])" in text and f"(uid {NOBODY})" in text


@pytest.mark.anyio
async def test_socket_mode_and_group_in_the_api(place: Path) -> None:
    snapshot = snapshot_for(place, P)
    group = os.getegid()
    async with running(place, snapshot, socket_mode=0o666, socket_group=group) as server:
        status = os.stat(place / "uffd.sock")
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o666, group)
        assert server.allowed_uids == {os.geteuid()}
    bad_options: list[tuple[dict[str, Any], str]] = [
        ({"socket_mode": 0o1777}, "permission bits"),
        ({"socket_group": "no-such-group-here"}, "no group named"),
        ({"socket_group": -1}, "a name or a gid"),
    ]
    for bad, match in bad_options:
        with pytest.raises(ValueError, match=match):
            ua.HandoffServer(place / "s", snapshot, **bad)
    with pytest.raises(ValueError, match="abstract socket has no file"):
        ua.HandoffServer("\0abstract", snapshot, socket_mode=0o666)


@pytest.mark.anyio
async def test_a_missing_socket_directory_is_named(place: Path) -> None:
    snapshot = snapshot_for(place, P)
    missing = place / "no" / "such" / "dir" / "uffd.sock"
    with pytest.raises(FileNotFoundError, match=f"its directory {place}/no/such/dir does not"):
        raise await refused_to_start(missing, snapshot)
