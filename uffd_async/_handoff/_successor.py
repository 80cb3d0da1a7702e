"""A handoff server's side of a takeover: everything handed to a successor, or taken over.

The exchange on the control socket is :mod:`._takeover`'s, the rounds of each
handoff :mod:`._handover`'s; the server is seen as :class:`~._served.Served`.
Facts this relies on:

* A server offers itself to one successor at a time, on a control socket of its
  own, until one took over; a successor mid-handshake's peer is served first
  and handed over with the rest (nothing is accepted meanwhile).
* Stopping for a successor must not outlast ``timeout``: handoffs that do not
  stop in time fail the takeover, and serving resumes (the successor is told).
* Once the successor has everything, this server never serves again and leaves
  the socket file it listened on: the successor listens there now.
"""

from __future__ import annotations

import functools
import logging
import socket

import anyio

from .._core._errors import TakeoverError
from ._handover import Handover, LiveHandoff, adopt, carry
from ._listener import Listener
from ._served import Served, succession_state
from ._takeover import ControlSocket, Offered, Taken, offer, take_over

__all__ = ["control_socket", "offer_takeovers", "take_over_from"]

logger = logging.getLogger("uffd_async")


def control_socket(path: str) -> ControlSocket | None:
    """The control socket a successor connects to; None (logged) if it cannot be had."""
    try:
        return ControlSocket(path)
    except TakeoverError as exc:
        logger.warning("%s: no successor can take over", exc)
        return None


async def offer_takeovers(
    served: Served, control: ControlSocket, listener: Listener, listen_scope: anyio.CancelScope
) -> None:
    """Offer the control socket to successors, one at a time, until one took over (then
    ``listen_scope``, the server's, is cancelled)."""
    while True:
        try:
            conn = await control.accept()
        except anyio.ClosedResourceError:
            return  # closed with the listener: draining, or the source changed
        with conn:
            stop = functools.partial(_stop_for_successor, served, listener, control, listen_scope)
            if await offer(conn, stop, timeout=served.timeout):
                return


async def _stop_for_successor(
    served: Served,
    listener: Listener,
    control: ControlSocket,
    listen_scope: anyio.CancelScope,
    version: int,
) -> Offered:
    """Stop accepting and serving (waking what was read and not answered); what a
    successor needs. :class:`TakeoverError` (serving resumed) if that cannot be done."""
    if served.draining:
        raise TakeoverError("this server is draining: it takes no successor")
    handover = served.pause()
    try:
        with anyio.fail_after(served.timeout):
            while served.handshaking():  # a peer mid-handshake is served, then handed over
                await anyio.sleep(0.001)
            lives = served.handoffs()
            for live in lives:
                live.stop()
            for live in lives:
                await live.stopped.wait()
    except TimeoutError:
        served.resume(handover, handed_over=False)
        raise TakeoverError("the handoffs did not stop in time") from None
    fds = [listener.fileno(), control.sock.fileno()]
    still = {id(live) for live in served.handoffs()}  # less those whose serving failed
    carried = [carry(live, fds) for live in lives if id(live) in still]
    state = succession_state(
        served.progress(latency=True), version, fds, carried, listener=0, control=1
    )
    return Offered(
        state=state,
        fds=fds,
        resume=functools.partial(served.resume, handover, handed_over=False),
        commit=functools.partial(_commit, served, handover, listener, listen_scope),
    )


def _commit(
    served: Served, handover: Handover, listener: Listener, listen_scope: anyio.CancelScope
) -> None:
    """The successor holds everything: never serve again, and leave the socket file."""
    listener.keep_file()
    served.resume(handover, handed_over=True)
    listen_scope.cancel()


async def take_over_from(served: Served) -> tuple[Listener, ControlSocket, list[LiveHandoff]]:
    """Receive everything the server running on ``served.path`` serves; it then exits."""
    taken = await take_over(served.path, timeout=served.timeout)
    try:
        return await _adopt_taken(served, taken)
    finally:
        taken.close()


async def _adopt_taken(
    served: Served, taken: Taken
) -> tuple[Listener, ControlSocket, list[LiveHandoff]]:
    state = taken.state
    if state.listener is None or state.control is None:
        raise TakeoverError("the running server sent no listening socket")
    listener = Listener.adopt(socket.socket(fileno=taken.take(state.listener)))
    control = ControlSocket(served.path, socket.socket(fileno=taken.take(state.control)))
    adopted: list[LiveHandoff] = []
    try:
        for carried in state.handoffs:
            adopted.append(adopt(taken, carried, served.resolver_for))
        await taken.confirm()
    except BaseException:
        for live in adopted:
            live.close_children()
            live.peer.close()
            live.handoff.close()
            live.conn.close()
        listener.close()
        control.close()
        raise
    served.carry_on(state, adopted)
    logger.info(
        "took over %s: %d processes served, %d faults so far",
        served.path, len(adopted), state.totals.get("faults", 0),
    )  # fmt: skip
    return listener, control, adopted
