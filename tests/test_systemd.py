"""systemd's notify and socket-activation protocols (``_handoff/_systemd.py``).

The notify side is checked against a datagram socket of the test's own, as
systemd would hold it; ``listen_fds`` in a child process that puts fds at 3
and up and names itself in ``LISTEN_PID``, as a service manager does.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffd_async._core._errors import InvalidArgument
from uffd_async._handoff._listener import LISTEN_FD_NAME, passed_listening_socket
from uffd_async._handoff._systemd import listen_fds, notify

from ._processes import read_until
from ._support import TIMEOUT
from .test_drain import PEER, peer_config
from .test_drain import place as place  # a fixture


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """An abstract datagram socket named in ``$NOTIFY_SOCKET``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")  # autobind: an abstract name chosen by the kernel
        name = sock.getsockname()
        assert isinstance(name, bytes) and name.startswith(b"\0")
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name[1:].decode())
        sock.settimeout(TIMEOUT)
        yield sock


def test_notify_sends_fields_as_one_datagram(notify_socket: socket.socket) -> None:
    assert notify("READY=1", "STATUS=serving 2 peers")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 2 peers"


def test_notify_to_a_filesystem_path(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.path.join(tmp_path, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_passes_fds_with_scm_rights(notify_socket: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        assert notify("FDSTORE=1", "FDNAME=uffd-1", fds=[write_end])
        fds = array.array("i")
        message, ancillary, _, _ = notify_socket.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize * 4))
        assert message == b"FDSTORE=1\nFDNAME=uffd-1"
        [(level, kind, data)] = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(data)
        [received] = fds
        try:
            assert os.fstat(received).st_ino == os.fstat(write_end).st_ino
            os.write(received, b"x")
            assert os.read(read_end, 1) == b"x"
        finally:
            os.close(received)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_notify_never_waits_for_a_manager_that_stopped_reading(
    notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """A full queue (10 datagrams by default) is a failed delivery, never a wait: a
    blocked send would stop the event loop the server runs on."""
    sent: list[bool] = []

    def flood() -> None:
        for _ in range(1000):
            sent.append(notify("STATUS=serving"))
            if not sent[-1]:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    blocked = thread.is_alive()
    if blocked:
        notify_socket.close()  # the blocked send fails now, and the thread ends
        thread.join(TIMEOUT)
    assert not blocked, f"notify() blocked after {len(sent)} datagrams"
    assert sent[-1] is False and all(sent[:-1]) and len(sent) > 1
    assert "could not notify the service manager" in caplog.text


def test_notify_outside_systemd_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not notify("READY=1")


def test_notify_to_a_socket_nobody_holds_is_false_and_logged(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(tmp_path, "gone"))
    assert not notify("READY=1")
    assert "could not notify the service manager" in caplog.text


@pytest.mark.parametrize("field", ["READY", "STATUS=a\nREADY=1", "STATUS=\0"])
def test_notify_refuses_a_malformed_field(field: str, notify_socket: socket.socket) -> None:
    with pytest.raises(InvalidArgument, match="KEY=value"):
        notify(field)


@pytest.mark.parametrize("fd", [-1, True, 3.0])
def test_notify_refuses_a_bad_fd(fd: object, notify_socket: socket.socket) -> None:
    with pytest.raises(InvalidArgument, match="non-negative int"):
        notify("FDSTORE=1", fds=[fd])  # type: ignore[list-item]


# Run as a child: moves the inherited fds to 3, 4, ... as a service manager
# would, names itself in LISTEN_PID, and reports what listen_fds() returned,
# the fds' close-on-exec flags and what is left of the environment.
_CHILD = """
import fcntl, json, os, sys
from uffd_async._handoff._systemd import listen_fds
sources = [int(fd) for fd in sys.argv[1:]]
for index, fd in enumerate(sources):
    os.dup2(fd, 3 + index, inheritable=True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(sources))
passed = listen_fds()
print(json.dumps({
    "passed": passed,
    "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd, _ in passed],
    "types": [os.fstat(fd).st_mode for fd, _ in passed],
    "left": sorted(name for name in os.environ if name.startswith("LISTEN_")),
}))
"""


def _run_child(fds: list[int], names: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    # The child's own fds 3, 4, ... must be free for the move: pass high numbers.
    high = [os.dup2(fd, 100 + index) for index, fd in enumerate(fds)]
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, *map(str, high)],
            pass_fds=high,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        ).stdout
    finally:
        for fd in high:
            os.close(fd)
    result: dict[str, object] = json.loads(out)
    return result


def test_listen_fds_names_and_cloexec() -> None:
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram,
    ):
        result = _run_child([stream.fileno(), datagram.fileno()], "handoff:other")
    assert result["passed"] == [[3, "handoff"], [4, "other"]]
    assert result["cloexec"] == [True, True]
    assert result["left"] == []


