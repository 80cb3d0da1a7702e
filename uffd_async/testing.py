"""Breakpoints on memory accesses, for tests under structured concurrency.

``FaultGate`` registers memory and, instead of resolving faults, hands them
to the test: ``fault = await gate.next_fault()`` pauses the faulting thread
(native code, a C library, anything that touches the memory without the
GIL) at that exact access, for as long as the test likes; ``await
gate.resolve(fault, data)`` lets it go on. Leaving the gate releases every
thread still held, so none stays blocked.

Faults are served by the library's server, so several threads on one page
are one fault to the test, and a gated fault is an in-flight resolution.
"""

from __future__ import annotations

from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._core._abi import PAGE_SIZE, FaultFlags, Feature, Mode
from ._core._errors import PageExists
from ._core._events import PageFault
from ._core._uffd import Userfaultfd
from ._serve._options import ServeOptions
from ._serve._resolvers import AnyResolver, Resolver
from ._serve._server import FaultServer

__all__ = ["FaultGate"]


def _default_answer(fault: PageFault, uffd: Userfaultfd, data: Any) -> None:
    page = fault.address & ~(PAGE_SIZE - 1)
    try:
        if fault.flags & FaultFlags.MINOR:
            uffd.continue_(page, PAGE_SIZE)
        elif fault.flags & FaultFlags.WP:
            uffd.writeprotect(page, PAGE_SIZE, protect=False)
        elif data is None:
            uffd.zeropage(page, PAGE_SIZE)
        else:
            uffd.copy(page, data, PAGE_SIZE)
    except PageExists:
        uffd.wake(page, PAGE_SIZE)


class _Held:
    def __init__(self) -> None:
        self.decided = anyio.Event()
        self.done = anyio.Event()
        self.data: Any = None
        self.error: BaseException | None = None


class _Gate(Resolver):
    def __init__(self, gate: FaultGate) -> None:
        self._gate = gate

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        await self._gate._hold(fault)


class FaultGate:
    """Holds every fault in ``[address, address + length)`` until the test resolves it.

    ``uffd``: an open handle to use (the gate registers the range on it); by
    default the gate opens its own and closes it on exit. ``release`` (a
    resolver) answers faults once :meth:`release` is called or the gate
    exits; by default zero pages (MISSING), unprotect (WP), CONTINUE (MINOR).
    """

    def __init__(
        self,
        address: int,
        length: int,
        *,
        mode: Mode = Mode.MISSING,
        features: Feature = Feature(0),
        uffd: Userfaultfd | None = None,
    ) -> None:
        self._address = address
        self._length = length
        self._mode = mode
        self._features = features
        self._owned = uffd is None
        self._uffd = uffd
        self._held: dict[int, _Held] = {}
        self._released: AnyResolver | None = None
        self._release_all = False
        send, receive = anyio.create_memory_object_stream[PageFault](float("inf"))
        self._send: MemoryObjectSendStream[PageFault] = send
        self._receive: MemoryObjectReceiveStream[PageFault] = receive
        self._server: FaultServer | None = None

    @property
    def uffd(self) -> Userfaultfd:
        if self._uffd is None:
            raise RuntimeError("the gate is not open")
        return self._uffd

    async def __aenter__(self) -> FaultGate:
        if self._uffd is None:
            self._uffd = Userfaultfd.open(self._features)
        try:
            self._uffd.register(self._address, self._length, self._mode)
            self._server = FaultServer(self._uffd, _Gate(self), options=ServeOptions(limit=1 << 16))
            await self._server.__aenter__()
        except BaseException:
            self._send.close()
            self._receive.close()
            if self._owned:
                self._uffd.close()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self.release()
        server, self._server = self._server, None
        try:
            if server is not None:
                with anyio.CancelScope(shield=True):
                    await self._drain()
                return await server.__aexit__(*exc_info)
            return None
        finally:
            self._send.close()
            self._receive.close()
            if self._owned and self._uffd is not None:
                self._uffd.close()

    async def _drain(self) -> None:
        """Let held faults finish their release before the server stops."""
        with anyio.move_on_after(5):
            while self._held:
                await anyio.sleep(0.001)

    async def _hold(self, fault: PageFault) -> None:
        uffd = self.uffd
        if self._release_all:
            await self._answer_released(fault, uffd)
            return
        page = fault.address & ~(PAGE_SIZE - 1)
        held = self._held[page] = _Held()
        try:
            self._send.send_nowait(fault)
            await held.decided.wait()
            if held.data is _RELEASE:
                await self._answer_released(fault, uffd)
            else:
                _default_answer(fault, uffd, held.data)
        except BaseException as exc:
            held.error = exc
            raise
        finally:
            del self._held[page]
            held.done.set()

    async def _answer_released(self, fault: PageFault, uffd: Userfaultfd) -> None:
        resolver = self._released
        if resolver is None:
            _default_answer(fault, uffd, None)
        elif isinstance(resolver, Resolver):
            await resolver(fault, uffd)
        else:
            await resolver(fault, uffd)

    async def next_fault(self) -> PageFault:
        """The next held fault (one per page, whatever the number of threads on it)."""
        return await self._receive.receive()

    async def resolve(self, fault: PageFault, data: Any = None) -> None:
        """Let the thread(s) at ``fault`` go on: with ``data`` (one page; bytes-like)
        for a missing fault, else a zero page, unprotect or CONTINUE as the fault needs."""
        page = fault.address & ~(PAGE_SIZE - 1)
        held = self._held.get(page)
        if held is None:
            raise LookupError(f"no fault is held at {page:#x}")
        held.data = data
        held.decided.set()
        await held.done.wait()

    def release(self, resolver: AnyResolver | None = None) -> None:
        """Stop holding: every held fault, and every later one, is answered by ``resolver``."""
        self._released = resolver
        self._release_all = True
        for held in self._held.values():
            if not held.decided.is_set():
                held.data = _RELEASE
                held.decided.set()


_RELEASE = object()
