"""Hostile arguments to every public call, fuzzed: a typed error (a UffdError, a
TypeError or a ValueError) with a message that names what was wrong, or success,
and never a crash, a hang, an fd, a mapping or a registration left behind.

Calls that reach the kernel with a range run on a uffd with nothing registered,
and ``register`` (and what registers: WriteTracker, FaultGate) only on ranges
that overlap no mapping of this process: registering the interpreter's own
heap would make its next fault wait forever. ``touch`` is only given values it
must refuse (a valid-looking address would be accessed, and could SIGSEGV).

Examples the fuzzing found are pinned as plain tests below; where the library does
not meet the rule yet, a ``strict`` xfail pins the example until it does (none left).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import uffd_async as ua
from uffd_async.testing import FaultGate

from ._support import Resources, mappings

P = ua.PAGE_SIZE
TYPED = (ua.UffdError, TypeError, ValueError)
#: Examples per fuzzed call (the README's table counts them); ``make stress`` asks for more.
EXAMPLES = int(os.environ.get("UFFD_ASYNC_FUZZ_EXAMPLES", "25"))
fuzz = settings(
    max_examples=EXAMPLES,
    # The default suite replays the same examples every run (no flaky CI); `make
    # stress` sets UFFD_ASYNC_FUZZ_EXAMPLES and explores anew each time.
    derandomize="UFFD_ASYNC_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Values of the wrong type.
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(max_magnitude=1e3),
)
#: Integers: page multiples and not, negative, past 64 bits.
INTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-4, max_value=2**20).map(lambda n: n * P),
    st.sampled_from([0, 1, P - 1, P, P + 1, -P, 2**63, 2**64 - P, 2**64, 2**65, -(2**64)]),
)
ANY = st.one_of(INTS, WEIRD)


@contextlib.contextmanager
def nothing_left_behind() -> Iterator[None]:
    before = Resources(threads=False)  # these calls start no thread
    yield
    problems = list(before.leaks())
    assert not problems, problems


def rejected_or_fine(call: Callable[[], Any]) -> Any:
    """Run ``call``: what it returns, or the typed error it raised (with a message)."""
    try:
        return call()
    except TYPED as exc:
        message = str(exc)
        assert message.strip(), f"{type(exc).__name__} without a message"
        return exc


def whole_address_space(start: object, length: object) -> bool:
    """The one range that passes the checks but not struct.pack: see
    test_a_range_of_the_whole_address_space_is_refused."""
    return start == 0 and length == 2**64 and not isinstance(start, bool)


def overlaps_a_mapping(start: object, length: object) -> bool:
    """Whether an int range touches memory of this process (never register that)."""
    if not isinstance(start, int) or not isinstance(length, int):
        return False
    end = start + max(length, 0)
    return any(m.start < end and start < m.end for m in mappings())


@pytest.fixture(scope="module")
def bare() -> Iterator[ua.Userfaultfd]:
    """A uffd with every feature this kernel offers and nothing registered."""
    with ua.Userfaultfd.open(ua.Feature.POISON | ua.Feature.MOVE) as uffd:
        yield uffd


RANGE_CALLS: dict[str, Callable[[ua.Userfaultfd, Any, Any, Any], Any]] = {
    "unregister": lambda u, s, n, f: u.unregister(s, n),
    "copy": lambda u, s, n, f: u.copy(s, b"x" * P, n, wp=f, wake=f),
    "copy-from-address": lambda u, s, n, f: u.copy(s, 0x10000, n, wake=f),
    "zeropage": lambda u, s, n, f: u.zeropage(s, n, wake=f),
    "writeprotect": lambda u, s, n, f: u.writeprotect(s, n, protect=f, wake=True),
    "unprotect": lambda u, s, n, f: u.writeprotect(s, n, protect=False, wake=f),
    "continue_": lambda u, s, n, f: u.continue_(s, n, wp=f, wake=f),
    "poison": lambda u, s, n, f: u.poison(s, n, wake=f),
    "move": lambda u, s, n, f: u.move(s, 0x10000, n, wake=f, allow_src_holes=f),
    "move-to": lambda u, s, n, f: u.move(0x10000, s, n, wake=f),
    "wake": lambda u, s, n, f: u.wake(s, n),
}


@pytest.mark.parametrize("name", RANGE_CALLS)
@fuzz
@given(start=ANY, length=ANY, flag=ANY)
def test_range_calls(bare: ua.Userfaultfd, name: str, start: Any, length: Any, flag: Any) -> None:
    assume(not whole_address_space(start, length))
    with nothing_left_behind():
        rejected_or_fine(lambda: RANGE_CALLS[name](bare, start, length, flag))


@fuzz
@given(start=ANY, length=ANY, mode=st.one_of(ANY, st.sampled_from(list(ua.Mode))))
def test_register(bare: ua.Userfaultfd, start: Any, length: Any, mode: Any) -> None:
    assume(not overlaps_a_mapping(start, length) and not whole_address_space(start, length))
    with nothing_left_behind():
        outcome = rejected_or_fine(lambda: bare.register(start, length, mode))
        assert isinstance(outcome, Exception), f"registered {start!r}+{length!r}"


#: Sources: bytes-like or not, and addresses.
SOURCES = st.one_of(WEIRD, st.builds(bytearray, st.binary(max_size=8)), INTS)


@fuzz
@given(src=SOURCES, length=ANY)
def test_copy_sources(bare: ua.Userfaultfd, src: Any, length: Any) -> None:
    with nothing_left_behind():
        outcome = rejected_or_fine(lambda: bare.copy(0x10000, src, length))
        assert isinstance(outcome, Exception)


@fuzz
@given(max_events=st.one_of(WEIRD, st.integers(max_value=4096), st.integers(min_value=2**40)))
def test_read_events(bare: ua.Userfaultfd, max_events: Any) -> None:
    with nothing_left_behind():
        outcome = rejected_or_fine(lambda: bare.read_events(max_events))
        assert outcome == [] or isinstance(outcome, Exception)


@fuzz
@given(features=st.one_of(ANY, st.sampled_from(list(ua.Feature))), user_mode_only=ANY)
def test_open(features: Any, user_mode_only: Any) -> None:
    with nothing_left_behind():
        outcome = rejected_or_fine(lambda: ua.Userfaultfd.open(features, user_mode_only=None))
        if isinstance(outcome, ua.Userfaultfd):
            outcome.close()
        outcome = rejected_or_fine(lambda: ua.Userfaultfd.open(0, user_mode_only=user_mode_only))
        if isinstance(outcome, ua.Userfaultfd):
            outcome.close()


# -- memory -----------------------------------------------------------------------

#: Sizes a constructor may be asked for, the impossible ones included.
SIZES = ANY


@pytest.mark.parametrize("constructor", ["anonymous", "shared"])
@fuzz
@given(length=SIZES)
def test_region_constructors(constructor: str, length: Any) -> None:
    if constructor == "shared":  # see test_a_shared_region_past_off_t_is_a_typed_error
        assume(not (isinstance(length, int) and length >= 2**63))
    with nothing_left_behind():
        outcome = rejected_or_fine(lambda: getattr(ua.Region, constructor)(length))
        if isinstance(outcome, ua.Region):
            assert outcome.length == length
            outcome.close()


@pytest.fixture(scope="module")
def scratch() -> Iterator[ua.Region]:
    with ua.Region.anonymous(4 * P) as region:
        yield region


@fuzz
@given(
    offset=ANY,
    n=ANY,
    byte=st.one_of(ANY, st.integers(0, 255)),
    data=st.one_of(WEIRD, st.binary(max_size=64)),
)
def test_region_access(scratch: ua.Region, offset: Any, n: Any, byte: Any, data: Any) -> None:
    with nothing_left_behind():
        got = rejected_or_fine(lambda: scratch.read(offset, n))
        assert isinstance(got, (bytes, Exception))
        if isinstance(got, bytes):
            assert len(got) == n
        rejected_or_fine(lambda: scratch.write(offset, data))
        outcome = rejected_or_fine(lambda: scratch.fill(offset, n, byte))
        if outcome is None:
            assert scratch.read(offset, n) == bytes([byte]) * n


#: Values ``touch`` must refuse whatever the other argument is.
MUST_REFUSE = st.one_of(WEIRD, st.integers(max_value=0))


@fuzz
@given(
    bad=MUST_REFUSE,
    other=st.one_of(st.integers(min_value=1, max_value=2**65), WEIRD),
    which=st.sampled_from(["address", "length", "overflow"]),
    write=ANY,
)
def test_touch_refuses(bad: Any, other: Any, which: str, write: Any) -> None:
    if which == "address":
        args = (bad, other)
    elif which == "length":
        args = (other, bad)
    else:  # both positive, but past the top of the address space
        assume(isinstance(other, int) and not isinstance(other, bool))
        args = (2**64 - other // 2 - 1, other)
        assume(args[0] > 0 and args[0] + args[1] > 2**64)
    with pytest.raises(TYPED) as info:
        ua.touch(*args, write=write)
    assert str(info.value).strip()


# -- serving: constructors ------------------------------------------------------------


@fuzz
@given(
    source=st.one_of(ANY, st.binary(max_size=3 * P)),
    base=st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, P])),
    readahead=ANY,
    size=st.one_of(st.none(), INTS),
    wp=st.booleans(),
)
def test_copy_from(source: Any, base: int, readahead: Any, size: Any, wp: bool) -> None:
    with nothing_left_behind():
        rejected_or_fine(
            lambda: ua.copy_from(source, base=base, readahead=readahead, size=size, wp=wp)
        )


@fuzz
@given(limit=ANY, batch=ANY, on_error=st.one_of(ANY, st.just(ua.OnError())))
def test_fault_server_constructor(
    bare: ua.Userfaultfd, limit: Any, batch: Any, on_error: Any
) -> None:
    with nothing_left_behind():
        rejected_or_fine(
            lambda: ua.FaultServer(
                bare, ua.zero_fill(), limit=limit, batch=batch, on_error=on_error
            )
        )


@pytest.mark.anyio
async def test_serve_refuses_before_serving(bare: ua.Userfaultfd) -> None:
    for kwargs in ({"limit": 0}, {"limit": 1.5}, {"batch": 0}, {"on_error": "zero"}):
        with pytest.raises(TYPED):
            await ua.serve(bare, ua.zero_fill(), **kwargs)


@pytest.mark.anyio
@fuzz
@given(start=ANY, length=ANY, mode=st.one_of(ANY, st.just("fault")))
async def test_write_tracker(start: Any, length: Any, mode: Any) -> None:
    assume(not overlaps_a_mapping(start, length) and not whole_address_space(start, length))
    # A byte per page is allocated up front: see test_a_tracker_too_large_to_track.
    assume(not (isinstance(length, int) and length > 2**36))
    with nothing_left_behind(), ua.Userfaultfd.open(ua.Feature.WP_UNPOPULATED) as uffd:
        tracker = rejected_or_fine(lambda: ua.WriteTracker(uffd, start, length, mode=mode))
        if isinstance(tracker, ua.WriteTracker):
            with pytest.raises(TYPED):
                async with tracker:
                    pytest.fail("tracked memory that is not mapped")


@pytest.mark.anyio
@fuzz
@given(address=ANY, length=ANY, mode=st.one_of(ANY, st.sampled_from(list(ua.Mode))))
async def test_fault_gate(address: Any, length: Any, mode: Any) -> None:
    assume(not overlaps_a_mapping(address, length) and not whole_address_space(address, length))
    with nothing_left_behind():
        gate = rejected_or_fine(lambda: FaultGate(address, length, mode=mode))
        if isinstance(gate, FaultGate):
            with pytest.raises(TYPED):
                async with gate:
                    pytest.fail("gated memory that is not mapped")


# -- pinned examples: what the fuzzing found, fixed since ---------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: ua.Region.anonymous(2**62), lambda: ua.Region.shared(2**62)],
    ids=["anonymous", "shared"],
)
def test_an_impossible_size_is_a_uffd_error(make: Callable[[], ua.Region]) -> None:
    with nothing_left_behind(), pytest.raises(ua.UffdError):
        make().close()


@pytest.mark.parametrize("src", [-1, 2**64, -(2**70)])
def test_copy_from_a_bad_address(bare: ua.Userfaultfd, src: int) -> None:
    with pytest.raises(TYPED, match="src"):
        bare.copy(0x10000, src, P)


@pytest.mark.parametrize("byte", [256, -1, 1.5, "a", None])
def test_fill_refuses_a_byte_out_of_range(scratch: ua.Region, byte: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="byte"):
        scratch.fill(0, 1, byte)


@pytest.mark.parametrize(("address", "length"), [("x", P), (P, None), (P, -P), (-P, P)])
def test_region_checks_its_arguments(address: Any, length: Any) -> None:
    with pytest.raises(TYPED):
        ua.Region(address, length)


@pytest.mark.parametrize("base", [float(P), "x", None, math.inf])
def test_copy_from_names_a_bad_base(base: Any) -> None:
    with pytest.raises(TYPED, match="base"):
        ua.copy_from(b"x" * P, base=base)


@pytest.mark.parametrize("page", ["bogus", None, 0])
def test_on_error_checks_page(page: Any) -> None:
    with pytest.raises(TYPED, match="page"):
        ua.OnError(page=page)


@pytest.mark.parametrize(
    "kwargs",
    [{"uffd": "not a uffd"}, {"resolver": None}, {"page_size": 0}, {"page_size": 3 * P}],
    ids=["uffd", "resolver", "page_size-0", "page_size-not-a-power-of-two"],
)
def test_fault_server_checks_everything_up_front(
    bare: ua.Userfaultfd, kwargs: dict[str, Any]
) -> None:
    arguments: dict[str, Any] = {"uffd": bare, "resolver": ua.zero_fill(), **kwargs}
    with pytest.raises(TYPED):
        ua.FaultServer(arguments.pop("uffd"), arguments.pop("resolver"), **arguments)


def test_write_tracker_checks_its_uffd() -> None:
    with pytest.raises(TypeError):
        ua.WriteTracker("not a uffd", 0, P)  # type: ignore[arg-type]


def test_read_events_refuses_an_impossible_count(bare: ua.Userfaultfd) -> None:
    with pytest.raises(TYPED, match="max_events"):
        bare.read_events(2**58)


@pytest.mark.anyio
async def test_a_gate_that_cannot_open_closes_its_streams() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gate = FaultGate(0x10000, P)  # nothing is mapped there
        with pytest.raises(ua.InvalidArgument):
            async with gate:
                pass
        del gate
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# -- gaps the fuzzing found, now closed ------------------------------------------------------


@pytest.mark.parametrize("name", ["unregister", "zeropage", "poison", "wake"])
def test_a_range_of_the_whole_address_space_is_refused(bare: ua.Userfaultfd, name: str) -> None:
    with pytest.raises(ua.InvalidArgument, match="length"):
        RANGE_CALLS[name](bare, 0, 2**64, True)


@pytest.mark.parametrize("length", [2**63, 2**64])
def test_a_shared_region_past_off_t_is_a_typed_error(length: int) -> None:
    with nothing_left_behind(), pytest.raises(TYPED):
        ua.Region.shared(length).close()


def test_a_tracker_too_large_to_track() -> None:
    with ua.Userfaultfd.open(ua.Feature.WP_UNPOPULATED) as uffd, pytest.raises(TYPED):
        ua.WriteTracker(uffd, 0x10000, 2**60)


# -- the handoff's mappings: overlaps anywhere in the list -------------------------------

#: Where the generated layouts start (a user-space address like a guest's).
GUEST_BASE = 0x7F00_0000_0000
HUGE = 2 * 1024 * 1024
OVERLAP = re.compile(r"mapping (\d+) \[(0x[0-9a-f]+), (0x[0-9a-f]+)\) overlaps mapping (\d+) \[")


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@st.composite
def guest_layouts(draw: st.DrawFn, *, overlap: bool) -> list[ua.GuestMapping]:
    """1 to 8 mappings (4 KiB and 2 MiB pages), in any order; with ``overlap``, one
    mapping moved so that it overlaps another, chosen anywhere in the layout."""
    count = draw(st.integers(2 if overlap else 1, 8))
    laid: list[ua.GuestMapping] = []
    address = GUEST_BASE
    offset = 0
    for _ in range(count):
        page_size = draw(st.sampled_from([P, P, P, HUGE]))
        # Gaps of zero pages are common: mappings that touch are still disjoint.
        address = _align_up(address, page_size) + draw(st.integers(0, 2)) * page_size
        size = draw(st.integers(1, 4)) * page_size
        offset = _align_up(offset, page_size)
        laid.append(
            ua.GuestMapping(
                base_host_virt_addr=address, size=size, offset=offset, page_size=page_size
            )
        )
        address += size
        offset += size
    if overlap:
        host, moved = draw(
            st.lists(st.sampled_from(range(count)), min_size=2, max_size=2, unique=True)
        )
        target, mover = laid[host], laid[moved]
        inside = draw(st.integers(target.base_host_virt_addr, target.end - 1))
        base = inside - inside % mover.page_size  # its end is past `inside`: they overlap
        laid[moved] = attrs.evolve(mover, base_host_virt_addr=base)
    return draw(st.permutations(laid))


def _overlap(a: ua.GuestMapping, b: ua.GuestMapping) -> bool:
    return a.base_host_virt_addr < b.end and b.base_host_virt_addr < a.end


def _as_message(layout: list[ua.GuestMapping]) -> bytes:
    # Not encode_mappings: that validates, and these must reach the parser.
    return json.dumps([attrs.asdict(mapping) for mapping in layout]).encode()


def _check_overlap_verdict(layout: list[ua.GuestMapping]) -> None:
    """parse_mappings refuses the layout exactly when two of its mappings overlap
    (whatever their places in the list), and names a pair that does."""
    overlapping = {
        (i, j)
        for i, j in itertools.permutations(range(len(layout)), 2)
        if _overlap(layout[i], layout[j])
    }
    try:
        parsed = ua.parse_mappings(_as_message(layout))
    except ua.HandoffError as exc:
        assert overlapping, f"refused a disjoint layout: {exc}"
        found = OVERLAP.search(str(exc))
        assert found, f"the refusal names no overlapping pair: {exc}"
        named, start, end, other = (
            int(found[1]),
            int(found[2], 16),
            int(found[3], 16),
            int(found[4]),
        )
        assert (named, other) in overlapping, f"{exc} but {named} and {other} are disjoint"
        assert (start, end) == (layout[named].base_host_virt_addr, layout[named].end), str(exc)
        assert exc.mapping == named and exc.field == "base_host_virt_addr"
    else:
        assert not overlapping, f"accepted {sorted(overlapping)[0]} overlapping"
        assert parsed == layout


@fuzz
@given(layout=guest_layouts(overlap=False))
def test_parse_mappings_accepts_disjoint_mappings_in_any_order(
    layout: list[ua.GuestMapping],
) -> None:
    _check_overlap_verdict(layout)


@fuzz
@given(layout=guest_layouts(overlap=True))
def test_parse_mappings_refuses_an_overlap_anywhere(layout: list[ua.GuestMapping]) -> None:
    _check_overlap_verdict(layout)


@pytest.mark.parametrize(
    "order",
    [(0, 1, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0)],
    ids=["apart", "apart-reversed", "neighbours", "neighbours-last"],
)
def test_an_overlap_between_mappings_that_are_not_neighbours(order: tuple[int, ...]) -> None:
    """Pinned: A and C overlap, B overlaps neither; B between them in the list, or not."""
    a = ua.GuestMapping(base_host_virt_addr=GUEST_BASE, size=4 * P, offset=0, page_size=P)
    b = ua.GuestMapping(base_host_virt_addr=GUEST_BASE + 8 * P, size=P, offset=4 * P, page_size=P)
    c = ua.GuestMapping(base_host_virt_addr=GUEST_BASE + 3 * P, size=P, offset=5 * P, page_size=P)
    layout = [(a, b, c)[i] for i in order]
    _check_overlap_verdict(layout)
    with pytest.raises(ua.HandoffError, match="overlaps"):
        ua.parse_mappings(_as_message(layout))
