"""Record a working set from a real process, replay it into the next one (issue 11).

The peer below is a Firecracker 1.12 handoff (``_firecracker_peer``'s functions:
two 4 KiB-page regions laid end to end in the snapshot, registered MISSING, the
uffd sent with the mappings) that then touches chosen snapshot pages, in order,
from plain Python, and compares each with the file. It can wait for a line on
stdin before touching (so a test can let a prefetch finish first), and read
everything at the end. The server is ``serve_handoffs`` in this process (both
event loops) or the command line in its own. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async.__main__ import main
from uffd_async._restore._native_replay import native_replay
from uffd_async._restore._replay import Replay

from ._processes import read_until
from ._support import TIMEOUT
from .test_firecracker import PEER, cli_server, ends_soon, place, running, stop

__all__ = ["place"]  # a fixture, used by name

P = ua.PAGE_SIZE
PAGES = 64  # of each of the two regions: the snapshot has 2 * PAGES pages

REPLAY_PEER = (
    PEER.rsplit('\nif __name__ == "__main__":', 1)[0]
    + """

def replay_main() -> None:
    config = json.loads(sys.argv[1])
    signal.alarm(60)
    page_size, pages = config["page_size"], config["pages"]
    size = pages * page_size
    uffd = open_uffd()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    regions = [mmap.mmap(-1, size, flags=flags) for _ in range(2)]
    addresses = [ctypes.addressof(ctypes.c_char.from_buffer(region)) for region in regions]
    for address in addresses:
        fcntl.ioctl(uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", address, size, 1, 0)))
    declared = [(address, size, index * size) for index, address in enumerate(addresses)]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(config["socket"])
    sock.sendmsg([firecracker_message("1.12", declared, page_size)],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]))])
    print("sent", flush=True)
    if config.get("wait"):
        sys.stdin.readline()
    snapshot = open(config["snapshot"], "rb")
    order = list(config["touch"]) + (list(range(2 * pages)) if config.get("all") else [])
    for page in order:
        region, offset = divmod(page * page_size, size)
        got = ctypes.string_at(addresses[region] + offset, page_size)
        snapshot.seek(page * page_size)
        if got != snapshot.read(page_size):
            print(f"snapshot page {page} holds {got[:16]!r}", flush=True)
            os._exit(1)
    print("ok", flush=True)


