"""``python -m uffd_async serve s3://...`` exits clean, every time (issue 19).

One quick loopback run once ended with the process aborting at interpreter exit
after many requests (obstore's tokio threads racing the interpreter's teardown).
So the command line is run here as a user runs it, against moto (SigV4 checked,
credentials from the standard AWS environment), with a real process restored
through it, and stopped with SIGINT: it must exit with 0, every time, on asyncio
and on trio, with nothing on stderr but its own lines (no abort, no traceback, no
warning, no credential). Then the same after thousands of requests (4 KiB chunks,
every page populated). Each run is bounded; the whole file takes under a minute.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import uffd_async as ua

from ._object_stores import MotoS3, moto_s3
from ._processes import read_until
from ._support import TIMEOUT
from .test_firecracker import place
from .test_replay import REPLAY_PEER, TOUCH, peer_config, snapshot_for

__all__ = ["place"]  # a fixture, used by name

P = ua.PAGE_SIZE
RUNS = 5
#: The lines the server may write, and nothing else (a log line has a timestamp first).
EXPECTED = re.compile(
    r"serving s3://\S+ \(.*\) to processes .*; listening"
    r"|\[ *[\d.]+s\] connections \d+ .*"
    r"|SIGINT: stopping"
    r"|stopped; connections \d+ .*"
    r"|\S+ \S+ INFO .*"
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as store:
        yield store


def serve_and_interrupt(
    place: Path, s3: MotoS3, key: str, *args: str, touch: list[int], pages: int | None = None
) -> str:
    """Serve ``key`` from the command line, restore a peer through it (reading ``touch``,
    then every page), SIGINT it; what it wrote to stderr, once it exited with 0."""
    argv = [sys.executable, "-m", "uffd_async", "serve", f"s3://{s3.bucket}/{key}"]
    argv += ["--socket", str(place / "uffd.sock"), "--interval", "0.05", *args]
    env = {**os.environ, **s3.env()}
    config = peer_config(place, touch, all=True, **({"pages": pages} if pages else {}))
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    ) as server:
        try:
            assert server.stderr is not None
            log = read_until(server.stderr, b"listening")
            anyio.run(restore_peer, config)
            log += read_until(server.stderr, b"connections 1 (0 active", timeout=TIMEOUT * 9)
            server.send_signal(signal.SIGINT)
            _, rest = server.communicate(timeout=TIMEOUT * 3)
            log += rest
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=TIMEOUT)
    text = log.decode(errors="replace")
    assert server.returncode == 0, f"exit status {server.returncode}:\n{text}"
    assert "stopped; connections 1 (0 active, 0 refused, 0 failed)" in text, text
    unexpected = [line for line in text.splitlines() if not EXPECTED.fullmatch(line)]
    assert not unexpected, f"unexpected on stderr: {unexpected}\n{text}"
    assert s3.secret not in text
    return text


async def restore_peer(config: str) -> None:
    """``test_replay``'s peer, bounded more loosely: a busy host's moto may answer only a
    hundred requests a second."""
    with anyio.fail_after(TIMEOUT * 9):
        result = await anyio.run_process(
            [sys.executable, "-c", REPLAY_PEER, config], check=False, stderr=subprocess.STDOUT
        )
    output = result.stdout.decode()
    assert result.returncode == 0 and output.endswith("ok\n"), output


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigint_after_a_restore_exits_clean_every_time(
    place: Path, s3: MotoS3, backend: str
) -> None:
    s3.put("guest.mem", snapshot_for(place).read_bytes())
    for run in range(RUNS):
        text = serve_and_interrupt(
            place, s3, "guest.mem", "--chunk-size", "64KiB", "--backend", backend, touch=TOUCH
        )
        assert f"on {backend}" in text, (run, text)
        assert " 0 failed)" in text.rsplit("stopped;", 1)[1], (run, text)


def test_thousands_of_requests_then_a_clean_exit(place: Path, s3: MotoS3) -> None:
    """4 KiB chunks and ``--populate all``: a request per page, 1,024 of them a run (5,120
    in all; moto answers about 200 a second here, hence not more)."""
    pages = 512  # of each of the peer's two regions
    s3.put("big.mem", snapshot_for(place, 2 * pages).read_bytes())
    for run in range(RUNS):
        text = serve_and_interrupt(
            place,
            s3,
            "big.mem",
            "--chunk-size",
            "4KiB",
            "--populate",
            "all",
            "--backend",
            "asyncio",
            touch=[0, 2 * pages - 1],
            pages=pages,
        )
        final = text.rsplit("stopped;", 1)[1]
        fetched = re.search(r"in ([\d,]+) requests \((\d+) retried", final)
        assert fetched is not None, text
        assert int(fetched.group(1).replace(",", "")) >= 2 * pages, (run, final)
