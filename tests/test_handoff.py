"""The Firecracker handoff: the mappings message, and a uffd passed between real processes.

Hostile peers are real sockets sending real fds; every refusal must close
what arrived, which the autouse leak guard (and an explicit fd count) checks.
"""

from __future__ import annotations

import array
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import uffd_async as ua
from uffd_async import (
    GuestMapping,
    Handoff,
    HandoffError,
    HandoffRefused,
    HandoffTimeout,
    encode_mappings,
    parse_mappings,
    receive_uffd,
    send_uffd,
)
from uffd_async._core._open import Method, open_raw
from uffd_async._handoff._transfer import STREAM_MESSAGE_LIMIT
from uffd_async._handoff._wire import FIELDS
from uffd_async._serve._peer_lifetime import PeerExit

from ._support import TIMEOUT, Lab, pattern

P = ua.PAGE_SIZE
HUGE = 2 * 1024 * 1024
BASE = 0x7F00_0000_0000
U64 = 1 << 64


def region_json(**fields: Any) -> dict[str, Any]:
    """One mapping object as Firecracker sends it; ``field=None`` leaves the field out."""
    item: dict[str, Any] = {"base_host_virt_addr": BASE, "size": 4 * P, "offset": 0, "page_size": P}
    item.update(fields)
    return {key: value for key, value in item.items() if value is not None}


def message(*items: dict[str, Any]) -> bytes:
    return json.dumps(list(items)).encode()


def guest(base: int = BASE, size: int = 4 * P, offset: int = 0, page_size: int = P) -> GuestMapping:
    return GuestMapping(base_host_virt_addr=base, size=size, offset=offset, page_size=page_size)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- the message, without I/O -------------------------------------------------


def test_parses_firecracker_message() -> None:
    data = message(
        region_json(base_host_virt_addr=BASE, size=0x20000, offset=0),
        region_json(base_host_virt_addr=BASE + 0x40000, size=0x4000, offset=0x20000),
    )
    assert parse_mappings(data, backing_size=0x24000) == [
        guest(BASE, 0x20000, 0),
        guest(BASE + 0x40000, 0x4000, 0x20000),
    ]


def test_page_size_kib_is_the_older_name_and_holds_bytes() -> None:
    data = message(
        region_json(page_size=None, page_size_kib=HUGE, size=HUGE, base_host_virt_addr=0)
    )
    assert parse_mappings(data) == [guest(0, HUGE, 0, HUGE)]


def test_unknown_fields_are_ignored() -> None:
    assert parse_mappings(message(region_json(future_field={"x": [1]}))) == [guest()]


def test_encode_sends_what_firecracker_1_12_sends_and_round_trips() -> None:
    mappings = [guest(BASE, 4 * P, 0), guest(BASE + 8 * HUGE, HUGE, 4 * HUGE, HUGE)]
    data = encode_mappings(mappings)
    assert [list(item) for item in json.loads(data)] == [[*FIELDS, "page_size_kib"]] * 2
    assert json.loads(data)[1]["page_size"] == json.loads(data)[1]["page_size_kib"] == HUGE
    assert parse_mappings(data) == mappings


def test_encode_refuses_what_a_handler_would_refuse() -> None:
    with pytest.raises(HandoffError, match="overlaps"):
        encode_mappings([guest(BASE), guest(BASE + P)])
    with pytest.raises(HandoffError, match="no mappings"):
        encode_mappings([])


