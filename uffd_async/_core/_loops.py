"""Which event loop to run on, and which one is running.

The library runs on any anyio backend. On asyncio, uvloop (an optional extra:
``pip install uffd_async[uvloop]``) runs the same code with a loop written in
C: every awaited resolution costs the loop less there (timers, task wakes
and fd readiness are libuv's), so the CLI and the benchmarks use it when it
is installed. Nothing here imports uvloop unless it is asked for.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["LOOPS", "SLICE_NS", "choose_backend", "describe_loop", "run", "uvloop_available"]

T = TypeVar("T")

#: How long (ns) a task of the server may go on with work that keeps coming, without
#: awaiting anything, before it checkpoints: other tasks (other uffds' servers) wait
#: about that long at most, and a cancellation is seen within it.
SLICE_NS = 1_000_000

#: Loop names :func:`choose_backend` accepts ("auto" is what ``None`` means).
LOOPS = ("auto", "asyncio", "asyncio+uvloop", "uvloop", "trio")


def uvloop_available() -> bool:
    """Whether uvloop can be imported (without importing it)."""
    return importlib.util.find_spec("uvloop") is not None


def choose_backend(loop: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(backend, backend_options)`` for ``anyio.run`` to run on ``loop``.

    ``None`` or ``"auto"``: asyncio on uvloop when uvloop is installed, else
    plain asyncio. ``"asyncio"``: the standard library's loop. ``"uvloop"``
    or ``"asyncio+uvloop"``: asyncio on uvloop (``ImportError`` naming the
    extra when it is not installed). ``"trio"``: trio (likewise). Anything else:
    ``ValueError``.
    """
    if loop is None or loop == "auto":
        return ("asyncio", {"use_uvloop": True}) if uvloop_available() else ("asyncio", {})
    if loop == "asyncio":
        return "asyncio", {}
    if loop in ("uvloop", "asyncio+uvloop"):
        if not uvloop_available():
            raise ImportError(
                f"loop {loop!r} needs uvloop: pip install 'uffd_async[uvloop]'", name="uvloop"
            )
        return "asyncio", {"use_uvloop": True}
    if loop == "trio":
        if importlib.util.find_spec("trio") is None:
            raise ImportError("loop 'trio' needs trio: pip install 'uffd_async[trio]'", name="trio")
        return "trio", {}
    raise ValueError(f"unknown loop {loop!r}; known: {', '.join(LOOPS)}")


def run(func: Callable[..., Awaitable[T]], *args: Any, loop: str | None = None) -> T:
    """``anyio.run(func, *args)`` on ``loop`` (see :func:`choose_backend`)."""
    import anyio

    backend, options = choose_backend(loop)
    return anyio.run(func, *args, backend=backend, backend_options=options)


def describe_loop() -> str:
    """The running loop in a few words: ``"asyncio (uvloop)"``, ``"asyncio"``, ``"trio"``.

    Another asyncio loop implementation is named by its top-level module, as in
    ``"asyncio (winloop)"``. Outside a running loop: ``RuntimeError``.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        if in_trio():
            return "trio"
        raise RuntimeError("no event loop is running in this thread") from None
    module = type(running).__module__.partition(".")[0]
    return "asyncio" if module == "asyncio" else f"asyncio ({module})"


def in_trio() -> bool:
    """Whether this thread is running trio (without importing trio)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
