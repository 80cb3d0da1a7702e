"""What a fault does while its source is down: wait and keep trying, or fail at once.

A fault whose page cannot be fetched stops its thread on that page, and failing
it (UFFDIO_POISON: SIGBUS) usually kills whatever touched it, a whole VM often.
Most failures of a store are short: a failover, an NFS server restarting, a
network blip. So by default (:class:`SourcePolicy` ``on_error="wait"``) a demand
fetch whose retries ran out keeps trying, with capped exponential backoff and
full jitter, until ``deadline`` seconds after that fault's first failure; only
then is the fault failed as before (poisoned: SIGBUS, never wrong bytes).
``on_error="poison"`` keeps the old fail-fast. Facts this relies on:

* The kernel never times a fault out: a thread whose fault is not answered
  sleeps until it is (or the uffd is closed). Waiting costs the guest time,
  nothing else; the deadline is ours.
* Only what a source calls retriable is an outage (its ``Retry``: a connection
  error, a timeout, a 5xx, 408 or 429, a body cut short; a pack's I/O error).
  A request that is wrong (a 4xx: 404 of the pinned version, 403), an object
  that changed (``SourceChanged``) or bytes that fail their check (a pack's
  digest) would fail the same way again: they fail the fault at once, whatever
  the policy.
* No fetch sleeps while it holds one of the source's connection slots
  (:class:`~._chunks.Chunks`): a fetch that gives up raises :class:`Unavailable`
  out of the slot, and :meth:`Outage.fetch` backs off outside it, then asks
  again. So in an outage every slot is free for the next try, and a fault that
  queued for a slot never waits on another's backoff. A prefetch gives up at its
  first failure (it never retries holding a slot) and tries again on its own
  backoff: it resumes when the source is back even when no fault is left to try.
* Each fault's deadline is its own (the fetches of one chunk are shared, their
  failures too, but not the faults' clocks). Every sleeper wakes at once when
  any fetch succeeds: recovery is not held up by the longest backoff.
* An outage begins when a demand fetch runs out of retries (or a prefetch
  fails more times in a row than the retries allow), and ends at the next fetch
  that succeeds. It is logged once when it begins (what failed, in the source's
  words, which never hold credentials or a query string), at most once a minute
  while it lasts, and once when it ends (how long, how many faults waited).
* A remote source's ``read()`` and ``open()`` are not faults: they fail after
  their retries whatever the policy (what called them can say so; a stopped
  thread cannot). A pack's ``read()`` goes through its chunks, and fails as
  they do (``chunk(..., outage=False)``).
"""

from __future__ import annotations

import contextvars
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import attrs

from .._core._checks import check_seconds
from .._core._errors import FetchError, InvalidArgument
from ._chunks import ChunkStats

__all__ = [
    "DEFAULT_SOURCE_DEADLINE",
    "Outage",
    "OutageStats",
    "SourcePolicy",
    "Unavailable",
]

logger = logging.getLogger("uffd_async")

#: How long a fault waits on a failing source before it is poisoned: five minutes
#: outlast a store's failover or an NFS server's restart (tens of seconds to a couple
#: of minutes) with room, and stay within what an orchestrator waits for a sandbox
#: before it gives up on it blind; a guest stopped longer is rarely still wanted.
DEFAULT_SOURCE_DEADLINE = 300.0
#: The longest backoff between two tries of a failing source, by default.
DEFAULT_BACKOFF_CAP = 5.0
_BACKOFF = 0.05  # seconds before the first retry, doubled at each one
_REPORT_EVERY = 60.0  # seconds between two "still failing" lines

_T = TypeVar("_T")

#: What the running task's fetch is for: a demand fault, a prefetch, or neither
#: (``read``, ``open``: they fail after their retries). Set by :meth:`Outage.fetch`.
_ROLE: contextvars.ContextVar[Literal["demand", "prefetch"] | None] = contextvars.ContextVar(
    "uffd_async_fetch_role", default=None
)


def _on_error(instance: object, attribute: Any, value: object) -> None:
    if value not in ("wait", "poison"):
        raise InvalidArgument(errno.EINVAL, f"on_error must be 'wait' or 'poison', not {value!r}")


