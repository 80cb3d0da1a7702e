"""What ``python -m uffd_async`` does with what a new user gets wrong (issue 17, part 2).

Each case runs the real command line in its own process, as a user would: one line on
stderr naming the flag, exit status 2 for a usage error and 1 at run time, no
traceback, nothing left behind (no socket file, no partial recording). The object
server is ``tests/_http_server.py`` on loopback; the peers are ``test_replay``'s
Firecracker 1.12 handoff. Every wait is bounded.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import uffd_async as ua

from ._processes import read_until
from ._support import TIMEOUT, HttpObjectServer, Lab, finished
from .test_firecracker import place
from .test_handoff import guest, refused
from .test_http_handoff import publish
from .test_http_source import CHUNK
from .test_layers import write_layer
from .test_replay import PAGES, REPLAY_PEER, peer_config, run_peer, snapshot_for

__all__ = ["place"]  # a fixture, used by name

P = ua.PAGE_SIZE
SECRET = "X-Amz-Signature=c0ffee5ecret"
TOKEN = "Bearer t0ken5ecret"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, code: str = ""
) -> subprocess.CompletedProcess[str]:
    """The command line to its end (``code`` runs first, e.g. to hide a module)."""
    main = f"import sys\n{code}\nfrom uffd_async.__main__ import main\nsys.exit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", main],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        cwd=cwd,
        env=env,
    )


def refused_at_start(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``serve ARGS`` that must stop before it listens: fails at once if it listens."""
    command = [sys.executable, "-m", "uffd_async", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd) as run:
        assert run.stderr is not None
        try:
            fd, said = run.stderr.fileno(), b""
            deadline = time.monotonic() + TIMEOUT * 3
            while chunk := os.read(fd, 65536) if select.select([fd], [], [], 0.1)[0] else b"-":
                said += b"" if chunk == b"-" else chunk
                assert b"listening" not in said, f"it serves: {said!r}"
                assert time.monotonic() < deadline, f"still running: {said!r}"
        finally:
            if run.poll() is None:
                run.kill()
        out = run.communicate(timeout=TIMEOUT)[0]
    return subprocess.CompletedProcess(command, run.returncode, out.decode(), said.decode())


def one_line(result: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The run failed with ``status`` and said so in one line holding ``words``."""
    said = result.stderr
    assert result.returncode == status, said
    assert "Traceback" not in said and said.count("\n") == 1, said
    for word in words:
        assert word in said, said
    return said


@contextlib.contextmanager
def cli_serving(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m uffd_async serve ARGS``, listening when this yields; killed if still up."""
    command = [sys.executable, "-m", "uffd_async", "serve", *args, "--interval", "0.02"]
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    ) as server:
        try:
            assert server.stderr is not None
            yield server
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=TIMEOUT)


