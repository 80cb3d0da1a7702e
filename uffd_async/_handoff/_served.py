"""What a handoff server offers the code that carries its serving past its own process.

The takeover (:mod:`._successor`: everything to a successor, or from a predecessor)
and systemd's fd store (:mod:`._fdstore`) see a handoff server only as
:class:`Served`: the handoffs it serves, a pause in accepting for a successor, its
counters, latency and recording (out as :class:`Progress`, in with
:meth:`Served.carry_on`), and a resolver for a handoff carried over. Both send the
same state, :func:`succession_state`.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from .._serve._resolvers import AnyResolver
from .._serve._stats import LatencyHistogram
from ._handover import Handover, LiveHandoff
from ._succession import CarriedHandoff, Succession
from ._transfer import Handoff

__all__ = ["Progress", "Served", "succession_state"]


@attrs.frozen
class Progress:
    """What a successor goes on from: the counters so far, every resolution's latency, and
    the pages recorded (None: no recording)."""

    totals: dict[str, int]
    latency: LatencyHistogram
    recording: tuple[int, ...] | None


class Served(Protocol):
    """A handoff server, as the takeover and the fd store see it."""

    @property
    def path(self) -> str:
        """The socket path it serves on (a successor finds it by this)."""
        ...

    @property
    def timeout(self) -> float:
        """Seconds a peer (or a successor) gets for its part of an exchange."""
        ...

    @property
    def draining(self) -> bool:
        """Whether it stopped accepting for good: it takes no successor then."""
        ...

    def handoffs(self) -> list[LiveHandoff]:
        """Every handoff served now: a successor (or the fd store) has each one."""
        ...

    def handshaking(self) -> bool:
        """Whether a peer is mid-handshake: soon served, and then handed over with the rest."""
        ...

    def pause(self) -> Handover:
        """Stop accepting for a successor: until the handover returned is over, nothing
        is accepted, and each handoff's serving, once stopped, waits for it."""
        ...

    def resume(self, handover: Handover, *, handed_over: bool) -> None:
        """End ``handover``: accept and serve on, or (``handed_over``) never again."""
        ...

    def progress(self, *, latency: bool, recording: bool = True) -> Progress:
        """The counters now; the latency histogram only if ``latency`` (else an empty
        one), the recording only if ``recording`` (else None)."""
        ...

    def recorded(self) -> int:
        """How many pages are recorded so far: cheap, to tell when the recording changed."""
        ...

    def carry_on(self, state: Succession, adopted: list[LiveHandoff]) -> None:
        """Go on from a predecessor's counters, latency and recording (``adopted``: the
        handoffs taken over from it, each counted again as it is served here)."""
        ...

    def resolver_for(self, handoff: Handoff) -> AnyResolver:
        """A new resolver for ``handoff``, as a peer's handshake gets one."""
        ...


def succession_state(
    progress: Progress, version: int, fds: list[int], carried: list[CarriedHandoff], **more: Any
) -> Succession:
    """The state a successor gets (over the control socket, or from the fd store)."""
    return Succession(
        version=version,
        fds=len(fds),
        handoffs=tuple(carried),
        totals=progress.totals,
        latency=tuple(progress.latency.counts),
        latency_ns=progress.latency.total_ns,
        recording=progress.recording,
        **more,
    )