REFUSED = {
    "not utf-8": (b"\xff\xfe[]", "not UTF-8 JSON", None, None),
    "garbage": (b'[{"base_host_virt_addr": 4096,', "not UTF-8 JSON", None, None),
    "object, not array": (json.dumps(region_json()).encode(), "must be a JSON array", None, None),
    "string": (b'"hello"', "must be a JSON array of objects, not a string", None, None),
    "empty array": (b"[]", "lists no mappings", None, None),
    "array of numbers": (b"[1]", "mapping 0 must be a JSON object, not a number", 0, None),
    "missing size": (message(region_json(size=None)), "mapping 0 has no 'size' field", 0, "size"),
    "page sizes that differ": (
        message(region_json(page_size_kib=HUGE)),
        "has 'page_size' 4096 but 'page_size_kib' 2097152",
        0,
        "page_size_kib",
    ),
    "bool": (
        message(region_json(size=True)),
        "'size' must be an integer, not a boolean",
        0,
        "size",
    ),
    "float": (message(region_json(page_size=4096.0)), "not a number (4096.0)", 0, "page_size"),
    "string number": (message(region_json(offset="0")), "not a string", 0, "offset"),
    "null": (
        message({**region_json(), "offset": None}),
        "'offset' must be an integer, not null",
        0,
        "offset",
    ),
    "second mapping lacks a field": (
        message(region_json(), region_json(base_host_virt_addr=BASE + 4 * P, offset=None)),
        "mapping 1 has no 'offset' field",
        1,
        "offset",
    ),
    "negative": (
        message(region_json(base_host_virt_addr=-P)),
        "outside the unsigned 64-bit range",
        0,
        "base_host_virt_addr",
    ),
    "past u64": (message(region_json(offset=U64)), "outside the unsigned 64-bit", 0, "offset"),
    "page size not a power of two": (
        message(region_json(page_size=3 * P, size=3 * P)),
        "not a power of two",
        0,
        "page_size",
    ),
    "page size too small": (message(region_json(page_size=2048)), "at least 4096", 0, "page_size"),
    "page size zero": (message(region_json(page_size=0)), "not a power of two", 0, "page_size"),
    "empty mapping": (message(region_json(size=0)), "'size' is 0", 0, "size"),
    "unaligned base": (
        message(region_json(base_host_virt_addr=BASE + 512)),
        "'base_host_virt_addr' 0x7f0000000200 is not a multiple of its page_size 0x1000",
        0,
        "base_host_virt_addr",
    ),
    "unaligned size": (message(region_json(size=P + 1)), "not a multiple", 0, "size"),
    "unaligned offset": (message(region_json(offset=P // 2)), "not a multiple", 0, "offset"),
    "base unaligned to its huge page": (
        message(region_json(base_host_virt_addr=BASE + P, page_size=HUGE, size=HUGE)),
        "0x7f0000001000 is not a multiple of its page_size 0x200000",
        0,
        "base_host_virt_addr",
    ),
    "base overflows": (
        message(region_json(base_host_virt_addr=U64 - P, size=2 * P)),
        "overflows 64 bits",
        0,
        "base_host_virt_addr",
    ),
    "offset overflows": (
        message(region_json(offset=U64 - P, size=2 * P)),
        "overflows 64 bits",
        0,
        "offset",
    ),
    "overlap": (
        message(region_json(), region_json(base_host_virt_addr=BASE + 3 * P, offset=4 * P)),
        "mapping 1 [0x7f0000003000, 0x7f0000007000) overlaps mapping 0",
        1,
        "base_host_virt_addr",
    ),
    "duplicate key": (b'[{"size": 4096, "size": 8192}]', "repeats the key 'size'", None, None),
    "deep nesting": (b"[" * 100_000, "not UTF-8 JSON", None, None),
    "huge integer": (b"[" + b"9" * 5000 + b"]", "not UTF-8 JSON", None, None),
}


@pytest.mark.parametrize(("data", "match", "index", "field"), REFUSED.values(), ids=REFUSED)
def test_refused_messages(data: bytes, match: str, index: int | None, field: str | None) -> None:
    with pytest.raises(HandoffError) as info:
        parse_mappings(data)
    assert match in str(info.value)
    assert (info.value.mapping, info.value.field) == (index, field)
    assert info.value.errno == 71  # EPROTO
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ua.UffdError)


def test_mappings_must_fit_the_backing_memory() -> None:
    with pytest.raises(
        HandoffError, match=r"mapping 0: 'offset' 0x4000 \+ 'size' 0x4000 ends past"
    ):
        parse_mappings(message(region_json(offset=4 * P)), backing_size=4 * P)
    two = message(region_json(), region_json(base_host_virt_addr=BASE + 4 * P))
    with pytest.raises(HandoffError, match="total 32768 bytes, more than the 16384-byte"):
        parse_mappings(two, backing_size=4 * P)
    assert len(parse_mappings(two, backing_size=8 * P)) == 2


def test_max_regions() -> None:
    data = encode_mappings([guest(BASE + i * P, P, i * P) for i in range(5)])
    assert len(parse_mappings(data, max_regions=5)) == 5
    with pytest.raises(HandoffError, match="5 mappings, more than max_regions=4"):
        parse_mappings(data, max_regions=4)


def check_valid(mappings: list[GuestMapping], backing_size: int | None = None) -> None:
    """What parse_mappings promises of whatever it returns, checked independently."""
    assert mappings
    for m in mappings:
        assert m.page_size >= 4096 and bin(m.page_size).count("1") == 1
        assert m.size > 0
        for value in (m.base_host_virt_addr, m.size, m.offset):
            assert type(value) is int and value % m.page_size == 0
        assert m.end <= U64 and m.offset + m.size <= U64
        if backing_size is not None:
            assert m.offset + m.size <= backing_size
    spans = sorted((m.base_host_virt_addr, m.end) for m in mappings)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def parses_or_refuses(data: bytes, backing_size: int | None = None) -> None:
    try:
        mappings = parse_mappings(data, backing_size=backing_size)
    except HandoffError:
        return
    check_valid(mappings, backing_size)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_raise_handoff_error(data: bytes) -> None:
    parses_or_refuses(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_arbitrary_json_parses_or_raises_handoff_error(value: object) -> None:
    parses_or_refuses(json.dumps(value).encode())


# Numbers near every boundary the validator draws, so that some mappings pass.
edgy_numbers = st.one_of(
    st.sampled_from([0, 1, 2048, P, 3 * P, HUGE, 1 << 30, U64 - P, U64 - 1, U64, -P]),
    st.integers(0, 64).map(lambda pages: pages * P),
    st.integers(-(1 << 70), 1 << 70),
    st.booleans(),
    st.floats(),
)
field_names = st.sampled_from([*FIELDS, "page_size_kib", "extra"])
mapping_objects = st.dictionaries(field_names, edgy_numbers, min_size=3, max_size=6)


@given(st.lists(mapping_objects, max_size=4), st.none() | st.integers(0, 64 * P))
def test_nearly_valid_mappings_parse_or_raise_handoff_error(
    items: list[dict[str, Any]], backing_size: int | None
) -> None:
    parses_or_refuses(json.dumps(items).encode(), backing_size)


@st.composite
def valid_mappings(draw: st.DrawFn) -> list[GuestMapping]:
    mappings = []
    address = offset = 0
    for _ in range(draw(st.integers(1, 6))):
        page_size = draw(st.sampled_from([P, HUGE, 1 << 30]))
        address = -(-address // page_size) * page_size + draw(st.integers(0, 3)) * page_size
        offset = -(-offset // page_size) * page_size
        size = draw(st.integers(1, 8)) * page_size
        mappings.append(guest(address, size, offset, page_size))
        address, offset = address + size, offset + size
    return draw(st.permutations(mappings))


@given(valid_mappings())
def test_valid_mappings_round_trip(mappings: list[GuestMapping]) -> None:
    assert parse_mappings(encode_mappings(mappings)) == mappings


# -- the handoff over real sockets -------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(peer, ours): a connected Unix stream socket pair."""
    peer, ours = socket.socketpair()
    with peer, ours:
        yield peer, ours


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def next_fault(uffd: ua.Userfaultfd) -> ua.PageFault:
    with anyio.fail_after(TIMEOUT):
        while True:
            await anyio.wait_readable(uffd.fileno())
            events = uffd.read_events()
            if events:
                [fault] = events
                assert isinstance(fault, ua.PageFault)
                return fault


async def refused(sock: socket.socket, match: str, **kwargs: Any) -> HandoffError:
    """Receive from a hostile peer: a HandoffError, and no fd left behind."""
    before = open_fds()
    with pytest.raises(HandoffError, match=match) as info:
        await receive_uffd(sock, **kwargs)
    assert open_fds() == before
    return info.value


@pytest.mark.anyio
async def test_the_received_uffd_is_the_senders(
    lab: Lab, pair: tuple[socket.socket, socket.socket]
) -> None:
    region = lab.anonymous(4)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    mapping = guest(region.address, region.length)
    send_uffd(pair[0], uffd, [mapping])
    with await receive_uffd(pair[1]) as handoff:
        assert handoff.mappings == (mapping,)
        assert (handoff.pid, handoff.uid, handoff.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert handoff.memfd is None
        assert handoff.uffd.fileno() != uffd.fileno()
        # The same kernel at both ends: what it offers (POISON, for one) is usable here too.
        assert handoff.uffd.available_features == uffd.available_features
        assert handoff.uffd.features == ua.Feature(0)  # what the sender enabled is unknowable
        worker = lab.touch(region.address + P, write=False)
        fault = await next_fault(handoff.uffd)
        assert fault.page == region.address + P
        handoff.uffd.copy(fault.page, pattern(1))
        worker.join()
    assert handoff.uffd.closed
    assert region.read(P, P) == pattern(1)


@pytest.mark.anyio
async def test_the_memfd_comes_along_and_bounds_the_mappings(
    lab: Lab, pair: tuple[socket.socket, socket.socket]
) -> None:
    region = lab.shared(4)
    assert region.memfd is not None
    uffd = lab.uffd()
    send_uffd(pair[0], uffd, [guest(region.address, region.length)], memfd=region.memfd)
    handoff = await receive_uffd(pair[1])
    try:
        assert handoff.memfd is not None and handoff.memfd != region.memfd
        assert os.fstat(handoff.memfd).st_ino == os.fstat(region.memfd).st_ino
    finally:
        handoff.close()
    assert handoff.memfd is None
    handoff.close()  # idempotent: the memfd number is forgotten, never closed twice

    too_far = guest(region.address, region.length, offset=4 * P)
    send_uffd(pair[0], uffd, [too_far], memfd=region.memfd)
    error = await refused(pair[1], "ends past the 0x4000-byte backing memory")
    assert (error.mapping, error.field) == (0, "offset")


CHILD = textwrap.dedent(
    """
    import os, socket, sys, threading
    import uffd_async as ua
    from uffd_async import GuestMapping, send_uffd

    P = ua.PAGE_SIZE
    expected = bytes.fromhex(sys.argv[2])
    with ua.Userfaultfd.open() as uffd, ua.Region.anonymous(4 * P) as region:
        uffd.register(region.address, region.length)
        mapping = GuestMapping(
            base_host_virt_addr=region.address, size=region.length, offset=0, page_size=P
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(sys.argv[1])
            send_uffd(sock, uffd, [mapping])
            got = []
            reader = threading.Thread(target=lambda: got.append(region.read(2 * P, P)))
            reader.daemon = True
            reader.start()
            reader.join(30)
            if reader.is_alive():
                print("the fault was never resolved", flush=True)
                os._exit(2)
    if got != [expected]:
        sys.exit("the page does not hold what the handler copied")
    """
)


async def accept(listener: socket.socket) -> socket.socket:
    with anyio.fail_after(TIMEOUT):
        while True:
            await anyio.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            return conn


async def exited(process: subprocess.Popen[str]) -> int:
    with anyio.fail_after(TIMEOUT * 3):
        while process.poll() is None:
            await anyio.sleep(0.02)
    return process.returncode


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "handler.sock"))
        sock.listen()
        sock.setblocking(False)
        yield sock


def spawn(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.anyio
async def test_a_child_process_hands_over_its_uffd(listener: socket.socket) -> None:
    """The proof: a fault in the child, read and resolved here through the received uffd."""
    contents = pattern(2)
    with spawn(sys.executable, "-c", CHILD, listener.getsockname(), contents.hex()) as child:
        try:
            conn = await accept(listener)
            with conn, await receive_uffd(conn) as handoff:
                assert handoff.pid == child.pid
                [mapping] = handoff.mappings
                assert (mapping.size, mapping.offset, mapping.page_size) == (4 * P, 0, P)
                fault = await next_fault(handoff.uffd)
                assert fault.page == mapping.base_host_virt_addr + 2 * P
                handoff.uffd.copy(fault.page, contents)
                returncode = await exited(child)
        finally:
            if child.poll() is None:
                child.kill()
            output, _ = child.communicate(timeout=TIMEOUT)
    assert returncode == 0, output


@pytest.mark.anyio
async def test_a_peer_that_dies_mid_handshake(listener: socket.socket) -> None:
    code = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    with spawn(sys.executable, "-I", "-c", code, listener.getsockname()) as child:
        conn = await accept(listener)
        with conn:
            assert await exited(child) == 0
            await refused(conn, "peer closed the connection before sending its uffd")
        child.communicate(timeout=TIMEOUT)


HOSTILE = {
    "garbage JSON": (b"[{]}", "not UTF-8 JSON"),
    "not an array": (b'{"base_host_virt_addr": 0}', "must be a JSON array"),
    "overlapping": (
        message(region_json(), region_json(base_host_virt_addr=BASE + P)),
        "overlaps mapping 0",
    ),
    "overflowing": (message(region_json(base_host_virt_addr=U64 - P)), "overflows 64 bits"),
    "unaligned": (message(region_json(size=P + 8)), "'size' 0x1008 is not a multiple"),
    "page size not a power of two": (message(region_json(page_size=5 * P)), "power of two"),
}


@pytest.mark.anyio
@pytest.mark.parametrize(("payload", "match"), HOSTILE.values(), ids=HOSTILE)
async def test_hostile_messages_close_the_fds(
    lab: Lab, pair: tuple[socket.socket, socket.socket], payload: bytes, match: str
) -> None:
    region = lab.shared(4)
    send_uffd(pair[0], lab.uffd(), payload, memfd=region.memfd)
    await refused(pair[1], match)


@pytest.mark.anyio
async def test_our_own_uid_is_allowed_whatever_allowed_uids_adds(
    lab: Lab, pair: tuple[socket.socket, socket.socket]
) -> None:
    """allowed_uids adds to the server's own uid (the README's "add the uid Firecracker
    runs as"); a peer of another uid is refused by the real-process test below."""
    region = lab.anonymous(4)
    send_uffd(pair[0], lab.uffd(), [guest(region.address, region.length)])
    with await receive_uffd(pair[1], allowed_uids={os.geteuid() + 1}) as handoff:
        assert handoff.uid == os.geteuid()
    with pytest.raises(ValueError, match="allowed_uids must be a uid"):
        await receive_uffd(pair[1], allowed_uids={-1})


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system python3")
async def test_a_real_process_of_another_uid_is_refused() -> None:
    """SO_PEERCRED names the uid that connected: here nobody (65534), via an abstract socket."""
    name = f"uffd-async-test-{uuid.uuid4().hex}"
    code = textwrap.dedent(
        """
        import array, socket, sys
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect("\\0" + sys.argv[1])
            fds = array.array("i", [0])
            sock.sendmsg([b"[]"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            try:
                sock.recv(1)  # until the handler hangs up
            except ConnectionResetError:  # it did, without reading our message
                pass
        """
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen()
        listener.setblocking(False)
        nobody = {"user": 65534, "group": 65534, "extra_groups": [], "cwd": "/"}
        with spawn(SYSTEM_PYTHON, "-I", "-S", "-c", code, name, **nobody) as child:
            try:
                conn = await accept(listener)
                with conn:
                    with anyio.fail_after(TIMEOUT):
                        await anyio.wait_readable(conn)  # its message and fd are queued
                    error = await refused(conn, "runs as uid 65534")
                    assert conn.recv(16, socket.MSG_PEEK) == b"[]"  # and stay unread
                assert isinstance(error, HandoffRefused)
                assert (error.pid, error.uid) == (child.pid, 65534)
                await exited(child)
            finally:
                if child.poll() is None:
                    child.kill()
                output, _ = child.communicate(timeout=TIMEOUT)
        assert child.returncode == 0, output


@pytest.mark.anyio
async def test_a_message_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    pair[0].send(encode_mappings([guest()]))
    await refused(pair[1], "carried no fd")


@pytest.mark.anyio
async def test_three_fds_are_refused_and_all_closed(
    lab: Lab, pair: tuple[socket.socket, socket.socket], pipe: tuple[int, int]
) -> None:
    region = lab.shared(4)
    assert region.memfd is not None
    fds = array.array("i", [lab.uffd().fileno(), region.memfd, pipe[0]])
    payload = encode_mappings([guest(region.address, region.length)])
    pair[0].sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    await refused(pair[1], "more than two fds")


@pytest.mark.anyio
async def test_the_first_fd_must_be_a_userfaultfd(
    pair: tuple[socket.socket, socket.socket], pipe: tuple[int, int]
) -> None:
    send_uffd(pair[0], pipe[0], [guest()])
    await refused(pair[1], r"the first fd must be a userfaultfd, not pipe:\[")


@pytest.mark.anyio
async def test_the_uffd_must_be_handshaken(pair: tuple[socket.socket, socket.socket]) -> None:
    raw = open_raw(Method.USER_MODE_ONLY)  # any uffd will do: even nobody can open this one
    try:
        send_uffd(pair[0], raw, [guest()])
    finally:
        os.close(raw)
    await refused(pair[1], r"never handshaken \(UFFDIO_API\)")


@pytest.mark.anyio
async def test_the_second_fd_must_be_a_memory_file(
    lab: Lab, pair: tuple[socket.socket, socket.socket], pipe: tuple[int, int]
) -> None:
    send_uffd(pair[0], lab.uffd(), [guest()], memfd=pipe[1])
    await refused(pair[1], r"the second fd must be the guest memory file \(a memfd\), not pipe")


@pytest.mark.anyio
async def test_a_silent_peer_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    start = anyio.current_time()
    error = await refused(pair[1], "sent no uffd within 0.2 seconds", timeout=0.2)
    assert isinstance(error, HandoffTimeout) and isinstance(error, TimeoutError)
    assert 0.2 <= anyio.current_time() - start < TIMEOUT


@pytest.mark.anyio
async def test_a_peer_that_closes_mid_handshake(pair: tuple[socket.socket, socket.socket]) -> None:
    pair[0].close()
    await refused(pair[1], "peer closed the connection before sending its uffd")


@pytest.mark.anyio
async def test_an_oversized_message_on_a_stream(
    lab: Lab, pair: tuple[socket.socket, socket.socket]
) -> None:
    padded = encode_mappings([guest()]) + b" " * 4096  # still valid JSON
    send_uffd(pair[0], lab.uffd(), padded)
    await refused(pair[1], "longer than max_message=1024 bytes", max_message=1024)


@pytest.mark.anyio
async def test_an_oversized_message_on_seqpacket(lab: Lab) -> None:
    peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with peer, ours:
        send_uffd(peer, lab.uffd(), encode_mappings([guest()]) + b" " * 4096)
        await refused(ours, "longer than max_message=1024 bytes", max_message=1024)


@pytest.mark.anyio
async def test_the_largest_message_send_allows_arrives_whole(
    lab: Lab, pair: tuple[socket.socket, socket.socket]
) -> None:
    payload = encode_mappings([guest()])
    payload += b" " * (STREAM_MESSAGE_LIMIT - len(payload))
    send_uffd(pair[0], lab.uffd(), payload)
    with await receive_uffd(pair[1]) as handoff:
        assert handoff.mappings == (guest(),)


def test_send_refuses_a_message_a_stream_cannot_deliver_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    with pytest.raises(ua.InvalidArgument, match="only its first part"):
        send_uffd(pair[0], 0, b" " * (STREAM_MESSAGE_LIMIT + 1))


def test_handoff_owns_its_fds() -> None:
    uffd = ua.Userfaultfd.open()
    memfd = os.memfd_create("handoff-test", os.MFD_CLOEXEC)
    with Handoff(uffd=uffd, mappings=(guest(),), memfd=memfd, pid=1, uid=0, gid=0) as handoff:
        assert handoff.memfd == memfd
    assert uffd.closed and handoff.memfd is None
    assert str(memfd) not in open_fds()


# -- watching the peer ----------------------------------------------------------


@pytest.mark.anyio
async def test_closing_a_peer_watch_wakes_its_waiter(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The loop is told before the pidfd is closed: a task waiting on it wakes at once
    (ClosedResourceError) instead of waiting on a number that no longer means it."""
    peer = PeerExit(pair[1], os.getpid())  # the peer is this very process: it lives on
    assert peer.watched
    woke: list[BaseException] = []

    async def waiting() -> None:
        try:
            await peer.wait()
        except anyio.ClosedResourceError as exc:
            woke.append(exc)

    with anyio.move_on_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            peer.close()
    assert woke, "the waiter was not woken when its pidfd was closed"
    peer.close()  # idempotent
