"""Processes restored from an HTTP snapshot: ``serve_handoffs`` and the command line.

The peer is ``test_replay``'s Firecracker 1.12 handoff (two regions laid end to end
in the snapshot, registered MISSING, the uffd sent with the mappings), which reads
chosen pages from plain Python and compares each with the snapshot's bytes; the
object is the same bytes on ``tests/_http_server.py``, a real server process on
loopback. A page that cannot be fetched is poisoned: the peer dies of SIGBUS, and
never reads a wrong byte. Every wait is bounded.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import uffd_async as ua

from ._processes import read_until
from ._support import TIMEOUT, HttpObjectServer
from .test_firecracker import ends_soon, place, running, stop
from .test_http_source import CHUNK, served_chunks
from .test_replay import (
    PAGES,
    RECORDED,
    REPLAY_PEER,
    TOUCH,
    peer_config,
    run_peer,
    run_waiting_peer,
    snapshot_for,
)

__all__ = ["place"]  # a fixture, used by name

P = ua.PAGE_SIZE


def publish(place: Path, http_server: HttpObjectServer) -> str:
    """The snapshot file the peer compares with, and the same bytes on the server."""
    http_server.put("guest.mem", snapshot_for(place).read_bytes())
    return http_server.url("guest.mem")


@pytest.mark.anyio
async def test_a_process_is_restored_from_a_url(place: Path, http_server: HttpObjectServer) -> None:
    url = publish(place, http_server)
    async with running(place, url) as server:
        await run_peer(peer_config(place, TOUCH, all=True))
        await ends_soon(server)
        stats = server.stats
        http = server.http_stats
        # The snapshot (512 KiB) is one chunk of the default size: one fault brings it all.
        assert http is not None and (http.chunks, http.requests) == (1, 2)
    assert (stats.served, stats.failed, stats.errors) == (1, 0, 0)
    assert stats.pages == 2 * PAGES and stats.faults == 1
    assert http_server.wait_idle()["connections_open"] == 0, "the source's pool was left open"


@pytest.mark.anyio
async def test_processes_share_one_sources_chunks(
    place: Path, http_server: HttpObjectServer
) -> None:
    url = publish(place, http_server)
    async with ua.HttpSource(url, chunk_size=CHUNK) as source:
        async with running(place, source) as server:
            for _ in range(3):
                await run_peer(peer_config(place, TOUCH))
                await ends_soon(server)
        touched = {page * P // CHUNK for page in TOUCH}
        assert sorted(served_chunks(http_server)) == sorted(touched)  # once, for all three
        assert source.stats.cache_hits >= 2 * len(touched)
        assert server.stats.served == 3 and server.stats.errors == 0


@pytest.mark.anyio
async def test_pages_that_cannot_be_fetched_are_poisoned_never_wrong(
    place: Path, http_server: HttpObjectServer
) -> None:
    url = publish(place, http_server)
    async with ua.HttpSource(url, chunk_size=CHUNK, retries=1) as source:
        http_server.queue(*["403"] * 20)
        async with running(place, source) as server:
            with anyio.fail_after(TIMEOUT * 3):
                result = await anyio.run_process(
                    [sys.executable, "-c", REPLAY_PEER, peer_config(place, TOUCH)],
                    check=False,
                    stderr=subprocess.STDOUT,
                )
            assert result.returncode == -signal.SIGBUS, result.stdout
            assert b"holds" not in result.stdout  # it never compared a wrong page
            await ends_soon(server)
            assert server.stats.errors >= 1
        assert source.stats.failed >= 1 and source.stats.retries == 0


@pytest.mark.anyio
async def test_a_working_set_over_http_records_and_replays(
    place: Path, http_server: HttpObjectServer
) -> None:
    url = publish(place, http_server)
    ws_path = place / "boot.ws"
    async with ua.HttpSource(url, chunk_size=CHUNK) as source:
        async with running(place, source, record=ws_path) as server:
            await run_peer(peer_config(place, TOUCH))
            await ends_soon(server)
    recorded = ua.WorkingSet.load(ws_path)
    assert recorded.pages == RECORDED, "every page touched, as from a file"
    with ua.Snapshot(place / "guest.mem") as local:
        assert recorded.matches(local.size, local.identity)  # one identity, file or URL
    http_server.reset()
    touched = {page * P // CHUNK for page in RECORDED}
    async with ua.HttpSource(url, chunk_size=CHUNK) as source:
        async with running(place, source, prefetch=ws_path) as server:
            # The set's chunks, whole (16 pages each), before the process reads a page.
            await run_waiting_peer(
                peer_config(place, TOUCH, wait=True, all=True),
                lambda: server.stats.prefetched >= len(touched) * CHUNK // P,
            )
            await ends_soon(server)
            stats = server.stats
    assert stats.prefetched == len(touched) * CHUNK // P and stats.errors == 0
    # Only the chunks outside the set fault (once each: a chunk fills all of its pages).
    assert stats.faults == 2 * PAGES * P // CHUNK - len(touched)
    assert sorted(served_chunks(http_server)) == list(range(2 * PAGES * P // CHUNK))


def test_options_that_do_not_apply_to_a_url(place: Path) -> None:
    with pytest.raises(ua.InvalidArgument, match="readahead does not apply"):
        ua.HandoffServer(place / "s.sock", "https://example.com/snap", readahead=4)


def test_the_command_line_serves_a_url_and_never_shows_its_query(
    place: Path, http_server: HttpObjectServer
) -> None:
    secret = "X-Amz-Signature=feedface0123"
    url = publish(place, http_server) + "?" + secret
    argv = ["serve", url, "--socket", str(place / "uffd.sock"), "--interval", "0.02"]
    argv += ["--chunk-size", "64KiB", "--concurrency", "4", "--header", "X-Test: yes"]
    argv += ["--metrics", "127.0.0.1:0"]
    code = f"import sys\nfrom uffd_async.__main__ import main\nsys.exit(main({argv!r}))"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as server:
        try:
            assert server.stderr is not None
            log = read_until(server.stderr, b"listening")
            anyio.run(run_peer, peer_config(place, TOUCH))
            log += read_until(server.stderr, b"connections 1 (0 active")
            metrics = scrape(log.decode().split("metrics: ", 1)[1].split()[0])
            log += stop(server)
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=TIMEOUT)
    text = log.decode()
    assert "feedface" not in text, text
    assert f"serving {http_server.url('guest.mem')} ({2 * PAGES * P:,} bytes, 64 KiB chunks" in text
    assert "checked by If-Match" in text
    touched = len({page * P // CHUNK for page in TOUCH})
    assert f"in {touched + 1} requests (0 retried" in text.rsplit("stopped;", 1)[1]
    assert " on asyncio (uvloop); listening" in text
    # Prometheus metrics, read from the running server.
    assert metrics["uffd_async_faults_total"] == metrics["uffd_async_resolutions_total"] > 0
    assert metrics["uffd_async_http_requests_total"] == touched + 1
    assert metrics["uffd_async_http_chunks_fetched_total"] == touched
    assert metrics['uffd_async_handoffs_total{outcome="served"}'] == 1
    assert metrics["uffd_async_active_handoffs"] == 0
    assert metrics['uffd_async_resolution_seconds_bucket{le="+Inf"}'] >= 1
    assert metrics["uffd_async_resolution_seconds_count"] >= 1


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, by name and labels."""
    import httpx

    text = httpx.get(url, timeout=TIMEOUT).raise_for_status().text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.anyio
