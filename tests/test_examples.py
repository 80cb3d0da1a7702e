"""Every example runs as shipped (smaller sizes, both backends)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ._processes import read_until
from ._support import HttpObjectServer

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an example to its end; a hung one fails its test, well before the watchdog."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=EXAMPLES.parent
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_lazy_restore(backend: str) -> None:
    result = run(str(EXAMPLES / "lazy_restore.py"), "--backend", backend, "--size-mib", "32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every byte matches the snapshot: True" in result.stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_working_set(backend: str) -> None:
    result = run(str(EXAMPLES / "working_set.py"), "--backend", backend, "--size-mib", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every byte the program read matches the snapshot: True" in result.stdout
    lazy = int(result.stdout.split("lazy restore: ", 1)[1].split(" faults", 1)[0])
    replayed = int(result.stdout.split("replayed restore: ", 1)[1].split(" faults", 1)[0])
    assert lazy == 768 and replayed < lazy // 10, result.stdout  # the set was replayed


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_http_restore(backend: str, http_server: HttpObjectServer) -> None:
    http_server.put("snapshot", os.urandom(16 << 20))
    http_server.delay(2)
    result = run(
        str(EXAMPLES / "http_restore.py"), http_server.url("snapshot"), "--backend", backend
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every byte the program read matches the object: True" in result.stdout
    faults = int(result.stdout.split("restored lazily: ", 1)[1].split(" faults", 1)[0])
    assert 0 < faults <= 16, result.stdout  # at most one fault per 1 MiB chunk


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_live_snapshot(backend: str) -> None:
    result = run(str(EXAMPLES / "live_snapshot.py"), "--backend", backend, "--size-mib", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "base image equals memory at its instant: True" in result.stdout
    assert "base + layer restored lazily equal memory at the layer's instant: True" in result.stdout


@pytest.mark.parametrize("mode", ["fault", "async"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_write_tracking(mode: str, backend: str) -> None:
    result = run(
        str(EXAMPLES / "write_tracking.py"), "--mode", mode, "--backend", backend,
        "--pages", "512", "--writes", "2000",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "snapshot matches memory: True" in result.stdout


def test_fault_gate_example_is_a_passing_pytest_trio_test() -> None:
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "fault_gate.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_snapshot_server_and_client(backend: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ua-") as tmp:
        snapshot, socket_path = Path(tmp) / "snapshot.bin", Path(tmp) / "uffd.sock"
        snapshot.write_bytes(os.urandom(4 << 20))
        server_command = [sys.executable, str(EXAMPLES / "snapshot_server.py"), str(snapshot)]
        server_command += ["--socket", str(socket_path), "--backend", backend]
        with subprocess.Popen(
            server_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as server:
            assert server.stdout is not None
            try:
                started = read_until(server.stdout, b"serving ")  # it listens now
                client = run(
                    str(EXAMPLES / "snapshot_client.py"), str(snapshot),
                    "--socket", str(socket_path),
                )  # fmt: skip
                server.send_signal(signal.SIGINT)
                rest, _ = server.communicate(timeout=60)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.communicate()
        assert client.returncode == 0, client.stdout + client.stderr
        assert "every byte matches the snapshot: True" in client.stdout
        output = (started + rest).decode()
        assert server.returncode == 0, output
        assert "stopped after serving 1 processes" in output
        assert not socket_path.exists()
