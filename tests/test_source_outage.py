"""A source that goes away for a while: its faults wait and are served when it is back.

The store is a real server process on loopback (``tests/_http_server.py``), killed
(SIGKILL: connections reset, then refused) and started again on the same port with
the same files, so the object's ETag is the one the source was opened at; the peer
is ``test_replay``'s Firecracker-style process, which compares every page it reads
with the snapshot's bytes and dies of SIGBUS on a poisoned one. A pack's chunks go
away as an NFS tier's would: their directory is moved aside and back. S3 (moto)
goes away behind a TCP proxy that stops and starts listening. Every wait is bounded;
no test asserts a wall-clock time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import uffd_async as ua
from uffd_async._remote import _outage

from ._processes import read_until
from ._support import _REPO, TIMEOUT, HttpObjectServer, Lab
from .test_firecracker import ends_soon, place, running, stop
from .test_http_handoff import scrape
from .test_http_source import CHUNK, PAGES, SOURCE, read_pages, restoring, served_chunks
from .test_replay import REPLAY_PEER, TOUCH, peer_config, snapshot_for

__all__ = ["place"]  # a fixture, used by name

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE
PER_CHUNK = CHUNK // P
#: Short pauses, so that a test sees the recovery soon after it happens.
QUICK = 0.2


class Restartable:
    """A ``tests._http_server`` process that can be killed and started again on its port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self.server: HttpObjectServer | None = None

    def start(self) -> HttpObjectServer:
        command = [sys.executable, "-m", "tests._http_server", "--root", str(self.root)]
        command += ["--port", str(self.port), "--exit-with", str(os.getpid())]
        process = subprocess.Popen(
            command, cwd=_REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        line = read_until(process.stdout, b"\n", TIMEOUT).decode().strip()
        word, _, base_url = line.partition(" ")
        assert word == "listening", line
        process.stdout.close()
        self.server = HttpObjectServer(process, self.root, base_url)
        self.port = int(base_url.rsplit(":", 1)[1])
        return self.server

    def kill(self) -> None:
        """Gone at once: open connections reset, new ones refused."""
        assert self.server is not None
        self.server.process.kill()
        self.server.process.wait()
        self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Restartable]:
    root = tmp_path / "objects"
    root.mkdir()
    restartable = Restartable(root)
    try:
        restartable.start()
        yield restartable
    finally:
        restartable.close()


def publish(place: Path, store: Restartable) -> str:
    """The peer's snapshot file, and the same bytes on the store."""
    assert store.server is not None
    store.server.put("guest.mem", snapshot_for(place).read_bytes())
    return store.server.url("guest.mem")