async def test_a_replay_that_meets_a_changed_object_ends_quietly_and_serving_says_so(
    place: Path, http_server: HttpObjectServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The object is replaced while the replay's first chunk is in flight: the prefetch
    ends (logged once, not raised into the handoff), the process gets SIGBUS for what
    was not fetched (never the new bytes), and ``serve_handoffs`` ends with
    ``SourceChanged`` once it has exited."""
    url = publish(place, http_server)
    socket_path = place / "uffd.sock"
    ended: list[BaseException] = []

    async def serving(source: ua.HttpSource, *, task_status: anyio.abc.TaskStatus[Any]) -> None:
        try:
            await ua.serve_handoffs(socket_path, source, prefetch=ws, task_status=task_status)
        except ua.SourceChanged as exc:
            ended.append(exc)

    async with ua.HttpSource(url, chunk_size=CHUNK, concurrency=2) as source:
        ws = ua.WorkingSet(
            snapshot_size=source.size, identity=await source.identity(), pages=RECORDED
        )
        http_server.reset()
        http_server.queue("hold")  # the replay's first request waits for our release
        async with anyio.create_task_group() as tg:
            server = await tg.start(serving, source)
            async with await anyio.open_process(
                [sys.executable, "-c", REPLAY_PEER, peer_config(place, TOUCH, wait=True)],
                stderr=subprocess.STDOUT,
            ) as peer:
                assert peer.stdout is not None and peer.stdin is not None
                with anyio.fail_after(TIMEOUT * 3):
                    output = await peer.stdout.receive()
                    assert output.startswith(b"sent"), output
                    await anyio.to_thread.run_sync(http_server.wait_held)
                    http_server.put("guest.mem", bytes(2 * PAGES * P))  # another version
                    http_server.release()
                    await source.wait_changed()
                    await peer.stdin.send(b"go\n")
                    output += b"".join([chunk async for chunk in peer.stdout])
                    assert await peer.wait() == -signal.SIGBUS, output
                    while not ended:
                        await anyio.sleep(0.005)
    assert b"holds" not in output  # it never compared a wrong page
    assert isinstance(ended[0], ua.SourceChanged) and ended[0].status == 412
    assert server.stats.prefetched == 0 and server.stats.failed == 0
    stopped = [r for r in caplog.records if r.getMessage().startswith("prefetch stopped")]
    assert len(stopped) == 1, [r.getMessage() for r in caplog.records]
    statuses = [entry["status"] for entry in http_server.stats()["log"]]
    assert statuses == [412], "a request was sent after the change"
