"""Options as objects: each one checks its values when made, keywords make the same object,
and an object and a keyword that disagree are refused.

That every option reaches a fork child's server and a handoff peer's server is shown
with real processes in test_handoff_serving.py (``NOT_DEFAULT``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

import uffd_async as ua
from uffd_async.__main__ import _handoff_options, main

from ._support import Lab

P = ua.PAGE_SIZE

#: (options class, keywords, the refusal's message, its error type)
BAD: list[tuple[type[Any], dict[str, Any], str, type[Exception]]] = [
    (ua.ServeOptions, {"limit": 0}, "limit must be an int >= 1, not 0", ValueError),
    (ua.ServeOptions, {"limit": True}, "limit must be an int, not bool", TypeError),
    (ua.ServeOptions, {"batch": 0}, "batch must be an int from 1 to 65536, not 0", ValueError),
    (ua.ServeOptions, {"batch": 1 << 17}, "batch must be an int from 1 to 65536", ValueError),
    (ua.ServeOptions, {"on_error": "zero"}, "on_error must be an OnError, not str", TypeError),
    (ua.ServeOptions, {"page_size": 3000}, "page_size must be a power of two >= 4096", ValueError),
    (ua.ServeOptions, {"spin": -1.0}, "spin must be a finite number of seconds >= 0", ValueError),
    (ua.ServeOptions, {"spin": 0.5}, "seconds >= 0 and <= 0.01, not 0.5", ValueError),
    (ua.PeerPolicy, {"allowed_uids": {-1}}, "each of allowed_uids must be a uid", ValueError),
    (ua.PeerPolicy, {"allowed_uids": 0}, "allowed_uids must be a set of uids, not int", TypeError),
    (ua.PeerPolicy, {"socket_mode": 0o4777}, "socket_mode must be permission bits", ValueError),
    (ua.PeerPolicy, {"socket_group": -1}, "socket_group must be a name or a gid", ValueError),
    (ua.PeerPolicy, {"socket_group": 1.5}, "a name or a gid, not float", TypeError),
    (ua.PeerPolicy, {"timeout": 0}, "timeout must be a finite number of seconds > 0", ValueError),
    (ua.PeerPolicy, {"timeout": math.nan}, "seconds > 0, not nan", ValueError),
    (ua.PeerPolicy, {"max_message": 0}, "max_message must be an int >= 1, not 0", ValueError),
    (ua.PeerPolicy, {"max_regions": 0}, "max_regions must be an int >= 1, not 0", ValueError),
    (ua.ReplayOptions, {"readahead": -1}, "readahead must be an int >= 0, not -1", ValueError),
    (ua.ReplayOptions, {"readahead": 1.0}, "readahead must be an int, not float", TypeError),
    (ua.ReplayOptions, {"populate": 1}, "populate must be a bool, not int", TypeError),
    (ua.ReplayOptions, {"record": "x.ws", "readahead": 2}, "record with readahead=0", ValueError),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "keywords", "message", "kind"), BAD)
def test_a_bad_value_is_refused_when_the_options_are_made(
    cls: type[Any], keywords: dict[str, Any], message: str, kind: type[Exception]
) -> None:
    with pytest.raises(ua.InvalidArgument) as info:
        cls(**keywords)
    assert message in str(info.value)
    assert isinstance(info.value, kind)


def test_the_options_are_frozen_values() -> None:
    for cls in (ua.ServeOptions, ua.PeerPolicy, ua.ReplayOptions):
        options = cls()
        assert options == cls() and hash(options) == hash(cls())
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(options, attrs.fields(cls)[0].name, None)
        with pytest.raises(TypeError):
            cls(0)  # type: ignore[call-arg, arg-type]  # keywords only


def test_peer_policy_holds_what_it_was_given() -> None:
    policy = ua.PeerPolicy(allowed_uids=[7, 7, 8], socket_mode=0o660, socket_group="root")
    assert policy.allowed_uids == frozenset({7, 8})  # the caller's own uid is the server's
    assert ua.PeerPolicy(allowed_uids=None).allowed_uids == frozenset()
    assert ua.ReplayOptions(record=Path("a.ws")).record == "a.ws"


# -- serve and FaultServer --------------------------------------------------------------


def test_fault_server_keywords_make_the_same_options(lab: Lab) -> None:
    uffd = lab.uffd()
    on_error = ua.OnError(page="leave", propagate=False)
    keywords: dict[str, Any] = {
        "limit": 3,
        "batch": 5,
        "on_error": on_error,
        "page_size": 2 * P,
        "spin": 0,
    }
    by_keyword = ua.FaultServer(uffd, ua.zero_fill(), **keywords)
    options = ua.ServeOptions(**keywords)
    by_object = ua.FaultServer(uffd, ua.zero_fill(), options=options)
    assert by_keyword._server.options == by_object._server.options == options
    assert by_object._server.options is options  # nothing was left open: the very object
    settled = ua.FaultServer(uffd, ua.zero_fill())._server.options
    assert settled == ua.ServeOptions(on_error=ua.OnError(), page_size=P, spin=ua.DEFAULT_SPIN)


def test_fault_server_refuses_an_object_and_a_keyword_that_disagree(lab: Lab) -> None:
    uffd = lab.uffd()
    options = ua.ServeOptions(limit=3)
    with pytest.raises(ua.InvalidArgument, match=r"limit=4 disagrees with options.limit=3"):
        ua.FaultServer(uffd, ua.zero_fill(), options=options, limit=4)
    with pytest.raises(ua.InvalidArgument, match=r"batch=8 disagrees with options.batch=64"):
        ua.FaultServer(uffd, ua.zero_fill(), options=options, batch=8)  # its default is 64
    agreeing = ua.FaultServer(uffd, ua.zero_fill(), options=options, limit=3)
    assert agreeing._server.options.limit == 3
    with pytest.raises(TypeError, match="options must be a ServeOptions, not dict"):
        ua.FaultServer(uffd, ua.zero_fill(), options={"limit": 3})  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_serve_refuses_a_conflict_before_serving(lab: Lab) -> None:
    uffd = lab.uffd()
    with pytest.raises(ua.InvalidArgument, match=r"spin=0 disagrees with options\.spin=None"):
        await ua.serve(uffd, ua.zero_fill(), options=ua.ServeOptions(), spin=0)
    with pytest.raises(ua.InvalidArgument, match="limit must be an int >= 1"):
        await ua.serve(uffd, ua.zero_fill(), options=ua.ServeOptions(), limit=0)


# -- HandoffServer and serve_handoffs ---------------------------------------------------

KEYWORDS: dict[str, Any] = {
    "allowed_uids": {1234},
    "socket_mode": 0o660,
    "socket_group": 0,
    "timeout": 2.5,
    "max_message": 4096,
    "max_regions": 8,
    "max_peers": 3,
    "readahead": 0,
    "record": "recorded.ws",
    "prefetch": None,
    "populate": True,
    "limit": 5,
    "on_error": ua.OnError(page="zero"),
}


def objects() -> dict[str, Any]:
    return {
        "policy": ua.PeerPolicy(
            allowed_uids={1234}, socket_mode=0o660, socket_group=0, timeout=2.5,
            max_message=4096, max_regions=8, max_peers=3,
        ),
        "replay": ua.ReplayOptions(readahead=0, record="recorded.ws", populate=True),
        "serving": ua.ServeOptions(limit=5, on_error=ua.OnError(page="zero")),
    }  # fmt: skip


def test_handoff_server_keywords_make_the_same_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the recording's directory must exist
    path, source = tmp_path / "uffd.sock", tmp_path / "snapshot"
    by_keyword = ua.HandoffServer(path, source, **KEYWORDS)
    by_object = ua.HandoffServer(path, source, **objects())
    for name, given in objects().items():
        assert getattr(by_keyword, name) == getattr(by_object, name) == given, name
    assert by_keyword.allowed_uids == by_object.allowed_uids == {os.geteuid(), 1234}
    # Every keyword belongs to exactly one object: none is left out, none is extra.
    fields = {f.name for cls in (ua.PeerPolicy, ua.ReplayOptions) for f in attrs.fields(cls)}
    assert set(KEYWORDS) == fields | {"limit", "on_error"}
    assert os.listdir(tmp_path) == []  # checked, nothing created


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("timeout", 3.0, "timeout=3.0 disagrees with policy.timeout=2.5"),
        ("allowed_uids", [5], "allowed_uids=[5] disagrees with policy.allowed_uids="),
        ("readahead", 2, "readahead=2 disagrees with replay.readahead=0"),
        ("populate", False, "populate=False disagrees with replay.populate=True"),
        ("limit", 6, "limit=6 disagrees with serving.limit=5"),
        ("on_error", ua.OnError(), "on_error=OnError(page='poison', propagate=True) disagrees"),
    ],
)
def test_handoff_server_refuses_an_object_and_a_keyword_that_disagree(
    tmp_path: Path, keyword: str, value: Any, message: str
) -> None:
    path, source = tmp_path / "uffd.sock", tmp_path / "snapshot"
    for make in (ua.HandoffServer, _serve_handoffs_now):
        with pytest.raises(ua.InvalidArgument, match=_escaped(message)):
            make(path, source, **objects(), **{keyword: value})
    ua.HandoffServer(path, source, **objects(), **{keyword: KEYWORDS[keyword]})  # they agree


def _serve_handoffs_now(*args: Any, **kwargs: Any) -> None:
    """serve_handoffs up to its first check: a refusal comes before any await."""
    coroutine = ua.serve_handoffs(*args, **kwargs)
    try:
        coroutine.send(None)
    finally:
        coroutine.close()


def _escaped(text: str) -> str:
    return "".join("\\" + c if c in "()[]{}.*+?^$|" else c for c in text)


def test_a_handoff_server_chooses_each_handoffs_page_size(tmp_path: Path) -> None:
    with pytest.raises(ua.InvalidArgument, match=r"serving\.page_size does not apply"):
        ua.HandoffServer(tmp_path / "s", tmp_path / "x", serving=ua.ServeOptions(page_size=P))


def test_options_objects_are_checked_against_the_source(tmp_path: Path) -> None:
    """What depends on the source is the server's to check, whichever way it came."""
    factory: Callable[[ua.Handoff], Any] = lambda handoff: ua.zero_fill()  # noqa: E731
    with pytest.raises(ua.InvalidArgument, match="readahead applies to snapshot sources"):
        ua.HandoffServer(tmp_path / "s", factory, replay=ua.ReplayOptions(readahead=2))
    with pytest.raises(ua.InvalidArgument, match="record, prefetch and populate apply"):
        ua.HandoffServer(tmp_path / "s", factory, replay=ua.ReplayOptions(populate=True))
    with pytest.raises(ua.InvalidArgument, match="abstract socket has no file"):
        ua.HandoffServer("\0abstract", tmp_path / "x", policy=ua.PeerPolicy(socket_mode=0o600))
    with pytest.raises(ua.InvalidArgument, match="no group named"):
        ua.HandoffServer(tmp_path / "s", tmp_path / "x", socket_group="no-such-group-here")