def wait_gone(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while path.exists():
        assert time.monotonic() < deadline, f"{path} is still there after {TIMEOUT}s"
        time.sleep(0.01)


# -- usage errors: exit 2, the flag named, before anything is opened -----------------


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--http-timeout", "0"], "argument --http-timeout: must be more than 0 seconds"),
        (["--interval", "0"], "argument --interval: must be more than 0 seconds"),
        (["--timeout", "-1"], "argument --timeout: must be more than 0 seconds"),
        (["--interval", "nan"], "argument --interval: must be more than 0 seconds"),
        (["--concurrency", "0"], "argument --concurrency: must be 1 or more, not 0"),
        (["--retries", "-1"], "argument --retries: must be 0 or more, not -1"),
        (["--chunk-readahead", "-1"], "argument --chunk-readahead: must be 0 or more, not -1"),
        (["--readahead", "-1"], "argument --readahead: must be 0 or more"),
        (["--allow-uid", "-5"], "argument --allow-uid: must be 0 or more"),
        (["--chunk-size", "1000"], "argument --chunk-size: '1000' is not a positive multiple"),
        (["--chunk-size", "0"], "argument --chunk-size: '0' is not a positive multiple"),
        (["--layer", "l.layer"], "argument --layer: needs SNAPSHOT to be a file"),
        (["--readahead", "2"], "argument --readahead: does not apply to a URL"),
    ],
)
def test_numbers_and_options_that_cannot_work_with_a_url(
    place: Path, option: list[str], words: str
) -> None:
    socket_path = place / "uffd.sock"
    url = f"http://127.0.0.1:9/o/guest.mem?{SECRET}"
    said = one_line(run_cli("serve", url, "--socket", str(socket_path), *option), 2, words)
    assert "(see --help)" in said and not socket_path.exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--chunk-size", "64KiB"],
        ["--concurrency", "4"],
        ["--chunk-readahead", "4"],
        ["--retries", "0"],
        ["--http-timeout", "3"],
        ["--header", "X-A: b"],
        ["--cache-size", "0"],
        ["--http2"],
    ],
)
def test_http_options_with_a_file_are_refused_not_ignored(place: Path, option: list[str]) -> None:
    snapshot = snapshot_for(place)
    result = refused_at_start("serve", str(snapshot), "--socket", str(place / "uffd.sock"), *option)
    one_line(result, 2, f"argument {option[0]}: applies only when SNAPSHOT is an http(s)://")
    assert not (place / "uffd.sock").exists()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://host:notaport/x", "'http://host:notaport/x' is not a valid URL"),
        ("http://[::1/x", "'http://[::1/x' is not a valid URL"),
        ("http://host/x\x01y", "holds a control character ('\\x01')"),
        ("http://host/x\ny", "holds a control character ('\\n')"),
    ],
)
def test_a_malformed_url_is_one_line_without_its_query(place: Path, url: str, words: str) -> None:
    result = run_cli("serve", f"{url}?{SECRET}", "--socket", str(place / "uffd.sock"))
    said = one_line(result, 2, "argument SNAPSHOT: ", words)
    assert "c0ffee" not in said


def test_record_into_a_missing_directory_is_refused_at_start(place: Path) -> None:
    snapshot = snapshot_for(place)
    ws = place / "missing" / "boot.ws"
    result = run_cli("serve", str(snapshot), "--socket", str(place / "s"), "--record", str(ws))
    one_line(result, 2, "argument --record: ", f"{place / 'missing'} is not an existing directory")
    result = run_cli("serve", str(snapshot), "--socket", str(place / "s"), "--record", str(place))
    one_line(result, 2, "argument --record: ", "it is a directory")
    assert not (place / "s").exists() and not (place / "missing").exists()


def test_a_snapshot_is_needed_from_somewhere(place: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "UFFD_ASYNC_URL"}
    result = run_cli("serve", "--socket", str(place / "s"), env=env)
    one_line(result, 2, "the SNAPSHOT is missing", "$UFFD_ASYNC_URL")
    result = run_cli("serve", f"@{place / 'nowhere'}", "--socket", str(place / "s"))
    one_line(result, 2, "argument SNAPSHOT: cannot read @")
    (place / "empty").write_text("\n")
    result = run_cli("serve", f"@{place / 'empty'}", "--socket", str(place / "s"))
    one_line(result, 2, f"argument SNAPSHOT: @{place / 'empty'} is empty")
    result = run_cli("serve", "x", "--socket", "s", "--header", f"@{place / 'nowhere'}")
    one_line(result, 2, "argument --header: cannot read @")


# -- run-time errors: exit 1, one line, nothing left behind ---------------------------


def test_trio_not_installed_names_the_extra(place: Path) -> None:
    snapshot = snapshot_for(place)
    result = run_cli(
        "serve", str(snapshot), "--socket", str(place / "s"), "--backend", "trio",
        code="sys.modules['trio'] = None",
    )  # fmt: skip
    one_line(result, 1, "loop 'trio' needs trio: pip install 'uffd_async[trio]'")
    assert not (place / "s").exists()


def test_a_layer_file_is_not_served_as_a_snapshot(place: Path) -> None:
    snapshot = snapshot_for(place)
    with ua.Snapshot(snapshot) as base:
        parent = base.identity
    layer = place / "top.layer"
    write_layer(layer, parent, {3: b"\x07" * P}, 2 * PAGES * P)
    result = refused_at_start("serve", str(layer), "--socket", str(place / "s"))
    one_line(result, 1, f"'{layer}' is a layer file, not a snapshot", "--layer LAYER")
    assert not (place / "s").exists()


