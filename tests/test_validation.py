"""Bad input: a typed, clear error before any syscall, and nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import uffd_async as ua

from ._support import Lab

P = ua.PAGE_SIZE

RANGE_CALLS: list[tuple[str, Callable[[ua.Userfaultfd, int, int], Any]]] = [
    ("register", lambda u, s, n: u.register(s, n)),
    ("unregister", lambda u, s, n: u.unregister(s, n)),
    ("copy", lambda u, s, n: u.copy(s, 0x1000, n)),
    ("zeropage", lambda u, s, n: u.zeropage(s, n)),
    ("writeprotect", lambda u, s, n: u.writeprotect(s, n)),
    ("continue_", lambda u, s, n: u.continue_(s, n)),
    ("poison", lambda u, s, n: u.poison(s, n)),
    ("move", lambda u, s, n: u.move(s, 0x1000, n)),
    ("wake", lambda u, s, n: u.wake(s, n)),
]
BAD_RANGES = [
    (0x1001, P, "not aligned"),
    (0x1000, 0, "positive multiple"),
    (0x1000, P + 1, "positive multiple"),
    (0x1000, -P, "positive multiple"),
    (-P, P, "not aligned"),
    ((1 << 64) - P, 2 * P, "overflows"),
]


@pytest.mark.parametrize(("name", "call"), RANGE_CALLS, ids=[n for n, _ in RANGE_CALLS])
@pytest.mark.parametrize(("start", "length", "message"), BAD_RANGES)
def test_bad_ranges_are_rejected_before_any_syscall(
    lab: Lab, name: str, call: Callable[..., Any], start: int, length: int, message: str
) -> None:
    uffd = lab.uffd()
    uffd.close()  # a syscall would fail with UffdClosed: validation must come first
    with pytest.raises(ua.InvalidArgument, match=message) as info:
        call(uffd, start, length)
    assert isinstance(info.value, ValueError) and info.value.errno == 22


@pytest.mark.parametrize(("name", "call"), RANGE_CALLS, ids=[n for n, _ in RANGE_CALLS])
def test_closed_handle(name: str, call: Callable[..., Any]) -> None:
    uffd = ua.Userfaultfd.open(ua.Feature.POISON | ua.Feature.MOVE)
    uffd.close()
    with pytest.raises(ua.UffdClosed, match="closed"):
        call(uffd, 0x1000, P)
    with pytest.raises(ua.UffdClosed):
        uffd.read_events()


@pytest.mark.parametrize("bad", [1.0, "4096", None, True])
def test_non_int_addresses_are_type_errors(lab: Lab, bad: Any) -> None:
    uffd = lab.uffd()
    with pytest.raises(TypeError):
        uffd.zeropage(bad, P)
    with pytest.raises(TypeError):
        uffd.zeropage(0x1000, bad)


def test_protect_with_dontwake_is_a_value_error_before_any_syscall(lab: Lab) -> None:
    uffd = lab.uffd()
    uffd.close()
    with pytest.raises(ValueError, match="only valid when unprotecting"):
        uffd.writeprotect(0x1000, P, protect=True, wake=False)


@pytest.mark.parametrize("mode", [0, 8, 1 << 40, -1])
def test_bad_register_modes(lab: Lab, mode: int) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    with pytest.raises(ua.InvalidArgument, match="mode"):
        uffd.register(region.address, region.length, mode)


def test_modes_and_ioctls_the_kernel_did_not_offer(lab: Lab) -> None:
    """A handle whose handshake offered nothing refuses WP, MINOR, POISON and MOVE up front."""
    real = lab.uffd()
    bare = ua.Userfaultfd._adopt(os.dup(real.fileno()), available=ua.Feature(0))
    lab.uffds.append(bare)
    region = lab.anonymous(1)
    calls: list[Callable[[], object]] = [
        lambda: bare.register(region.address, P, ua.Mode.WP),
        lambda: bare.register(region.address, P, ua.Mode.MINOR),
        lambda: bare.copy(region.address, b"x" * P, wp=True),
        lambda: bare.poison(region.address, P),
        lambda: bare.move(region.address, region.address, P),
    ]
    for call in calls:
        with pytest.raises(ua.UnsupportedFeature):
            call()


def test_minor_mode_on_anonymous_memory_is_refused_by_the_kernel(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    with pytest.raises(ua.InvalidArgument, match="MINOR needs shmem"):
        uffd.register(region.address, region.length, ua.Mode.MINOR)


def test_registering_unmapped_memory(lab: Lab) -> None:
    uffd = lab.uffd()
    region = ua.Region.anonymous(P)
    address = region.address
    region.close()
    with pytest.raises(ua.InvalidArgument, match="not fully mapped"):
        uffd.register(address, P)


def test_read_events_bounds(lab: Lab) -> None:
    uffd = lab.uffd()
    with pytest.raises(ua.InvalidArgument):
        uffd.read_events(0)
    with pytest.raises(TypeError):
        uffd.read_events(1.5)  # type: ignore[arg-type]


def test_src_must_be_bytes_like(lab: Lab) -> None:
    uffd = lab.uffd()
    region = lab.anonymous(1)
    uffd.register(region.address, region.length)
    with pytest.raises(TypeError, match="bytes-like"):
        uffd.copy(region.address, "text")
    with pytest.raises(TypeError, match="bytes-like"):
        uffd.copy(region.address, memoryview(bytes(2 * P))[::2])


@given(
    start=st.integers(min_value=-(2**65), max_value=2**65),
    length=st.integers(min_value=-(2**65), max_value=2**65),
    mode=st.integers(min_value=-8, max_value=16),
)
def test_fuzzed_register_never_leaks_or_crashes(start: int, length: int, mode: int) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    with ua.Userfaultfd.open() as uffd:
        try:
            uffd.register(start, length, mode)
        except (ua.UffdError, TypeError):
            pass
        else:  # only possible on a mapped range, which random numbers never are
            pytest.fail(f"registered {start:#x}+{length:#x}")
    assert set(os.listdir("/proc/self/fd")) <= fds_before