async def peer(place: Path, **config: Any) -> subprocess.CompletedProcess[bytes]:
    """The peer, run to its end: it reads TOUCH, then (``all``) every page."""
    with anyio.fail_after(TIMEOUT * 6):
        return await anyio.run_process(
            [sys.executable, "-c", REPLAY_PEER, peer_config(place, TOUCH, **config)],
            check=False, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def until(condition: Any, timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


# -- the policy -------------------------------------------------------------------------


def test_the_policy_is_checked_when_made() -> None:
    policy = ua.SourcePolicy()
    assert (policy.on_error, policy.deadline, policy.waits) == ("wait", 300.0, True)
    assert not ua.SourcePolicy(on_error="poison").waits
    with pytest.raises(ua.InvalidArgument, match="on_error must be 'wait' or 'poison'"):
        ua.SourcePolicy(on_error="retry")  # type: ignore[arg-type]
    bad: dict[str, Any]
    for field in ("deadline", "backoff_cap"):
        with pytest.raises(ua.InvalidArgument, match=f"{field} must be a finite number"):
            bad = {field: 0}
            ua.SourcePolicy(**bad)
        with pytest.raises(TypeError, match=f"{field} must be a number of seconds"):
            bad = {field: "5"}
            ua.SourcePolicy(**bad)
    with pytest.raises(TypeError, match="outage must be a SourcePolicy, not str"):
        ua.HttpSource("http://127.0.0.1:9/o/x", outage="wait")  # type: ignore[arg-type]


# -- the loop itself, on a clock of its own ------------------------------------------------


class Clock:
    """``_outage``'s clock and dice, replaced: each pause takes its whole bound, at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []
        monkeypatch.setattr(_outage, "time", SimpleNamespace(monotonic=lambda: self.now))
        monkeypatch.setattr(_outage, "random", SimpleNamespace(uniform=lambda low, high: high))

        async def pause(outage: _outage.Outage, delay: float) -> None:
            self.pauses.append(delay)
            self.now += delay
            await anyio.lowlevel.checkpoint()

        monkeypatch.setattr(_outage.Outage, "_pause", pause)


class Down:
    """A source's fetch, down until ``up`` (or for its first ``times`` tries): it gives up
    (the source down), or brings its bytes and says so, as a source's fetch does."""

    def __init__(self, outage: _outage.Outage, times: int | None = None) -> None:
        self.outage, self.times, self.up, self.tries = outage, times, False, 0

    async def get(self) -> bytes:
        self.tries += 1
        if not self.up and (self.times is None or self.tries <= self.times):
            error = ua.FetchError("GET src bytes=0-9: refused", url="src", start=0, end=9)
            raise _outage.Unavailable(error)
        self.outage.succeeded()
        return b"bytes"


def outage_of(policy: ua.SourcePolicy) -> tuple[_outage.Outage, ua.HttpStats]:
    stats = ua.HttpStats()
    return _outage.Outage(policy, stats, lambda: "src"), stats


async def test_a_fault_backs_off_capped_until_its_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(monkeypatch)
    outage, stats = outage_of(ua.SourcePolicy(deadline=10.0, backoff_cap=2.0))
    with (
        anyio.fail_after(TIMEOUT),
        pytest.raises(ua.FetchError, match=r"refused \(still failing at the source deadline"),
    ):
        await outage.fetch(Down(outage).get, demand=True, retries=0)
    # 0.1, 0.2, 0.4, 0.8, 1.6, then the cap, and the last pause ends at the deadline.
    assert clock.pauses[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0] and max(clock.pauses) == 2.0
    assert sum(clock.pauses) == pytest.approx(10.0) and clock.pauses[-1] < 2.0
    assert (stats.outages, stats.faults_waited, stats.faults_waiting) == (1, 1, 0)
    assert stats.deadline_failures == 1 and stats.outage_seconds == pytest.approx(10.0)
    said = [r.getMessage() for r in caplog.records if r.name == "uffd_async"]
    assert len(said) == 1 and "src is failing: GET src bytes=0-9: refused" in said[0], said


async def test_every_fault_waits_and_the_end_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "uffd_async")
    clock = Clock(monkeypatch)
    monkeypatch.setattr(_outage, "_REPORT_EVERY", 1.0)
    outage, stats = outage_of(ua.SourcePolicy(backoff_cap=0.5))
    down = Down(outage)
    got: list[bytes] = []

    async def fault() -> None:
        got.append(await outage.fetch(down.get, demand=True, retries=0))

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fault)
            await until(lambda: outage.active)
            tg.start_soon(fault)  # one more fault while the source is down
            await until(lambda: stats.faults_waiting == 2 and down.tries >= 20)
            down.up = True
    assert got == [b"bytes", b"bytes"] and not outage.active
    assert (stats.outages, stats.faults_waited, stats.faults_waiting) == (1, 2, 0)
    said = [r.getMessage() for r in caplog.records if r.name == "uffd_async"]
    assert sum(" is failing: " in line for line in said) == 1
    assert sum(" is back after " in line and "2 faults waited" in line for line in said) == 1
    still = sum(" still failing after " in line for line in said)
    # At most once a "minute" (a second here: two tries at least, of 0.5 s pauses at most).
    assert 1 <= still <= sum(clock.pauses) + 1 and still <= down.tries // 2 + 1, said


