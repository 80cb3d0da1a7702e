"""Admission: ``max_peers`` (``--max-peers``) refuses a peer beyond the limit, and only it.

Real peers hand their uffd over and wait; one more connects and is refused
(one warning line naming its pid, its uid and the limit; its connection is
closed unread), while those admitted go on being served to their last byte.
A slot freed by a peer that exited admits the next one. The stats, the
metrics and the command line's progress lines count the refusal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._errors import InvalidArgument
from uffd_async._handoff._metrics import MetricsExporter

from ._processes import cli_server, read_until
from ._support import TIMEOUT
from .test_drain import (
    PAGES,
    PEER,
    finished_ok,
    peer_config,
    rest_of,
    serving,
    start_peer,
    until,
    waiting_peer,
)
from .test_drain import place as place  # a fixture

READ = ["wait", "read"]


async def release(peer: Any) -> None:
    await peer.stdin.send(b"go\n")
    await finished_ok(peer)


async def refused_peer(place: Path) -> int:
    """A peer beyond the limit: what it sees is its connection closed. Whether its
    ``sendmsg`` came before (then it goes on: a Firecracker load would go on and its
    first fault block for good) or after (EPIPE: a Firecracker load fails) is a race."""
    with anyio.fail_after(TIMEOUT * 3):
        result = await anyio.run_process(
            [sys.executable, "-c", PEER, peer_config(place, steps=[])], check=False
        )
    assert result.returncode == 0 or b"BrokenPipeError" in result.stderr, result.stderr
    return result.returncode


@pytest.mark.anyio
async def test_a_peer_beyond_the_limit_is_refused_and_the_others_served(
    place: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "uffd_async")
    async with serving(place, max_peers=2) as (server, _):
        assert server.policy.max_peers == 2
        admitted = [await start_peer(place, steps=READ) for _ in range(2)]
        try:
            await until(lambda: server.stats.served == 2, "both handed over")
            await refused_peer(place)
            await until(lambda: server.stats.refused == 1, "the refusal")
            stats = server.stats
            assert (stats.over_limit, stats.active, stats.served) == (1, 2, 2)
            for peer in admitted:
                await release(peer)  # every byte right
            await until(lambda: server.stats.active == 0, "both gone")
            # A slot is free again: the next one is served.
            late = await start_peer(place, steps=["read"])
            try:
                await finished_ok(late)
            finally:
                await late.aclose()
        finally:
            for peer in admitted:
                with contextlib.suppress(ProcessLookupError):
                    peer.kill()
                await peer.aclose()
        await until(lambda: server.stats.active == 0, "the late one gone")
        stats = server.stats
        assert (stats.connections, stats.served, stats.refused, stats.over_limit) == (4, 3, 1, 1)
        assert (stats.failed, stats.pages) == (0, 3 * 2 * PAGES)
    refusals = [r.getMessage() for r in caplog.records if "max_peers" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert refusals[0].endswith(
        "processes are being served, the limit (max_peers 2); its connection is closed unread"
    )
    assert (
        refusals[0].startswith("refused pid ")
        and f"(uid {os.getuid()}): 2 processes" in refusals[0]
    )


@pytest.mark.anyio
async def test_the_metrics_count_refusals_and_show_draining(place: Path) -> None:
    pytest.importorskip("prometheus_client")
    async with serving(place, max_peers=1) as (server, returned):
        peer = await start_peer(place, steps=READ)
        try:
            await until(lambda: server.stats.served == 1, "the handoff")
            await refused_peer(place)
            await until(lambda: server.stats.over_limit == 1, "the refusal")
            server.drain()
            exporter = MetricsExporter(server, "127.0.0.1", 0)
            exporter._refresh()  # what a scrape reads
            metrics = {
                sample.name: sample.value
                for family in exporter.collect()
                for sample in family.samples
                if not sample.labels or sample.labels.get("outcome") == "refused"
            }
            assert metrics["uffd_async_refused_over_limit_total"] == 1
            assert metrics["uffd_async_handoffs_total"] == 1  # outcome="refused"
            assert metrics["uffd_async_draining"] == 1
            await release(peer)
        finally:
            with contextlib.suppress(ProcessLookupError):
                peer.kill()
            await peer.aclose()
        with anyio.fail_after(TIMEOUT):
            await returned.wait()


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_peers_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(InvalidArgument, match="max_peers"):
        ua.PeerPolicy(max_peers=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_command_line_refuses_over_max_peers(place: Path, backend: str) -> None:
    with cli_server(place, backend, "--max-peers", "1") as server, waiting_peer(place) as peer:
        assert server.stderr is not None
        log = read_until(server.stderr, b"connections 1 (1 active")
        extra = subprocess.run(
            [sys.executable, "-c", PEER, peer_config(place, steps=[])],
            capture_output=True,
            timeout=TIMEOUT * 3,
        )
        assert extra.returncode == 0 or b"BrokenPipeError" in extra.stderr, extra.stderr
        log += read_until(server.stderr, b"refused over --max-peers 1")
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write(b"go\n")
        peer.stdin.flush()
        read_until(peer.stdout, b"ok\n")
        assert peer.wait(timeout=TIMEOUT) == 0
        log += read_until(server.stderr, b"(0 active")
        server.send_signal(signal.SIGTERM)
        text = log.decode() + rest_of(server)
    assert server.returncode == 0, text
    assert "(max_peers 1); its connection is closed unread" in text
    assert "stopped; connections 2 (0 active, 1 refused, 0 failed)" in text


def test_the_command_line_checks_max_peers(place: Path) -> None:
    argv = ["serve", str(place / "guest.mem"), "--socket", str(place / "uffd.sock")]
    result = subprocess.run(
        [sys.executable, "-m", "uffd_async", *argv, "--max-peers", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert result.returncode == 2
    assert "argument --max-peers" in result.stderr