replay_main()
"""
)

#: A boot-like order: runs here and there, in both regions, some pages twice.
TOUCH = [70, 71, 72, 73, 5, 6, 7, 100, 3, 71, 64, 65, 120, 121, 122, 123, 124, 0, 6, 30]
RECORDED = tuple(dict.fromkeys(TOUCH))  # first touch first, no repeats


def snapshot_for(place: Path, pages: int = 2 * PAGES, seed: int = 1) -> Path:
    path = place / "guest.mem"
    path.write_bytes(random.Random(seed).randbytes(pages * P))
    path.chmod(0o644)
    return path


def peer_config(place: Path, touch: list[int] | tuple[int, ...], pages: int = PAGES,
                **extra: Any) -> str:  # fmt: skip
    return json.dumps(
        {
            "socket": str(place / "uffd.sock"),
            "snapshot": str(place / "guest.mem"),
            "page_size": P,
            "pages": pages,
            "touch": list(touch),
            **extra,
        }
    )


async def run_peer(configuration: str) -> None:
    with anyio.fail_after(TIMEOUT * 3):
        result = await anyio.run_process(
            [sys.executable, "-c", REPLAY_PEER, configuration], check=False,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    output = result.stdout.decode()
    assert result.returncode == 0 and output.endswith("ok\n"), output


async def until(condition: Any) -> None:
    with anyio.fail_after(TIMEOUT):
        while not condition():
            await anyio.sleep(0.002)


async def run_waiting_peer(configuration: str, ready: Any) -> None:
    """The peer hands over, then waits until ``ready()`` holds before it touches a page."""
    async with await anyio.open_process(
        [sys.executable, "-c", REPLAY_PEER, configuration], stderr=subprocess.STDOUT
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        with anyio.fail_after(TIMEOUT * 3):
            output = await process.stdout.receive()
            assert output.startswith(b"sent"), output
            await until(ready)
            await process.stdin.send(b"go\n")
            async for chunk in process.stdout:
                output += chunk
            assert await process.wait() == 0, output
    assert output.endswith(b"ok\n"), output


async def record(place: Path, ws: Path, touch: list[int] | tuple[int, ...] = TOUCH) -> None:
    async with running(place, place / "guest.mem", record=ws) as server:
        await run_peer(peer_config(place, touch))
        await ends_soon(server)
        assert server.stats.faults == len(set(touch))


# -- record, then replay --------------------------------------------------------------


@pytest.mark.anyio
async def test_record_the_pages_a_process_touches(place: Path) -> None:
    snapshot = snapshot_for(place)
    ws_path = place / "boot.ws"
    await record(place, ws_path)
    ws = ua.WorkingSet.load(ws_path)
    assert ws.pages == RECORDED, "not the snapshot pages touched, in first-touch order"
    with ua.Snapshot(snapshot) as opened:
        assert ws.matches(opened.size, opened.identity)
    assert ws.snapshot_size == 2 * PAGES * P and ws.page_size == P


@pytest.mark.anyio
async def test_processes_recorded_by_one_server_merge(place: Path) -> None:
    """Two processes, one after the other: the union, in order of first appearance, saved
    when each handoff ends. A server started again records afresh (without --prefetch)."""
    snapshot_for(place)
    ws_path = place / "boot.ws"
    async with running(place, place / "guest.mem", record=ws_path) as server:
        await run_peer(peer_config(place, TOUCH))
        await ends_soon(server)
        assert ua.WorkingSet.load(ws_path).pages == RECORDED  # saved as the handoff ended
        await run_peer(peer_config(place, [3, 90, 91, 70, 11]))
        await ends_soon(server)
    assert ua.WorkingSet.load(ws_path).pages == (*RECORDED, 90, 91, 11)
    await record(place, ws_path, [9, 8])
    assert ua.WorkingSet.load(ws_path).pages == (9, 8)


@pytest.mark.anyio
async def test_replay_prefetches_the_set_before_the_process_needs_it(place: Path) -> None:
    snapshot_for(place)
    ws_path = place / "boot.ws"
    await record(place, ws_path)
    async with running(place, place / "guest.mem", prefetch=ws_path) as server:
        await run_waiting_peer(
            peer_config(place, TOUCH, wait=True),
            lambda: server.stats.prefetched >= len(RECORDED),
        )
        await ends_soon(server)
        stats = server.stats
    assert stats.prefetched == len(RECORDED)
    assert stats.faults == 0, "the working set was prefetched, yet the process faulted on it"
    assert (stats.served, stats.failed, stats.errors, stats.resident) == (1, 0, 0, 0)


@pytest.mark.anyio
async def test_replay_concurrently_and_read_everything(place: Path) -> None:
    """No waiting: the process runs while the set is copied in: every byte right."""
    snapshot_for(place)
    ws_path = place / "boot.ws"
    await record(place, ws_path)
    async with running(place, place / "guest.mem", prefetch=ws_path) as server:
        await run_peer(peer_config(place, TOUCH, all=True))
        await ends_soon(server)
        stats = server.stats
    assert stats.pages == 2 * PAGES and stats.errors == 0  # each page filled once
    # How many faults the server reads depends on the race: a fault in a set's run brings
    # the rest of the run (see guide), one outside the set 15 pages behind it, and while
    # the native replay runs its thread answers the faults itself.
    assert stats.faults <= 2 * PAGES - len(RECORDED)
    # Every page outside the set came by a fault (16 pages at most each), read by the server
    # or answered by the replay's thread.
    assert stats.faults + stats.faults_answered >= -(-(2 * PAGES - len(RECORDED)) // 16)


@pytest.mark.anyio
async def test_populate_all_makes_the_process_resident(place: Path) -> None:
    snapshot_for(place)
    ws_path = place / "boot.ws"
    await record(place, ws_path)
    async with running(place, place / "guest.mem", prefetch=ws_path, populate=True) as server:
        await run_waiting_peer(
            peer_config(place, TOUCH, wait=True, all=True),
            lambda: server.stats.prefetched >= 2 * PAGES,
        )
        await ends_soon(server)
        stats = server.stats
    assert (stats.prefetched, stats.faults, stats.resident) == (2 * PAGES, 0, 1)
    # It has exited: nothing is resident now (its 100% is gone with it).
    assert (stats.populated, stats.populated_pages, stats.mapped_pages) == (0.0, 0, 0)


@pytest.mark.anyio
async def test_recording_while_populating_records_demand_faults_only(place: Path) -> None:
    """Recording beside a populate: the pages the prefetcher copies are not demand."""
    snapshot_for(place)
    ws_path = place / "boot.ws"
    async with running(place, place / "guest.mem", record=ws_path, populate=True) as server:
        await run_peer(peer_config(place, TOUCH))
        await ends_soon(server)
        faults = server.stats.faults
    if faults:  # those the process got to first (a fault the prefetch beat is not one)
        recorded = ua.WorkingSet.load(ws_path).pages
        assert 0 < len(recorded) <= faults and set(recorded) <= set(RECORDED)
    else:
        assert not ws_path.exists()  # nothing recorded, nothing saved


def test_a_set_for_a_snapshot_of_another_size_says_both_sizes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorded = ua.WorkingSet(snapshot_size=8 * P, identity=b"\1" * 16, pages=(0, 1))
    replay = Replay(prefetch=recorded)
    replay.open(16 * P, b"\1" * 16)
    assert f"recorded for another snapshot (size {8 * P}, not {16 * P})" in caplog.text
    assert replay.working_set is None  # not replayed


@pytest.mark.anyio
async def test_a_set_recorded_for_another_snapshot_is_not_replayed(
    place: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot_for(place, seed=1)
    ws_path = place / "boot.ws"
    await record(place, ws_path)
    snapshot_for(place, seed=2)  # same size, other contents
    async with running(place, place / "guest.mem", prefetch=ws_path) as server:
        await run_peer(peer_config(place, TOUCH, all=True))
        await ends_soon(server)
        stats = server.stats
    assert "recorded for another snapshot (other contents)" in caplog.text
    assert "serving lazily" in caplog.text and "size" not in caplog.text  # the same size
    assert (stats.prefetched, stats.faults, stats.errors) == (0, 2 * PAGES, 0)


@pytest.mark.anyio
async def test_record_and_replay_refines_the_set(place: Path) -> None:
    snapshot_for(place)
    ws_path = place / "boot.ws"
    await record(place, ws_path)
    async with running(place, place / "guest.mem", prefetch=ws_path, record=ws_path) as server:
        await run_waiting_peer(
            peer_config(place, [*TOUCH, 40, 41, 5], wait=True),
            lambda: server.stats.prefetched >= len(RECORDED),
        )
        await ends_soon(server)
        assert server.stats.faults == 2
    assert ua.WorkingSet.load(ws_path).pages == (*RECORDED, 40, 41)


# -- what is refused -----------------------------------------------------------------


def test_options_that_do_not_go_together(place: Path) -> None:
    snapshot = snapshot_for(place)
    sock = place / "uffd.sock"
    with pytest.raises(ua.InvalidArgument, match="record with readahead=0"):
        ua.HandoffServer(sock, snapshot, record=place / "ws", readahead=15)
    with pytest.raises(ua.InvalidArgument, match="apply to snapshot sources"):
        ua.HandoffServer(sock, lambda handoff: ua.zero_fill(), record=place / "ws")
    with pytest.raises(ua.InvalidArgument, match="cannot read the working set"):
        ua.HandoffServer(sock, snapshot, prefetch=place / "missing.ws")
    with pytest.raises(TypeError, match="populate must be a bool"):
        ua.HandoffServer(sock, snapshot, populate="all")  # type: ignore[arg-type]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_working_set_file_is_refused_at_construction(place: Path, damage: str) -> None:
    snapshot = snapshot_for(place)
    path = place / "boot.ws"
    data = bytearray(ua.WorkingSet(snapshot_size=2 * PAGES * P, identity=bytes(32),
                                   pages=RECORDED).to_bytes())  # fmt: skip
    if damage == "flip":
        data[-7] ^= 1
    elif damage == "truncate":
        del data[-3:]
    else:
        data.clear()
    path.write_bytes(data)
    with pytest.raises(ua.WorkingSetError, match=f"^{path}: .*(damaged|truncated)"):
        ua.HandoffServer(place / "uffd.sock", snapshot, prefetch=path)


# -- the process exits while its prefetch runs -----------------------------------------


@pytest.mark.anyio
async def test_a_process_killed_mid_prefetch(place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Populating 2 x 8 MiB in 2 MiB runs, the process is killed (and gone) before the
    third run: that run meets ESRCH, the prefetch ends quietly, so does the handoff,
    and nothing is left open (the leak guard checks the fds)."""
    pages = (8 << 20) // P
    snapshot_for(place, 2 * pages)
    victim: list[int] = []
    calls: list[int] = []
    real = ua.SnapshotResolver.prefetch_pages

    def _prefetch(self: ua.SnapshotResolver, uffd: ua.Userfaultfd, first: int, n: int) -> None:
        calls.append(first)
        if len(calls) == 3:
            os.kill(victim[0], signal.SIGKILL)
            gone(victim[0])
        real(self, uffd, first, n)

    monkeypatch.setattr(ua.SnapshotResolver, "prefetch_pages", _prefetch)
    with native_replay(False):  # the loop's runs, counted above
        async with running(place, place / "guest.mem", populate=True) as server:
            async with await anyio.open_process(
                [sys.executable, "-c", REPLAY_PEER, peer_config(place, [], pages, wait=True)]
            ) as process:
                victim.append(process.pid)
                with anyio.fail_after(TIMEOUT):
                    assert await process.wait() == -signal.SIGKILL
            await ends_soon(server)
            stats = server.stats
    assert len(calls) == 3, "the prefetch went on after the process was gone"
    assert stats.prefetched == 2 * (2 << 20) // P  # the two runs before
    assert (stats.served, stats.active, stats.failed, stats.errors, stats.resident) == (
        1, 0, 0, 0, 0,
    )  # fmt: skip