def test_a_busy_metrics_port_is_named(place: Path) -> None:
    snapshot = snapshot_for(place)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = refused_at_start(
            "serve", str(snapshot), "--socket", str(place / "s"), "--metrics", f"127.0.0.1:{port}"
        )
    one_line(result, 1, f"--metrics 127.0.0.1:{port}: cannot listen there: Address already in use")
    assert not (place / "s").exists()


def test_record_over_a_set_for_another_snapshot_is_refused(place: Path) -> None:
    """Recording and replaying one file refines it; a set of another snapshot is never lost."""
    snapshot = snapshot_for(place)
    recorder = ua.WorkingSetRecorder(snapshot.stat().st_size, b"\x01" * 32)
    recorder.record(5)
    ws = place / "boot.ws"
    recorder.working_set().save(ws)
    before = ws.read_bytes()
    argv = ["serve", "guest.mem", "--socket", "uffd.sock", "--prefetch", "boot.ws"]
    result = refused_at_start(
        *argv, "--record", "./boot.ws", cwd=place
    )  # the same, spelt otherwise
    one_line(result, 1, "./boot.ws holds a working set recorded for another snapshot")
    assert ws.read_bytes() == before and sorted(os.listdir(place)) == ["boot.ws", "guest.mem"]


def test_squash_refuses_to_overwrite_its_inputs(place: Path) -> None:
    snapshot = snapshot_for(place)
    with ua.Snapshot(snapshot) as base:
        parent = base.identity
    layer = place / "top.layer"
    write_layer(layer, parent, {3: b"\x07" * P}, 2 * PAGES * P)
    (place / "alias.mem").symlink_to(snapshot)
    kept = snapshot.read_bytes(), layer.read_bytes()
    for output, role in [("./top.layer", "a layer"), ("alias.mem", "the base")]:
        result = run_cli("layers", "squash", "guest.mem", "top.layer", "-o", output, cwd=place)
        one_line(result, 2, "argument -o/--output: ", f"is {role}", "write to another file")
    assert (snapshot.read_bytes(), layer.read_bytes()) == kept
    assert sorted(os.listdir(place)) == ["alias.mem", "guest.mem", "top.layer"]
    with pytest.raises(ua.InvalidArgument, match="is a layer"):  # the library refuses too
        ua.squash(snapshot, [layer], place / "." / "top.layer")
    done = run_cli("layers", "squash", "guest.mem", "top.layer", "-o", "out.mem", cwd=place)
    assert done.returncode == 0, done.stderr


