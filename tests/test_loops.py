"""Choosing the event loop (uffd_async._core._loops), and real faults served on asyncio + uvloop.

The suite's async tests run on asyncio and trio (conftest's ``anyio_backend``); the
tests here start their own loops, uvloop among them, through ``_loops.run``.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core import _loops

from ._support import TIMEOUT, Lab, finished, pattern, source_bytes
from .test_reader import close_wakes_reader

P = ua.PAGE_SIZE
ROOT = Path(__file__).parent.parent
needs_uvloop = pytest.mark.skipif(not _loops.uvloop_available(), reason="uvloop is not installed")


@pytest.fixture(scope="module", autouse=True)
def _libuv_started() -> None:
    """libuv opens a pipe for signals with the first loop of a process and keeps it for
    good: open it before the suite's per-test check for leaked fds looks."""
    if _loops.uvloop_available():
        import uvloop

        uvloop.new_event_loop().close()


def test_auto_is_asyncio_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loops, "uvloop_available", lambda: True)
    assert _loops.choose_backend() == ("asyncio", {"use_uvloop": True})
    assert _loops.choose_backend("auto") == ("asyncio", {"use_uvloop": True})
    monkeypatch.setattr(_loops, "uvloop_available", lambda: False)
    assert _loops.choose_backend() == ("asyncio", {})
    assert _loops.choose_backend("auto") == ("asyncio", {})


def test_named_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loops, "uvloop_available", lambda: True)
    assert _loops.choose_backend("asyncio") == ("asyncio", {})
    assert _loops.choose_backend("uvloop") == ("asyncio", {"use_uvloop": True})
    assert _loops.choose_backend("asyncio+uvloop") == ("asyncio", {"use_uvloop": True})
    assert _loops.choose_backend("trio") == ("trio", {})
    assert set(_loops.LOOPS) == {"auto", "asyncio", "asyncio+uvloop", "uvloop", "trio"}


def test_unknown_loop_and_missing_uvloop_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown loop 'curio'"):
        _loops.choose_backend("curio")
    monkeypatch.setattr(_loops, "uvloop_available", lambda: False)
    for name in ("uvloop", "asyncio+uvloop"):
        with pytest.raises(ImportError, match=r"uffd_async\[uvloop\]"):
            _loops.choose_backend(name)


def test_the_core_needs_no_uvloop() -> None:
    """Without uvloop (an optional extra) everything imports, and "auto" is plain asyncio;
    with it, choosing a loop does not import it."""
    code = (
        "import sys; sys.modules['uvloop'] = None\n"  # `import uvloop` fails from here on
        "import uffd_async, uffd_async.__main__, uffd_async._core._loops as loops\n"
        "assert loops.choose_backend() == ('asyncio', {}), loops.choose_backend()\n"
        "async def describe(): return loops.describe_loop()\n"
        "assert loops.run(describe) == 'asyncio'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
    code = (
        "import sys, uffd_async, uffd_async._core._loops as loops\n"
        "loops.uvloop_available(); loops.choose_backend(); loops.choose_backend('trio')\n"
        "assert 'uvloop' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


async def _describe() -> str:
    return _loops.describe_loop()


@pytest.mark.parametrize(
    ("loop", "described"),
    [
        ("asyncio", "asyncio"),
        pytest.param("uvloop", "asyncio (uvloop)", marks=needs_uvloop),
        ("trio", "trio"),
    ],
)
def test_describe_the_running_loop(loop: str, described: str) -> None:
    assert _loops.run(_describe, loop=loop) == described


def test_describe_outside_a_loop() -> None:
    with pytest.raises(RuntimeError, match="no event loop"):
        _loops.describe_loop()


async def _serve_awaiting(lab: Lab, threads: int, pages_each: int) -> dict[str, Any]:
    """Threads fault at once on pages whose resolver awaits: the worker pool and the
    workers' polls of the uffd take part."""
    pages = threads * pages_each
    source = source_bytes(pages)
    uffd = lab.uffd()
    region = lab.anonymous(pages)
    uffd.register(region.address, region.length)

    async def fetch(offset: int, length: int) -> bytes:
        await anyio.sleep(0.001)
        return source[offset : offset + length]

    resolver = ua.copy_from(fetch, base=region.address, size=region.length)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver, limit=threads) as server:
            share = pages_each * P
            workers = [lab.touch(region.address + n * share, share) for n in range(threads)]
            for worker in workers:
                await finished(worker)
    return {
        "loop": _loops.describe_loop(),
        "bytes_ok": region.read(0, region.length) == source,
        "stats": server.stats,
    }


@pytest.mark.parametrize("loop", ["asyncio", pytest.param("uvloop", marks=needs_uvloop), "trio"])
def test_real_faults_served_with_an_awaiting_resolver(lab: Lab, loop: str) -> None:
    result = _loops.run(_serve_awaiting, lab, 16, 4, loop=loop)
    assert result["loop"] == {"uvloop": "asyncio (uvloop)"}.get(loop, loop)
    assert result["bytes_ok"]
    stats = result["stats"]
    assert stats.faults == stats.resolved == 64
    assert stats.errors == 0 and stats.in_flight == 0


@needs_uvloop
def test_closing_wakes_a_waiting_reader_on_uvloop(lab: Lab) -> None:
    assert _loops.run(close_wakes_reader, lab, loop="uvloop") == ["closed"]


async def _inline_and_error(lab: Lab) -> tuple[bytes, list[str]]:
    """Inline resolutions (no task), and a failing awaited one under on_error."""
    uffd = lab.uffd()
    region = lab.anonymous(2)
    uffd.register(region.address, region.length)
    errors: list[str] = []

    async def resolver(fault: ua.PageFault, uffd: ua.Userfaultfd) -> None:
        await anyio.sleep(0)
        if fault.page != region.address:
            errors.append("raised")
            raise RuntimeError("no such page")
        uffd.copy(fault.page, pattern(0))

    on_error = ua.OnError(page="zero", propagate=False)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver, on_error=on_error):
            await finished(lab.touch(region.address, region.length, write=False))
    return region.read(0, region.length), errors


@needs_uvloop
def test_resolver_errors_are_disposed_of_on_uvloop(lab: Lab) -> None:
    data, errors = _loops.run(_inline_and_error, lab, loop="uvloop")
    assert data == pattern(0) + bytes(P)
    assert errors == ["raised"]


def test_bytes_address_is_what_ctypes_sees() -> None:
    from uffd_async._core._memory import buffer_address

    data = bytes(range(256)) * 16
    address, length, keep = buffer_address(data)
    assert length == len(data) and keep is data
    assert address == ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