def _seconds(instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    check_seconds(attribute.name, value)


@attrs.frozen(kw_only=True)
class SourcePolicy:
    """What a fault does when its source fails (after its retries).

    ``on_error``: ``"wait"`` (the default: the faulting thread waits while the
    fetch is tried again, with backoff, for up to ``deadline`` seconds, then its
    page is poisoned) or ``"poison"`` (poisoned at once: SIGBUS, as before).
    ``deadline``: seconds a fault waits on a failing source (default five minutes).
    ``backoff_cap``: the longest pause between two tries while the source is down.
    Errors that cannot heal (a 4xx, a changed object, a damaged chunk) are never
    waited on.
    """

    on_error: Literal["wait", "poison"] = attrs.field(default="wait", validator=_on_error)
    deadline: float = attrs.field(default=DEFAULT_SOURCE_DEADLINE, validator=_seconds)
    backoff_cap: float = attrs.field(default=DEFAULT_BACKOFF_CAP, validator=_seconds)

    @property
    def waits(self) -> bool:
        return self.on_error == "wait"


@attrs.define(kw_only=True)
class OutageStats(ChunkStats):
    """A source's chunk counters, and what its outages cost (each failed try of an outage
    also counts in ``failed``)."""

    #: Faults waiting now on a source that is failing (a gauge), and all that ever did.
    faults_waiting: int = 0
    faults_waited: int = 0
    #: Outages begun, and seconds the source has been out in all (the current one too,
    #: as of its last try).
    outages: int = 0
    outage_seconds: float = 0.0
    #: Faults failed (poisoned) because the source was still failing at their deadline.
    deadline_failures: int = 0


class Unavailable(Exception):
    """A fetch gave up on a failing source without sleeping in its slot; ``error`` is why.
    Only :meth:`Outage.fetch` sees it: it backs off, then asks again (or fails the fault)."""

    def __init__(self, error: FetchError) -> None:
        self.error = error


class _Fault:
    __slots__ = ("stuck",)

    def __init__(self) -> None:
        self.stuck = False


class Outage:
    """One source's failing state under ``policy``; ``name()`` says which source (without
    credentials: its ``path``), ``stats`` gets the counts."""

    def __init__(self, policy: SourcePolicy, stats: OutageStats, name: Callable[[], str]) -> None:
        self.policy = policy
        self._stats = stats
        self._name = name
        self._since: float | None = None  # when the current outage began (monotonic)
        self._past = 0.0  # seconds of the outages over
        self._reported = 0.0  # when it was last logged
        self._waited = 0  # faults stuck in the current outage
        self._faults: set[_Fault] = set()  # demand fetches under way
        self._back: anyio.Event | None = None  # set when the current outage ends

    @property
    def active(self) -> bool:
        """Whether the source is failing now (an outage began and no fetch succeeded since)."""
        return self._since is not None

    # -- what a fetch calls ---------------------------------------------------------

    def quick_retry(self) -> bool:
        """Whether a fetch that failed may retry at once, in its slot: not a prefetch, nor a
        demand fetch while the source is known to be down (they back off outside it)."""
        role = _ROLE.get()  # set by fetch(), under the "wait" policy only
        if role is None:
            return True
        return role == "demand" and not self.active

    def gave_up(self, error: FetchError) -> Exception:
        """What a fetch raises when it stops trying: ``error`` itself where the policy (or
        the caller: ``read``, ``open``) fails at once; :class:`Unavailable` for a fault or
        a prefetch to wait on."""
        if _ROLE.get() is None:  # read(), open(), or the "poison" policy
            return error
        return Unavailable(error)

    def succeeded(self) -> None:
        """A fetch succeeded: an outage under way is over."""
        if self._since is None:
            return
        now = time.monotonic()
        out = now - self._since
        self._past += out
        self._stats.outage_seconds = self._past
        self._since = None
        logger.warning(
            "source %s is back after %.1f s out; %d fault%s waited for it",
            self._name(), out, self._waited, "" if self._waited == 1 else "s",
        )  # fmt: skip
        self._waited = 0
        for fault in self._faults:  # they are served now: they no longer count as stuck
            if fault.stuck:
                fault.stuck = False
                self._stats.faults_waiting -= 1
        if self._back is not None:
            self._back.set()
            self._back = None

    # -- the loop around a chunk fetch ------------------------------------------------

    async def fetch(self, get: Callable[[], Awaitable[_T]], *, demand: bool, retries: int) -> _T:
        """``get()`` (a chunk, through the source's single-flight fetches) for a demand
        fault or a prefetch, tried again as the module says while the source is down."""
        if not self.policy.waits:
            return await get()
        role = _ROLE.set("demand" if demand else "prefetch")
        fault = _Fault()
        if demand:
            self._faults.add(fault)
            if self.active:
                self._stick(fault)
        first: float | None = None
        failures = 0
        try:
            while True:
                try:
                    return await get()
                except Unavailable as unavailable:
                    error = unavailable.error
                now = time.monotonic()
                first = now if first is None else first
                failures += 1
                if demand or failures > retries:
                    self._failing(error, now)
                if demand and now - first >= self.policy.deadline:
                    self._stats.deadline_failures += 1
                    said = f" (still failing at the source deadline, {self.policy.deadline:g} s)"
                    if not str(error.strerror).endswith(said):  # one error, many faults
                        error.strerror = f"{error.strerror}{said}"
                    raise error from None
                tries = failures + retries if demand else failures  # a prefetch: no quick ones
                bound = min(self.policy.backoff_cap, _BACKOFF * 2**tries)
                delay = random.uniform(0, bound)
                if demand:
                    delay = min(delay, first + self.policy.deadline - now)
                await self._pause(delay)
        finally:
            _ROLE.reset(role)
            if demand:
                self._faults.discard(fault)
                if fault.stuck:
                    self._stats.faults_waiting -= 1

    # -- inside -----------------------------------------------------------------------

    def _stick(self, fault: _Fault) -> None:
        fault.stuck = True
        self._waited += 1
        self._stats.faults_waiting += 1
        self._stats.faults_waited += 1

    def _failing(self, error: FetchError, now: float) -> None:
        if self._since is None:
            self._since = self._reported = now
            self._stats.outages += 1
            for fault in self._faults:
                if not fault.stuck:
                    self._stick(fault)
            logger.warning(
                "source %s is failing: %s; its faults wait (%d now), tried again until "
                "each has waited %g s (then its page is poisoned: SIGBUS)",
                self._name(), error, self._waited, self.policy.deadline,
            )  # fmt: skip
        elif now - self._reported >= _REPORT_EVERY:
            self._reported = now
            logger.warning(
                "source %s still failing after %.0f s: %s; %d fault%s waiting",
                self._name(), now - self._since, error, self._stats.faults_waiting,
                "" if self._stats.faults_waiting == 1 else "s",
            )  # fmt: skip
        self._stats.outage_seconds = self._past + (now - self._since)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or until the source is back, whichever comes first."""
        if self._since is None:  # it came back meanwhile: try again now
            await anyio.lowlevel.checkpoint()
            return
        if self._back is None:
            self._back = anyio.Event()
        with anyio.move_on_after(delay):
            await self._back.wait()