async def test_a_prefetch_waits_without_counting_as_a_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prefetch's own failures begin an outage only past the retries (which it takes
    outside its slot, from the first pause on)."""
    clock = Clock(monkeypatch)
    outage, stats = outage_of(ua.SourcePolicy())
    with anyio.fail_after(TIMEOUT):
        assert await outage.fetch(Down(outage, 2).get, demand=False, retries=2) == b"bytes"
        assert stats.outages == 0
        assert await outage.fetch(Down(outage, 3).get, demand=False, retries=2) == b"bytes"
    assert stats.outages == 1 and stats.faults_waited == 0 and not outage.active
    assert clock.pauses == [0.1, 0.2, 0.1, 0.2, 0.4]


async def test_a_recovery_wakes_every_sleeper_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real sleep, the longest allowed: the success of another fetch ends it."""
    monkeypatch.setattr(_outage, "random", SimpleNamespace(uniform=lambda low, high: high))
    outage, stats = outage_of(ua.SourcePolicy(backoff_cap=TIMEOUT * 10))
    down = Down(outage)
    got: list[bytes] = []

    async def fault() -> None:  # past ten retries: its first pause is the cap
        got.append(await outage.fetch(down.get, demand=True, retries=10))

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fault)
            await until(lambda: outage.active)
            await anyio.sleep(0.2)  # in its pause
            down.up = True
            outage.succeeded()  # another fetch brought its bytes
    assert got == [b"bytes"] and down.tries == 2 and stats.faults_waiting == 0


# -- waiting it out -----------------------------------------------------------------------


