"""The argument checks (uffd_async/_core/_checks.py): one wording and one error everywhere.

A value of the wrong type is an ``InvalidArgumentType``: an :class:`InvalidArgument`
(errno EINVAL, a ValueError, a UffdError) that is also the TypeError a caller
catches for a wrong type. A value out of range is an InvalidArgument and not a
TypeError. The message names the parameter, says what it must be and shows what it
got. The last section goes through the public API, so a check dropped or loosened
at a call site fails here too; none of it needs a fault.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import uffd_async as ua
import uffd_async.resolvers
from uffd_async._core._checks import (
    check_instance,
    check_int,
    check_page_size,
    check_percentile,
    check_seconds,
    is_page_size,
)
from uffd_async._core._errors import InvalidArgumentType

from ._support import Lab

P = ua.PAGE_SIZE
GiB = 1 << 30
WRONG_TYPES = [True, False, 1.0, "1", b"1", None, [1]]


def refused(call: Any, message: str) -> ua.InvalidArgument:
    """``call()`` raises an InvalidArgument (EINVAL) whose message is exactly ``message``."""
    with pytest.raises(ua.InvalidArgument) as info:
        call()
    error = info.value
    assert str(error) == message
    assert error.errno == errno.EINVAL
    assert isinstance(error, ValueError) and isinstance(error, ua.UffdError)
    return error


def refused_type(call: Any, message: str) -> None:
    error = refused(call, message)
    assert isinstance(error, TypeError) and isinstance(error, InvalidArgumentType)


def refused_value(call: Any, message: str) -> None:
    assert not isinstance(refused(call, message), TypeError)


# -- check_int -------------------------------------------------------------------------------


def test_an_int_in_range_is_returned() -> None:
    assert check_int("count", 5) == 5
    assert check_int("count", 1, minimum=1) == 1  # the bounds are inclusive
    assert check_int("count", 255, minimum=0, maximum=255) == 255
    assert check_int("count", 0, minimum=0, maximum=255) == 0
    assert check_int("count", -(2**70)) == -(2**70)
    assert check_int("mode", ua.Mode.WP, minimum=1) is ua.Mode.WP  # an int subclass


@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
def test_a_bool_or_a_non_int_is_a_type_error(value: object) -> None:
    name = type(value).__name__
    refused_type(lambda: check_int("count", value), f"count must be an int, not {name}")
    refused_type(
        lambda: check_int("count", value, minimum=0, maximum=1),
        f"count must be an int, not {name}",
    )


@pytest.mark.parametrize(
    ("value", "minimum", "maximum", "message"),
    [
        (0, 1, None, "count must be an int >= 1, not 0"),
        (-1, 0, None, "count must be an int >= 0, not -1"),
        (6, None, 5, "count must be an int <= 5, not 6"),
        (256, 0, 255, "count must be an int from 0 to 255, not 256"),
        (-1, 0, 255, "count must be an int from 0 to 255, not -1"),
    ],
)
def test_an_int_out_of_range_is_a_value_error(
    value: int, minimum: int | None, maximum: int | None, message: str
) -> None:
    refused_value(lambda: check_int("count", value, minimum=minimum, maximum=maximum), message)


def test_expected_words_the_rule_in_the_domain_s_terms() -> None:
    def group(value: object) -> int:
        return check_int("socket_group", value, minimum=0, expected="a name or a gid")

    assert group(0) == 0
    refused_value(lambda: group(-1), "socket_group must be a name or a gid, not -1")
    refused_type(lambda: group(1.5), "socket_group must be a name or a gid, not float")


# -- page sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4096, 8192, 65536, 2 << 20, GiB])
def test_powers_of_two_from_4096_are_page_sizes(size: int) -> None:
    assert is_page_size(size)
    assert check_page_size("page_size", size) == size
    assert check_page_size("page_size", size, maximum=GiB) == size  # the maximum is inclusive


@pytest.mark.parametrize("size", [0, 1, 1024, 2048, 4095, 4097, 3 * P, 12 * P, -P, -(2**63)])
def test_anything_else_is_refused(size: int) -> None:
    assert not is_page_size(size)
    refused_value(
        lambda: check_page_size("page_size", size),
        f"page_size must be a power of two >= 4096, not {size}",
    )


def test_a_maximum_is_named_in_its_unit() -> None:
    assert not is_page_size(2 * GiB, GiB)
    refused_value(
        lambda: check_page_size("page_size", 2 * GiB, maximum=GiB),
        f"page_size must be a power of two from 4096 to 1 GiB, not {2 * GiB}",
    )
    refused_value(
        lambda: check_page_size("huge", 4 << 20, maximum=2 << 20),
        f"huge must be a power of two from 4096 to 2 MiB, not {4 << 20}",
    )
    refused_value(
        lambda: check_page_size("small", 16384, maximum=8192),
        "small must be a power of two from 4096 to 8 KiB, not 16384",
    )


@pytest.mark.parametrize("value", [True, 4096.0, "4096"], ids=repr)
def test_a_page_size_of_the_wrong_type(value: object) -> None:
    refused_type(
        lambda: check_page_size("page_size", value),
        f"page_size must be an int, not {type(value).__name__}",
    )


# -- seconds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e-9, 0.5, 1, 30.0, 1e9])
def test_finite_positive_seconds(value: float) -> None:
    assert check_seconds("timeout", value) == value


@pytest.mark.parametrize("value", [0, 0.0, -1, -1e-9, math.nan, math.inf, -math.inf])
def test_seconds_that_are_not_positive_and_finite(value: float) -> None:
    refused_value(
        lambda: check_seconds("timeout", value),
        f"timeout must be a finite number of seconds > 0, not {value!r}",
    )


def test_seconds_with_zero_and_a_maximum() -> None:
    for value in (0, 0.0, 0.005, 0.01):
        assert check_seconds("spin", value, maximum=0.01, zero=True) == value
    for value in (-0.001, 0.02, math.nan, math.inf):
        refused_value(
            lambda value=value: check_seconds("spin", value, maximum=0.01, zero=True),
            f"spin must be a finite number of seconds >= 0 and <= 0.01, not {value!r}",
        )
    assert check_seconds("wait", 2.0, maximum=2.0) == 2.0
    refused_value(
        lambda: check_seconds("wait", 2.5, maximum=2.0),
        "wait must be a finite number of seconds > 0 and <= 2.0, not 2.5",
    )


@pytest.mark.parametrize("value", [True, False, "1", None, 1j], ids=repr)
def test_seconds_of_the_wrong_type(value: object) -> None:
    refused_type(
        lambda: check_seconds("timeout", value),
        f"timeout must be a number of seconds, not {type(value).__name__}",
    )


# -- check_instance ----------------------------------------------------------------------------


def test_check_instance() -> None:
    on_error = ua.OnError()
    assert check_instance("on_error", on_error, ua.OnError) is on_error
    assert check_instance("populate", False, bool) is False
    refused_type(
        lambda: check_instance("on_error", "zero", ua.OnError),
        "on_error must be an OnError, not str",
    )
    refused_type(
        lambda: check_instance("uffd", 3, ua.Userfaultfd), "uffd must be a Userfaultfd, not int"
    )
    refused_type(lambda: check_instance("populate", 1, bool), "populate must be a bool, not int")


# -- check_percentile --------------------------------------------------------------------------


def test_percentiles_from_0_to_100() -> None:
    assert [check_percentile("percentile", p) for p in (0, 50, 99.9, 100)] == [0, 50, 99.9, 100]
    for bad in (-1, 100.5, math.nan):
        refused_value(
            lambda bad=bad: check_percentile("percentile", bad),
            f"percentile must be a number from 0 to 100, not {bad!r}",
        )
    refused_type(
        lambda: check_percentile("percentile", True),
        "percentile must be a number from 0 to 100, not bool",
    )


def test_a_server_s_latency_percentile_is_checked() -> None:
    stats = ua.ServerStats()
    assert stats.latency_us(50) == 0.0  # no fault yet
    refused_value(
        lambda: stats.latency_us(101), "percentile must be a number from 0 to 100, not 101"
    )


# -- the error tree ------------------------------------------------------------------------------


def test_the_type_error_is_an_invalid_argument_and_a_type_error() -> None:
    assert issubclass(InvalidArgumentType, ua.InvalidArgument)
    assert issubclass(InvalidArgumentType, TypeError)
    assert issubclass(InvalidArgumentType, ValueError)  # as every InvalidArgument is
    assert not issubclass(ua.InvalidArgument, TypeError)  # an out-of-range value is not


def test_a_damaged_working_set_is_in_the_tree() -> None:
    with pytest.raises(ua.WorkingSetError, match="too short") as info:
        ua.WorkingSet.from_bytes(b"junk")
    assert isinstance(info.value, ua.UffdError) and isinstance(info.value, ValueError)
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == "4 bytes is too short for a working set (truncated?)"


def test_no_source_page_is_in_the_tree_and_still_a_lookup_error() -> None:
    assert issubclass(ua.NoSourcePage, ua.UffdError)
    assert issubclass(ua.NoSourcePage, LookupError)
    error = ua.NoSourcePage("nothing at 0x1000")
    assert (error.errno, str(error)) == (errno.EINVAL, "nothing at 0x1000")


def test_both_are_importable_from_where_they_were() -> None:
    from uffd_async._restore._working_set import WorkingSetError

    assert WorkingSetError is ua.WorkingSetError
    assert uffd_async.resolvers.NoSourcePage is ua.NoSourcePage
    assert "NoSourcePage" in uffd_async.resolvers.__all__


# -- the call sites, through the public API -----------------------------------------------------


def test_the_server_checks_with_invalid_argument(lab: Lab) -> None:
    uffd = lab.uffd()
    zero = ua.zero_fill()
    refused_value(lambda: ua.FaultServer(uffd, zero, limit=0), "limit must be an int >= 1, not 0")
    refused_type(lambda: ua.FaultServer(uffd, zero, limit=True), "limit must be an int, not bool")
    refused_value(
        lambda: ua.FaultServer(uffd, zero, page_size=3 * P),
        f"page_size must be a power of two >= 4096, not {3 * P}",
    )
    refused_type(
        lambda: ua.FaultServer(uffd, zero, on_error="zero"),  # type: ignore[arg-type]
        "on_error must be an OnError, not str",
    )
    refused_type(
        lambda: ua.FaultServer("uffd", zero),  # type: ignore[arg-type]
        "uffd must be a Userfaultfd, not str",
    )
    refused_type(
        lambda: ua.FaultServer(uffd, None),  # type: ignore[arg-type]
        "resolver must be an async callable, not NoneType",
    )
    ua.FaultServer(uffd, zero, limit=1, page_size=2 << 20)  # the least limit, a huge page: taken


def test_the_reader_checks_batch_and_spin(lab: Lab) -> None:
    uffd = lab.uffd()
    refused_value(lambda: ua.EventReader(uffd, batch=0), "batch must be an int >= 1, not 0")
    refused_value(
        lambda: ua.EventReader(uffd, spin=0.02),
        "spin must be a finite number of seconds >= 0 and <= 0.01, not 0.02",
    )
    ua.EventReader(uffd, batch=1, spin=0.01)


def test_read_events_bounds_are_named(lab: Lab) -> None:
    uffd = lab.uffd()
    refused_value(lambda: uffd.read_events(0), "max_events must be an int from 1 to 65536, not 0")
    refused_type(lambda: uffd.read_events(1.5), "max_events must be an int, not float")  # type: ignore[arg-type]


def test_copy_from_checks_its_page_size_and_counts() -> None:
    data = b"x" * P
    refused_value(
        lambda: ua.copy_from(data, base=0, page_size=3000),
        "page_size must be a power of two >= 4096, not 3000",
    )
    refused_value(
        lambda: ua.copy_from(data, base=0, readahead=-1), "readahead must be an int >= 0, not -1"
    )
    refused_type(lambda: ua.copy_from(data, base=True), "base must be an int, not bool")


def test_region_fill_refuses_a_byte_out_of_range() -> None:
    with ua.Region.anonymous(P) as region:
        refused_value(lambda: region.fill(0, 1, 256), "byte must be an int from 0 to 255, not 256")
        refused_type(lambda: region.fill(0, 1, True), "byte must be an int, not bool")
        region.fill(0, 1, 255)
        assert region.read(0, 1) == b"\xff"


def test_handoff_server_options_are_checked_before_anything_is_created(tmp_path: Path) -> None:
    path = tmp_path / "uffd.sock"
    source = tmp_path / "no-such-snapshot"
    refused_value(
        lambda: ua.HandoffServer(path, source, socket_mode=0o4777),
        f"socket_mode must be permission bits (0 to 0o777), not {0o4777}",
    )
    refused_value(
        lambda: ua.HandoffServer(path, source, socket_group=-1),
        "socket_group must be a name or a gid, not -1",
    )
    refused_value(
        lambda: ua.HandoffServer(path, source, allowed_uids={-1}),
        "each of allowed_uids must be a uid (an int >= 0), not -1",
    )
    refused_value(
        lambda: ua.HandoffServer(path, source, timeout=math.inf),
        "timeout must be a finite number of seconds > 0, not inf",
    )
    refused_type(
        lambda: ua.HandoffServer(path, source, readahead=1.0),  # type: ignore[arg-type]
        "readahead must be an int, not float",
    )
    ua.HandoffServer(path, source, socket_mode=0o777, allowed_uids={0})
    assert os.listdir(tmp_path) == []


def test_http_source_counts_and_timeout() -> None:
    pytest.importorskip("httpx")
    url = "http://127.0.0.1:9/snapshot"  # never contacted: the checks come first
    refused_value(
        lambda: ua.HttpSource(url, concurrency=0), "concurrency must be an int >= 1, not 0"
    )
    refused_type(lambda: ua.HttpSource(url, retries=True), "retries must be an int, not bool")
    refused_value(
        lambda: ua.HttpSource(url, timeout=math.nan),
        "timeout must be a finite number of seconds > 0, not nan",
    )


def test_send_uffd_refuses_what_is_not_an_fd_as_a_type_error() -> None:
    """A negative fd was a TypeError before the checks were unified, and stays one."""
    regions = [ua.GuestMapping(base_host_virt_addr=0x10000, size=P, offset=0, page_size=P)]
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        refused_type(lambda: ua.send_uffd(left, -1, regions), "uffd must be an open fd, not -1")
        refused_type(lambda: ua.send_uffd(left, True, regions), "uffd must be an open fd, not bool")
        refused_type(
            lambda: ua.send_uffd(left, 0, regions, memfd=-2), "memfd must be an open fd, not -2"
        )
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            right.recv(1)  # nothing was sent
