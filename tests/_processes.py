"""Helpers for tests that run servers and clients as separate processes; every wait bounded."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ._support import TIMEOUT


def read_until(stream: IO[bytes], marker: bytes, timeout: float = TIMEOUT * 3) -> bytes:
    """What a child process wrote to ``stream`` (a bytes pipe) up to ``marker``.

    Reads the pipe's fd directly: call ``communicate()`` afterwards, never a
    buffered read of the same stream before this.
    """
    fd, seen = stream.fileno(), b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{marker!r} did not show within {timeout}s; got {seen!r}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the stream ended before {marker!r} showed; got {seen!r}"
            seen += chunk
    return seen


@contextlib.contextmanager
def cli_server(place: Path, backend: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m uffd_async serve`` on ``place``'s snapshot, listening when this yields."""
    command = [sys.executable, "-m", "uffd_async", "serve", str(place / "guest.mem")]
    command += ["--socket", str(place / "uffd.sock"), "--interval", "0.05"]
    command += ["--backend", backend, *args]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            assert server.stderr is not None
            read_until(server.stderr, b"listening")
            yield server
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=TIMEOUT)