def test_listen_fds_without_names_are_unknown() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        result = _run_child([stream.fileno()], None)
    assert result["passed"] == [[3, "unknown"]]


def test_listen_fds_for_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_listen_fds_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert listen_fds() == []


def test_listen_fds_keeps_the_environment_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LISTEN_PID": "me"}, "LISTEN_PID='me' is not"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}, "1 names for LISTEN_FDS=2"),
        ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "_CLOSED": "3"}, "fd 3 is not open"),
    ],
)
def test_listen_fds_refuses_an_inconsistent_environment(
    variables: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    if "_CLOSED" in variables:
        # fd 3 is busy in this process: check the "not open" path in a child.
        code = (
            "import os\n"
            "from uffd_async._handoff._systemd import listen_fds\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "try:\n    listen_fds()\nexcept ValueError as exc:\n    print(exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
            close_fds=True,
        ).stdout
        assert message in out
        return
    with pytest.raises(InvalidArgument, match=message):
        listen_fds()
    assert "LISTEN_PID" not in os.environ


# -- picking the handoff socket among the passed fds -----------------------------------


def test_the_socket_named_handoff_is_chosen(tmp_path: os.PathLike[str]) -> None:
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as handoff,
    ):
        for sock, name in ((other, "other"), (handoff, "handoff")):
            sock.bind(os.path.join(tmp_path, name))
            sock.listen()
        memfd = os.memfd_create("state")
        try:
            passed = [(other.fileno(), "other"), (handoff.fileno(), "handoff"), (memfd, "state")]
            chosen, rest = passed_listening_socket(passed)
            assert chosen is not None
            try:
                assert chosen.fileno() == handoff.fileno()
                assert rest == [(other.fileno(), "other"), (memfd, "state")]
            finally:
                chosen.detach()  # the test's own socket closes it
            with pytest.raises(InvalidArgument, match="2 sockets: name the handoff"):
                passed_listening_socket([(other.fileno(), "a"), (handoff.fileno(), "b")])
            chosen, rest = passed_listening_socket([(memfd, "state"), (other.fileno(), "x")])
            assert chosen is not None and chosen.fileno() == other.fileno()  # the only one
            chosen.detach()
            assert passed_listening_socket([(memfd, "state")]) == (None, [(memfd, "state")])
            with pytest.raises(InvalidArgument, match="is not a socket"):
                passed_listening_socket([(memfd, "handoff")])
        finally:
            os.close(memfd)


@pytest.mark.parametrize(
    ("family", "kind", "listens", "problem"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, True, "is not a Unix socket (AF_INET)"),
        (socket.AF_UNIX, socket.SOCK_DGRAM, False, "is not a stream socket (SOCK_DGRAM)"),
        (socket.AF_UNIX, socket.SOCK_STREAM, False, "does not listen"),
    ],
)
def test_a_named_socket_of_the_wrong_kind_is_refused(
    family: int, kind: int, listens: bool, problem: str
) -> None:
    with socket.socket(family, kind) as sock:
        if listens:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        with pytest.raises(InvalidArgument, match=re.escape(problem)):
            passed_listening_socket([(sock.fileno(), "handoff")])
        assert sock.fileno() >= 0  # left open, as it came


# -- the real systemd-socket-activate ----------------------------------------------------

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="no systemd-socket-activate")


@contextlib.contextmanager
def activated(
    place: Path, notify_name: str, *args: str, kind: str = "--fdname=handoff"
) -> Iterator[subprocess.Popen[bytes]]:
    """``systemd-socket-activate -l place/uffd.sock ... python -m uffd_async serve``: it
    listens, and execs the server (same pid) when the first connection comes."""
    assert ACTIVATE is not None
    command = [ACTIVATE, "-l", str(place / "uffd.sock"), kind, "-E", f"NOTIFY_SOCKET={notify_name}"]
    command += [sys.executable, "-m", "uffd_async", "serve", str(place / "guest.mem"), *args]
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1]
    ) as process:
        try:
            assert process.stderr is not None
            read_until(process.stderr, b"Listening on")
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=TIMEOUT)


