"""``python -m uffd_async probe`` and ``serve`` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import uffd_async as ua

from ._processes import read_until
from ._support import TIMEOUT

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uffd_async", *args], capture_output=True, text=True, timeout=60
    )


def test_probe_text() -> None:
    result = run_cli("probe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("userfaultfd: available (")
    assert "features: " in result.stdout and "MISSING_SHMEM" in result.stdout
    assert "ioctls: " in result.stdout and "COPY" in result.stdout


def test_probe_json_matches_the_api() -> None:
    result = run_cli("probe", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    support = ua.probe()
    assert report["available"] is True
    assert support.method is not None and report["method"] == support.method.value, report
    assert set(report["features"]) == {f.name for f in ua.Feature if f in support.features}


def test_unusable_probe_exits_1_with_the_remedy() -> None:
    """Every way in refused: exit status 1 and what to change."""
    code = (
        "import errno, os, sys\n"
        "from uffd_async._core import _open\n"
        "def refuse(method):\n"
        "    raise OSError(errno.EPERM, os.strerror(errno.EPERM))\n"
        "_open.open_raw = refuse\n"
        "from uffd_async.__main__ import main\n"
        "sys.exit(main(['probe']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "NOT available" in result.stdout
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop one capability")
def test_probe_does_not_offer_event_fork_without_cap_sys_ptrace() -> None:
    """The kernel lists EVENT_FORK but refuses the handshake asking for it (EPERM)."""
    result = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", sys.executable, "-m", "uffd_async", "probe"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    features = result.stdout.split("features: ", 1)[1].split("\n", 1)[0].split()
    assert "EVENT_REMOVE" in features and "EVENT_FORK" not in features
    assert "EVENT_FORK is offered but needs CAP_SYS_PTRACE" in result.stdout
    assert "EVENT_FORK" in run_cli("probe").stdout  # with it, as root


def test_usage_error() -> None:
    assert run_cli().returncode == 2


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--metrics", "nowhere"], "is not HOST:PORT"),
        (["--metrics", "127.0.0.1:99999"], "is not HOST:PORT"),
        (["--backend", "tokio"], "invalid choice"),
        (["--chunk-size", "1 MB"], "is not a size"),
        (["--header", "no colon"], "is not a header"),
    ],
)
def test_serve_option_errors(option: list[str], words: str) -> None:
    result = run_cli("serve", "x.mem", "--socket", "x.sock", *option)
    assert result.returncode == 2 and words in result.stderr, result.stderr


# -- serve ------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path holds at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="ua-") as name:
        yield Path(name)


def run_client(snapshot: Path, socket_path: Path) -> None:
    script = str(EXAMPLES / "snapshot_client.py")
    client = subprocess.run(
        [sys.executable, script, str(snapshot), "--socket", str(socket_path), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert client.returncode == 0, client.stdout + client.stderr
    assert "every byte matches the snapshot: True" in client.stdout
    assert "read zeros afterwards, the others the snapshot: True" in client.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_serve_a_snapshot_until_signalled(short_dir: Path, backend: str, signum: int) -> None:
    snapshot, socket_path = short_dir / "snapshot.bin", short_dir / "uffd.sock"
    snapshot.write_bytes(os.urandom(2 << 20))
    command = [sys.executable, "-m", "uffd_async", "serve", str(snapshot)]
    command += ["--socket", str(socket_path), "--interval", "0.05", "--backend", backend]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as server:
        assert server.stderr is not None
        try:
            log = read_until(server.stderr, b"listening")
            try:
                run_client(snapshot, socket_path)
            except AssertionError as exc:  # what the server said, to see why
                server.kill()
                said = server.communicate()[1]
                raise AssertionError(f"{exc}\nthe server's log:\n{said!r}") from exc
            log += read_until(server.stderr, b"connections 1 (0 active")  # a progress line
            server.send_signal(signum)
            _, err = server.communicate(timeout=TIMEOUT * 3)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()
    log += err
    assert server.returncode == 0, log.decode()
    assert not socket_path.exists()
    assert b"pages copied" in log and b"INFO serving pid" in log
    assert b"until it exits (pidfd from SO_PEERPIDFD)" in log
    assert f"{signal.Signals(signum).name}: stopping".encode() in log
    assert b"stopped; connections 1 (0 active, 0 refused, 0 failed)" in log


def test_serve_what_cannot_be_served(short_dir: Path) -> None:
    missing = run_cli("serve", str(short_dir / "missing.bin"), "--socket", str(short_dir / "s"))
    assert missing.returncode == 1
    assert "cannot serve: [Errno 2] No such file or directory" in missing.stderr
    (short_dir / "snapshot.bin").write_bytes(b"x" * 4096)
    (short_dir / "taken").write_text("not a socket")
    taken = run_cli("serve", str(short_dir / "snapshot.bin"), "--socket", str(short_dir / "taken"))
    assert taken.returncode == 1
    assert "exists and is not a socket: remove it or choose another path" in taken.stderr