# -- the command line -------------------------------------------------------------------


def test_the_cli_builds_the_options_in_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flag that is a handoff option lands in the object, with the library's meaning."""
    built: list[tuple[ua.PeerPolicy, ua.ReplayOptions]] = []

    def fake_serve(args: Any) -> int:
        built.append(_handoff_options(args))
        return 0

    monkeypatch.setattr("uffd_async.__main__._serve", fake_serve)
    snapshot = tmp_path / "snapshot"
    snapshot.write_bytes(bytes(P))
    argv = [
        "serve", str(snapshot), "--socket", str(tmp_path / "s"), "--allow-uid", "7",
        "--allow-uid", "8", "--socket-mode", "640", "--socket-group", "0", "--timeout", "2.5",
        "--record", str(tmp_path / "r.ws"), "--populate", "all",
    ]  # fmt: skip
    assert main(argv) == 0
    [(policy, replay)] = built
    assert policy == ua.PeerPolicy(
        allowed_uids={7, 8}, socket_mode=0o640, socket_group=0, timeout=2.5
    )
    assert replay == ua.ReplayOptions(record=str(tmp_path / "r.ws"), populate=True)
    built.clear()
    assert main(["serve", str(snapshot), "--socket", str(tmp_path / "s")]) == 0
    assert built == [(ua.PeerPolicy(), ua.ReplayOptions())]  # the flags' defaults are its own