def received(sock: socket.socket, wanted: bytes) -> list[bytes]:
    """The notify datagrams up to and including one holding ``wanted``."""
    seen: list[bytes] = []
    while not seen or wanted not in seen[-1]:
        seen.append(sock.recv(4096))
    return seen


@needs_activate
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_socket_activation_serves_through_the_passed_socket(
    place: Path, notify_socket: socket.socket, backend: str
) -> None:
    name = os.environ["NOTIFY_SOCKET"]
    with activated(place, name, "--interval", "0.05", "--backend", backend) as server:
        peer = subprocess.Popen(
            [sys.executable, "-c", PEER, peer_config(place)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = peer.communicate(timeout=TIMEOUT * 3)  # served: every byte right
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.communicate()
        assert peer.returncode == 0 and out.endswith(b"ok\n"), out
        ready = received(notify_socket, b"READY=1")
        assert ready[-1].startswith(b"READY=1\nSTATUS=serving ")
        status = received(notify_socket, b"STATUS=serving 0 processes (1 served, 0 refused)")
        assert status
        server.send_signal(signal.SIGTERM)
        assert received(notify_socket, b"STOPPING=1")[-1] == b"STOPPING=1\nSTATUS=draining: 0 peers"
        _, err = server.communicate(timeout=TIMEOUT * 3)
        text = err.decode(errors="replace")
    assert server.returncode == 0, text
    assert f"on {place / 'uffd.sock'} (uids" in text
    assert "stopped; connections 1 (0 active, 0 refused, 0 failed)" in text
    assert (place / "uffd.sock").exists()  # systemd's file: never unlinked by the server


@needs_activate
def test_socket_activation_refuses_a_datagram_socket(
    place: Path, notify_socket: socket.socket
) -> None:
    name = os.environ["NOTIFY_SOCKET"]
    with activated(place, name, kind="--datagram") as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(b"x", str(place / "uffd.sock"))  # what starts the server
        _, err = server.communicate(timeout=TIMEOUT * 3)
    text = err.decode(errors="replace")
    assert server.returncode == 1, text
    assert "cannot serve: the socket passed in (fd 3) is not a stream socket (SOCK_DGRAM)" in text


def test_socket_required_without_activation(place: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [sys.executable, "-m", "uffd_async", "serve", str(place / "guest.mem")],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT * 3,
    )
    assert result.returncode == 2
    assert "argument --socket: required (unless started by socket activation)" in result.stderr


# -- the example units -------------------------------------------------------------------

UNITS = Path(__file__).parents[1] / "examples" / "systemd"


def unit(name: str) -> dict[str, dict[str, str]]:
    """A unit file's sections and keys (continuation lines joined; the last key wins)."""
    sections: dict[str, dict[str, str]] = {}
    section: dict[str, str] = {}
    text = (UNITS / name).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            section[key.strip()] = value.strip()
    return sections


def test_the_example_units_fit_the_server() -> None:
    socket_unit, service = unit("uffd-async.socket"), unit("uffd-async.service")
    assert socket_unit["Socket"]["FileDescriptorName"] == LISTEN_FD_NAME
    assert socket_unit["Socket"]["ListenStream"].startswith("/")
    unit_service = service["Service"]
    assert unit_service["Type"] == "notify"
    assert unit_service["KillSignal"] == "SIGTERM"
    assert int(unit_service["FileDescriptorStoreMax"]) > 0
    assert unit_service["User"] not in ("root", "0")
    argv = shlex.split(unit_service["ExecStart"])
    assert argv[1:4] == ["-m", "uffd_async", "serve"] and "--socket" not in argv
    help_text = subprocess.run(
        [sys.executable, "-m", "uffd_async", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        check=True,
    ).stdout
    flags = [arg for arg in argv if arg.startswith("--")]
    assert flags
    for flag in flags:
        assert re.search(rf"(^|\s|,){re.escape(flag)}\b", help_text), flag
    drain = float(argv[argv.index("--drain-timeout") + 1])
    assert drain < float(unit_service["TimeoutStopSec"]) <= drain + 60  # ours ends it first


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_example_units_verify(tmp_path: Path) -> None:
    """systemd's own parser finds nothing to say (the ExecStart binary made real)."""
    for name in ("uffd-async.socket", "uffd-async.service"):
        text = (UNITS / name).read_text().replace("/opt/uffd-async/bin/python", sys.executable)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "uffd-async.socket", "uffd-async.service"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        cwd=tmp_path,
    )
    said = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not said, said