def test_the_http_restore_example_says_404_in_one_line(http_server: HttpObjectServer) -> None:
    example = Path(__file__).parent.parent / "examples" / "http_restore.py"
    result = subprocess.run(
        [sys.executable, str(example), http_server.url("missing") + f"?{SECRET}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )
    one_line(result, 1, "cannot restore: GET ", "HTTP 404")
    assert "c0ffee" not in result.stderr


# -- secrets out of argv ------------------------------------------------------------


@pytest.mark.parametrize("given", ["@FILE", "env"])
def test_secrets_stay_out_of_argv_output_and_logs(
    place: Path, http_server: HttpObjectServer, given: str
) -> None:
    url = publish(place, http_server) + "?" + SECRET
    (place / "url").write_text(f"{url}\n# the first line is the URL\n")
    (place / "headers").write_text(f"Authorization: {TOKEN}\n\nX-Other: 1\n")
    env = dict(os.environ)
    snapshot = [f"@{place / 'url'}"]
    if given == "env":
        env["UFFD_ASYNC_URL"], snapshot = url, []
    argv = [*snapshot, "--socket", str(place / "uffd.sock"), "--header", f"@{place / 'headers'}"]
    argv += ["--concurrency", "1", "--retries", "0", "--chunk-size", "64KiB"]  # the least allowed
    with cli_serving(*argv, env=env) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        argv_seen = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        anyio.run(run_peer, peer_config(place, [0, 70]))
        log += read_until(server.stderr, b"connections 1 (0 active")
        server.send_signal(signal.SIGTERM)
        log += server.communicate(timeout=TIMEOUT * 3)[1]
    assert server.returncode == 0, log.decode()
    for secret in (b"c0ffee", b"t0ken"):
        assert secret not in argv_seen and secret not in log, log.decode()
    ranged = [entry for entry in http_server.stats()["log"] if entry["range"]]
    assert ranged and all(entry["authorization"] == TOKEN for entry in ranged)
    assert f"serving {http_server.url('guest.mem')} (".encode() in log


# -- the object changes while processes are served ------------------------------------


def start_peer(place: Path, touch: list[int]) -> subprocess.Popen[bytes]:
    """A peer that has handed its uffd over and waits for a line before it touches."""
    peer = subprocess.Popen(
        [sys.executable, "-c", REPLAY_PEER, peer_config(place, touch, wait=True)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert peer.stdout is not None
    read_until(peer.stdout, b"sent")
    return peer


def touch(peer: subprocess.Popen[bytes]) -> bytes:
    """Let the peer touch its pages; what it said. It must die of SIGBUS, reading nothing."""
    output = peer.communicate(b"go\n", timeout=TIMEOUT * 3)[0]
    assert peer.returncode == -signal.SIGBUS, output
    assert b"holds" not in output, output  # it never compared a wrong page
    return output


def test_a_changed_object_stops_the_command_line(
    place: Path, http_server: HttpObjectServer
) -> None:
    url = publish(place, http_server)
    socket_path = place / "uffd.sock"
    with cli_serving(url, "--socket", str(socket_path), "--chunk-size", "64KiB") as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        waiting = start_peer(place, [0])
        faulting = start_peer(place, [70])
        try:
            http_server.put("guest.mem", bytes(2 * PAGES * P))  # a new version: a new ETag
            touch(faulting)
            # No new process is taken: the socket is gone while the other is still served.
            wait_gone(socket_path)
            assert server.poll() is None, "it exited before the process it serves did"
            with socket.socket(socket.AF_UNIX) as late, pytest.raises(FileNotFoundError):
                late.connect(str(socket_path))
            touch(waiting)  # its page needs a fetch too: SIGBUS, not an old or new byte
        finally:
            for peer in (waiting, faulting):
                if peer.poll() is None:
                    peer.kill()
                    peer.communicate()
        log += server.communicate(timeout=TIMEOUT * 3)[1]
    text = log.decode()
    assert server.returncode == 1, text
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    assert last.startswith("the object changed; restart with the new version (GET "), text
    assert "Traceback" not in text and "no resolver" not in text, text
    # Each failed fault is one line saying what the process saw.
    assert "; its page is poisoned: the access gets SIGBUS" in text, text


#: A peer that connects, says so, and sends its handoff only once a line arrives on stdin.
LATE_PEER = REPLAY_PEER.replace(
    '    sock.connect(config["socket"])\n',
    '    sock.connect(config["socket"])\n    print("connected", flush=True)\n'
    "    sys.stdin.readline()\n",
)


@pytest.mark.anyio
async def test_a_changed_source_ends_serve_handoffs(
    place: Path, http_server: HttpObjectServer
) -> None:
    """serve() raises SourceChanged once the processes it serves have exited; a process
    whose handshake was under way when the change was found gets SIGBUS, not a hang."""
    url = publish(place, http_server)
    socket_path = place / "uffd.sock"
    ended: list[BaseException] = []

    async def serving(source: ua.HttpSource, *, task_status: anyio.abc.TaskStatus[object]) -> None:
        try:
            await ua.serve_handoffs(
                socket_path, source, timeout=TIMEOUT * 3, task_status=task_status
            )
        except ua.SourceChanged as exc:
            ended.append(exc)

    def sigbus(result: subprocess.CompletedProcess[bytes]) -> None:
        assert result.returncode == -signal.SIGBUS, result.stdout
        assert b"holds" not in result.stdout  # it never compared a wrong page

    async with ua.HttpSource(url, chunk_size=CHUNK) as source:
        async with anyio.create_task_group() as tg:
            server = await tg.start(serving, source)
            late = await anyio.open_process(
                [sys.executable, "-c", LATE_PEER, peer_config(place, [0])],
                stderr=subprocess.STDOUT,
            )
            async with late:
                assert late.stdout is not None and late.stdin is not None
                with anyio.fail_after(TIMEOUT * 3):
                    assert (await late.stdout.receive()).startswith(b"connected")
                    while server.stats.connections < 1:  # accepted, its handshake awaited
                        await anyio.sleep(0.005)
                    http_server.put("guest.mem", bytes(2 * PAGES * P))
                    faulting = await anyio.run_process(
                        [sys.executable, "-c", REPLAY_PEER, peer_config(place, [70])],
                        check=False,
                        stderr=subprocess.STDOUT,
                    )
                    sigbus(faulting)
                    while socket_path.exists():  # no new process is taken
                        await anyio.sleep(0.005)
                    assert not ended, "it ended while a handshake was under way"
                    await late.stdin.send(b"go\n")
                    output = b"".join([chunk async for chunk in late.stdout])
                    sigbus(subprocess.CompletedProcess([], await late.wait(), output))
                    while not ended:
                        await anyio.sleep(0.005)
    assert isinstance(ended[0], ua.SourceChanged)
    stats = server.stats
    assert (stats.served, stats.active, stats.failed, stats.pages) == (2, 0, 0, 0)


def test_a_snapshot_file_cut_short_says_so(place: Path) -> None:
    """A page past the end of a file truncated while served: the process gets SIGBUS, and
    the log says why in one line (the traceback only at DEBUG), not just 'Bad address'."""
    snapshot = snapshot_for(place)
    with cli_serving(str(snapshot), "--socket", str(place / "uffd.sock")) as server:
        assert server.stderr is not None
        log = read_until(server.stderr, b"listening")
        peer = start_peer(place, [70])
        try:
            os.truncate(snapshot, PAGES * P)  # the second region's bytes are gone
            touch(peer)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.communicate()
        log += read_until(server.stderr, b"connections 1 (0 active")
        server.send_signal(signal.SIGTERM)
        log += server.communicate(timeout=TIMEOUT * 3)[1]
    text = log.decode()
    assert server.returncode == 0, text
    failed = [line for line in text.splitlines() if "resolver failed" in line]
    assert len(failed) == 1 and "Traceback" not in text, text
    assert "a snapshot file shorter than its mapping" in failed[0], text
    assert failed[0].endswith("; its page is poisoned: the access gets SIGBUS"), text


class _Broken(Exception):
    pass


@pytest.mark.anyio
async def test_a_failed_fault_is_one_line_and_its_traceback_is_for_debug(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    uffd, region = lab.uffd(), lab.anonymous(1)
    uffd.register(region.address, region.length)

    async def broken(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        raise _Broken("no bytes for this page")

    caplog.set_level(logging.DEBUG, logger="uffd_async")
    on_error = ua.OnError(page="zero", propagate=False)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, broken, on_error=on_error):
            assert await finished(lab.run(lambda: region.read(0, P))) == bytes(P)
    said = [r for r in caplog.records if r.getMessage().startswith("resolver failed")]
    assert [r.levelno for r in said] == [logging.ERROR, logging.DEBUG], caplog.text
    assert said[0].exc_info is None and said[1].exc_info is not None
    assert said[0].getMessage().endswith(": _Broken: no bytes for this page; it reads a zero page")


def test_the_library_refuses_a_record_path_it_could_not_save(place: Path) -> None:
    snapshot = snapshot_for(place)
    with pytest.raises(ua.InvalidArgument, match="is not an existing directory"):
        ua.HandoffServer(place / "s", snapshot, record=place / "missing" / "boot.ws")
    with pytest.raises(ua.InvalidArgument, match="it is a directory"):
        ua.HandoffServer(place / "s", snapshot, record=place)


# -- a handoff message too long to arrive whole --------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("size", "words"),
    [
        (50_000, r"longer than the \d+ bytes a stream delivers with its fds \(50000 or more"),
        (100_000, r"longer than max_message=65536 bytes \(100000 or more arrived\)"),
    ],
)
async def test_a_message_cut_at_its_fds_is_too_long_not_bad_json(
    lab: Lab, size: int, words: str
) -> None:
    """The kernel stops a recvmsg with fds after the first part of a long message: what
    arrived is the head of valid JSON, and the rest is queued behind it."""
    mappings = ua.encode_mappings([guest()])
    message = b" " * (size - len(mappings)) + mappings  # valid JSON, had it arrived whole
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, peer:
        fds = array.array("i", [lab.uffd().fileno()])
        peer.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])  # all queued
        error = await refused(ours, words)
    assert "JSON" not in str(error)