async def test_a_store_gone_mid_restore_is_waited_out(
    place: Path, store: Restartable, caplog: pytest.LogCaptureFixture
) -> None:
    """The store dies after the first chunk and comes back seconds later: the peer,
    stopped on its page meanwhile, finishes with every byte right; the stats and the
    log say what happened, once each way."""
    caplog.set_level(logging.WARNING, "uffd_async")
    url = publish(place, store) + "?X-Amz-Signature=feedface"
    assert store.server is not None
    store.server.delay(100)  # a request lasts: the store dies with one in flight
    outage = ua.SourcePolicy(deadline=TIMEOUT * 4, backoff_cap=QUICK)
    async with ua.HttpSource(url, chunk_size=CHUNK // 4, outage=outage) as source:
        async with running(place, source) as server, anyio.create_task_group() as tg:
            done: list[subprocess.CompletedProcess[bytes]] = []

            async def restore() -> None:
                done.append(await peer(place, all=True))

            tg.start_soon(restore)
            await until(lambda: source.stats.chunks >= 1)
            store.kill()
            await until(lambda: source.stats.faults_waiting >= 1)
            await until(lambda: source.stats.outage_seconds >= 1.0)  # a while: more tries
            assert source.stats.outages == 1 and not done
            store.start()
        result = done[0]
        assert result.returncode == 0 and result.stdout.endswith(b"ok\n"), result.stdout
        await ends_soon(server)
        assert server.stats.errors == 0
    stats = source.stats
    assert stats.outages == 1 and stats.faults_waited >= 1 and stats.faults_waiting == 0
    assert stats.outage_seconds >= 1.0 and stats.deadline_failures == 0
    said = [r.getMessage() for r in caplog.records if r.name == "uffd_async"]
    failing = [line for line in said if " is failing: " in line]
    back = [line for line in said if " is back after " in line]
    assert len(failing) == 1 and len(back) == 1, said
    assert "fault waited" in back[0] or "faults waited" in back[0]
    assert all("feedface" not in line for line in said), said


async def test_a_store_still_gone_at_the_deadline_poisons_the_page(
    place: Path, store: Restartable
) -> None:
    """Past the deadline the page is poisoned: SIGBUS, never a wrong byte."""
    url = publish(place, store)
    outage = ua.SourcePolicy(deadline=1.0, backoff_cap=QUICK)
    async with ua.HttpSource(url, chunk_size=CHUNK, retries=1, outage=outage) as source:
        store.kill()
        async with running(place, source) as server:
            result = await peer(place)
            assert result.returncode == -signal.SIGBUS, result.stdout
            assert b"holds" not in result.stdout  # it never compared a wrong page
            await ends_soon(server)
            assert server.stats.errors >= 1
        stats = source.stats
        assert stats.deadline_failures >= 1 and stats.outages == 1
        assert stats.faults_waited >= 1 and stats.faults_waiting == 0
        assert stats.outage_seconds >= 1.0


async def test_poison_fails_at_once(place: Path, store: Restartable) -> None:
    url = publish(place, store)
    fail_fast = ua.SourcePolicy(on_error="poison")
    async with ua.HttpSource(url, chunk_size=CHUNK, retries=1, outage=fail_fast) as source:
        store.kill()
        async with running(place, source) as server:
            result = await peer(place)
            assert result.returncode == -signal.SIGBUS, result.stdout
            assert b"holds" not in result.stdout
            await ends_soon(server)
        stats = source.stats
        assert stats.outages == stats.faults_waited == stats.deadline_failures == 0
        assert stats.retries == stats.failed == 1  # the quick retry only, then the error


async def test_an_error_that_cannot_heal_is_not_waited_on(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    """A 403 is the request refused, not the store down: the fault fails at once."""
    http_server.put("snap", SOURCE)
    refused = ua.OnError(page="zero", propagate=False)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK) as source:
        assert source.outage.waits
        http_server.queue("403")
        async with restoring(lab, source, on_error=refused) as (region, server):
            assert (await read_pages(lab, region, [5]))[5] == bytes(P)
            assert server.stats.errors == 1
        assert source.stats.outages == source.stats.faults_waited == 0


async def test_a_blip_within_the_retries_is_no_outage(
    http_server: HttpObjectServer, lab: Lab
) -> None:
    http_server.put("snap", SOURCE)
    async with ua.HttpSource(http_server.url("snap"), chunk_size=CHUNK, retries=2) as source:
        http_server.queue("503", "drop")
        async with restoring(lab, source) as (region, server):
            assert (await read_pages(lab, region, [40]))[40] == SOURCE[40 * P : 41 * P]
            assert server.stats.errors == 0
        assert source.stats.retries == 2 and source.stats.outages == 0


# -- prefetch in an outage ------------------------------------------------------------------


async def test_prefetch_stands_down_and_resumes_after_the_demand(
    store: Restartable, lab: Lab
) -> None:
    """A replay of every chunk meets the outage: it sends no retries of its own while a
    fault waits (a prefetch never sleeps holding a connection), the fault's chunk is
    among the first the store serves when it is back, and the replay then finishes."""
    assert store.server is not None
    store.server.put("snap", SOURCE)
    outage = ua.SourcePolicy(deadline=TIMEOUT * 4, backoff_cap=QUICK)
    url = store.server.url("snap")
    async with ua.HttpSource(url, chunk_size=CHUNK, concurrency=2, outage=outage) as source:
        everything = [chunk * PER_CHUNK for chunk in range(PAGES // PER_CHUNK)]
        ws = ua.WorkingSet(
            snapshot_size=source.size, identity=await source.identity(), pages=everything
        )
        store.kill()
        region = lab.anonymous(PAGES)
        uffd = lab.uffd()
        uffd.register(region.address, region.length, ua.Mode.MISSING)
        resolver = ua.copy_from(source, base=region.address)
        demand = 20  # a chunk far from where the replay stands (it goes in order)
        async with ua.FaultServer(uffd, resolver), anyio.create_task_group() as tg:
            replayed: list[ua.PrefetchStats] = []
            got: dict[int, bytes] = {}

            async def replay() -> None:
                replayed.append(await ua.prefetch(uffd, resolver, ws))

            async def fault() -> None:
                got.update(await read_pages(lab, region, [demand * PER_CHUNK + 3]))

            tg.start_soon(replay)
            await until(lambda: source.stats.outages == 1)
            tg.start_soon(fault)
            await until(lambda: source.stats.faults_waiting == 1)
            sent, retried = source.stats.requests, source.stats.retries
            await until(lambda: source.stats.requests >= sent + 3)  # tries go on
            assert source.stats.retries == retried, "a fetch retried in its slot"
            server = store.start()
        assert got[demand * PER_CHUNK + 3] == SOURCE[(demand * PER_CHUNK + 3) * P :][:P]
        assert replayed[0].working_set_done and not source.stats.faults_waiting
        first = served_chunks(server)
        # A probe may go first, and the replay's next chunk beside the fault's (two slots).
        assert demand in first[:3], first
        assert sorted(set(first)) == list(range(PAGES // PER_CHUNK))
        assert source.stats.outages == 1 and source.stats.faults_waited == 1


# -- a pack whose chunks go away ----------------------------------------------------------


async def test_a_packs_chunks_gone_for_a_while_are_waited_for(
    place: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error reading a chunk (its directory gone, as an NFS tier's) is waited out;
    a damaged chunk is not (test_pack's corrupted-chunk test: SIGBUS at once)."""
    snapshot = snapshot_for(place)
    result = ua.pack_snapshot(snapshot, place / "pack", chunk_size=CHUNK)
    chunks, away = place / "pack" / "chunks", place / "pack" / "away"
    outage = ua.SourcePolicy(deadline=TIMEOUT * 4, backoff_cap=QUICK)
    caplog.set_level(logging.WARNING, "uffd_async")
    async with ua.PackSource(result.index, outage=outage) as source:
        chunks.rename(away)
        async with running(place, source) as server, anyio.create_task_group() as tg:
            done: list[subprocess.CompletedProcess[bytes]] = []

            async def restore() -> None:
                done.append(await peer(place, all=True))

            tg.start_soon(restore)
            await until(lambda: source.stats.faults_waiting >= 1)
            await until(lambda: source.stats.failed >= 3)  # tried again, and again
            assert not done and source.stats.outages == 1
            away.rename(chunks)
        assert done[0].returncode == 0 and done[0].stdout.endswith(b"ok\n"), done[0].stdout
        await ends_soon(server)
        assert server.stats.errors == 0
    assert source.stats.outages == 1 and source.stats.faults_waited >= 1
    assert source.stats.faults_waiting == 0 and source.stats.deadline_failures == 0
    back = [r.getMessage() for r in caplog.records if " is back after " in r.getMessage()]
    assert len(back) == 1 and str(result.index) in back[0], back


async def test_a_pack_with_poison_fails_at_once(place: Path) -> None:
    snapshot = snapshot_for(place)
    result = ua.pack_snapshot(snapshot, place / "pack", chunk_size=CHUNK)
    (place / "pack" / "chunks").rename(place / "pack" / "away")
    fail_fast = ua.SourcePolicy(on_error="poison")
    async with ua.PackSource(result.index, outage=fail_fast) as source:
        with pytest.raises(ua.PackError, match="cannot be read"):
            await source.chunk(1)
        assert source.stats.outages == 0


# -- S3 (moto) behind a proxy that goes away ------------------------------------------------


class Proxy:
    """A TCP proxy on loopback to ``target``: ``stop()`` closes its listener and every
    connection (refused, reset), ``start()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=TIMEOUT)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:  # the second pipe of the pair closes them
                if source in self._open:
                    self._open.discard(source)
                else:
                    source.close()
                if sink in self._open:
                    self._open.discard(sink)
                else:
                    sink.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ._object_stores import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as moto:
        yield moto


async def test_s3_gone_for_a_while_is_waited_out(s3: Any, lab: Lab) -> None:
    s3.put("outage", SOURCE)
    host, port = s3.endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = Proxy((host, int(port)))
    proxy.start()
    try:
        options = s3.options(endpoint=f"http://127.0.0.1:{proxy.port}")
        outage = ua.SourcePolicy(deadline=TIMEOUT * 4, backoff_cap=QUICK)
        url = f"s3://{s3.bucket}/outage"
        async with ua.ObjectSource(
            url, options=options, chunk_size=CHUNK, retries=1, outage=outage
        ) as source:
            async with restoring(lab, source) as (region, server), anyio.create_task_group() as tg:
                got: dict[int, bytes] = {}

                async def fault() -> None:
                    got.update(await read_pages(lab, region, [33, 200]))

                proxy.stop()
                tg.start_soon(fault)
                await until(lambda: source.stats.faults_waiting == 2)
                await until(lambda: source.stats.failed >= 4)
                assert not got
                proxy.start()
            assert got == {n: SOURCE[n * P : (n + 1) * P] for n in (33, 200)}
            assert server.stats.errors == 0
        assert source.stats.outages == 1 and source.stats.faults_waited == 2
    finally:
        proxy.stop()


# -- the command line ---------------------------------------------------------------------


def test_the_flags_are_refused_where_nothing_is_fetched(place: Path) -> None:
    snapshot = snapshot_for(place)
    socket_path = str(place / "uffd.sock")
    for flags, words in (
        (["--on-source-error", "poison"], "--on-source-error: applies only when SNAPSHOT is a URL"),
        (["--source-deadline", "30"], "--source-deadline: applies only when SNAPSHOT is a URL"),
        (["--on-source-error", "never"], "invalid choice: 'never'"),
        (["--source-deadline", "0"], "must be more than 0 seconds"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "uffd_async", "serve", str(snapshot), "--socket", socket_path,
             *flags],
            capture_output=True, timeout=TIMEOUT * 3, check=False,
        )  # fmt: skip
        assert run.returncode == 2 and words in run.stderr.decode(), run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "uffd_async", "serve", "http://127.0.0.1:9/o/x", "--socket",
         socket_path, "--on-source-error", "poison", "--source-deadline", "9"],
        capture_output=True, timeout=TIMEOUT * 3, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "--source-deadline: applies with --on-source-error wait only" in run.stderr.decode()


def test_the_command_line_waits_out_an_outage_and_says_so(place: Path, store: Restartable) -> None:
    url = publish(place, store)
    argv = ["serve", url, "--socket", str(place / "uffd.sock"), "--interval", "0.05"]
    argv += ["--chunk-size", "64KiB", "--source-deadline", "60", "--retries", "1"]
    argv += ["--metrics", "127.0.0.1:0"]
    code = f"import sys\nfrom uffd_async.__main__ import main\nsys.exit(main({argv!r}))"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as serving:
        try:
            assert serving.stderr is not None
            log = read_until(serving.stderr, b"listening")
            metrics_url = log.decode().split("metrics: ", 1)[1].split()[0]
            store.kill()

            async def restore() -> subprocess.CompletedProcess[bytes]:
                async with anyio.create_task_group() as tg:
                    done: list[subprocess.CompletedProcess[bytes]] = []

                    async def run() -> None:
                        done.append(await peer(place, all=True))

                    tg.start_soon(run)
                    with anyio.fail_after(TIMEOUT):
                        while scrape(metrics_url).get("uffd_async_source_faults_waiting") != 1:
                            await anyio.sleep(0.05)
                    store.start()
                return done[0]

            result = anyio.run(restore)
            assert result.returncode == 0 and result.stdout.endswith(b"ok\n"), result.stdout
            log += read_until(serving.stderr, b" is back after ")
            if b"connections 1 (0 active" not in log:  # it may have come in the same read
                log += read_until(serving.stderr, b"connections 1 (0 active")
            metrics = scrape(metrics_url)
            log += stop(serving)
        finally:
            if serving.poll() is None:
                serving.kill()
            serving.communicate(timeout=TIMEOUT)
    text = log.decode()
    assert text.count(" is failing: ") == 1 and "ConnectError" in text, text
    assert metrics["uffd_async_source_outages_total"] == 1
    assert metrics["uffd_async_source_faults_waited_total"] == 1
    assert metrics["uffd_async_source_faults_waiting"] == 0
    assert metrics["uffd_async_source_outage_seconds_total"] > 0
    assert metrics["uffd_async_source_deadline_failures_total"] == 0