@pytest.mark.anyio
async def test_a_process_killed_mid_native_replay(place: Path) -> None:
    """Populating 2 x 64 MiB natively, the process is killed once a thousand pages are
    in: the thread meets ESRCH (or finds the uffd gone), the prefetch and the handoff
    end quietly, nothing is left open (the leak guard checks the fds and threads)."""
    pages = (64 << 20) // P
    snapshot_for(place, 2 * pages)
    async with running(place, place / "guest.mem", populate=True) as server:
        async with await anyio.open_process(
            [sys.executable, "-c", REPLAY_PEER, peer_config(place, [], pages, wait=True)]
        ) as process:
            with anyio.fail_after(TIMEOUT):
                while server.stats.prefetched < 1000:
                    await anyio.sleep(0)
                process.kill()
                assert await process.wait() == -signal.SIGKILL
        await ends_soon(server)
        stats = server.stats
    assert 1000 <= stats.prefetched < 2 * pages, "killed after the replay ended: no test"
    assert (stats.served, stats.active, stats.failed, stats.errors, stats.resident) == (
        1, 0, 0, 0, 0,
    )  # fmt: skip


def gone(pid: int) -> None:
    """Block (bounded) until ``pid`` is a zombie: its memory is gone."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} still alive {TIMEOUT}s after SIGKILL")


# -- the command line ----------------------------------------------------------------


def test_the_command_line_records_replays_and_shows(
    place: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot_for(place)
    ws_path = place / "boot.ws"
    with cli_server(place, "--record", str(ws_path)) as server:
        assert server.stderr is not None
        read_until(server.stderr, b"listening")
        anyio.run(run_peer, peer_config(place, TOUCH))
        read_until(server.stderr, b"connections 1 (0 active")
        stop(server)
    assert ua.WorkingSet.load(ws_path).pages == RECORDED
    with cli_server(place, "--prefetch", str(ws_path), "--populate", "all") as server:
        assert server.stderr is not None
        read_until(server.stderr, b"listening")
        with subprocess.Popen(
            [sys.executable, "-c", REPLAY_PEER, peer_config(place, TOUCH, wait=True, all=True)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ) as peer:  # fmt: skip
            assert peer.stdout is not None and peer.stdin is not None
            read_until(peer.stdout, b"sent")
            log = read_until(server.stderr, f"prefetched {2 * PAGES}  ".encode())
            output, _ = peer.communicate(b"go\n", timeout=TIMEOUT * 3)
            assert peer.returncode == 0 and output.endswith(b"ok\n"), output
        log += read_until(server.stderr, b"fully resident 1")
        log += stop(server)
    text = log.decode()
    # While it ran: every page resident, the prefetched ones among them.
    assert f"resident {2 * PAGES} of {2 * PAGES} pages (100%)  prefetched {2 * PAGES}  " in text
    final = text.rsplit("stopped;", 1)[1]
    assert "faults 0 " in final and f"prefetched {2 * PAGES}  fully resident 1" in final
    assert "resident 0 of" not in final and " pages (" not in final  # nobody is served now
    with ua.Snapshot(place / "guest.mem") as snapshot:
        identity = snapshot.identity.hex()
    capsys.readouterr()
    assert main(["working-set", "show", str(ws_path)]) == 0
    shown = capsys.readouterr().out
    runs = list(ua.WorkingSet.load(ws_path).runs())
    assert f"working set: {ws_path} ({ws_path.stat().st_size:,} bytes)" in shown
    assert f"pages: {len(RECORDED)} of 4096 bytes (0.1 MiB, " in shown
    assert f"of the snapshot) in {len(runs)} runs" in shown
    assert f"runs: longest 5 pages, mean {len(RECORDED) / len(runs):,.1f}" in shown
    assert "first runs (page+count, in first-touch order): 70+4, 5+3, 100+1, 3+1," in shown
    assert f"snapshot: {2 * PAGES * P:,} bytes, identity {identity}" in shown
    ws_path.write_bytes(ws_path.read_bytes()[:-1])
    assert main(["working-set", "show", str(ws_path)]) == 1
    assert "cannot read the working set" in capsys.readouterr().err
