"""How a fault server serves: one frozen value, built once and handed down.

Why an object: ``serve``, :class:`FaultServer`, the server itself, its fork
children's servers and the handoff server's per-connection servers all take
the same options. Forwarded one keyword at a time they were repeated five
times, and a fork child's server once lost ``spin`` on the way. A
:class:`ServeOptions` is checked once, when it is made, and travels whole.

The keywords ``serve(limit=..., ...)`` took before stay: :func:`from_keywords`
turns them into the object, and refuses an object and a keyword that disagree.
"""

from __future__ import annotations

import errno
from typing import Any, Literal, TypeVar

import attrs

from .._core._abi import PAGE_SIZE
from .._core._checks import check_instance, check_int, check_page_size, check_seconds
from .._core._errors import InvalidArgument
from ._resolvers import Resolver, as_resolver

__all__ = ["DEFAULT_SPIN", "OnError", "ServeOptions", "from_keywords", "settle"]

#: How long the server keeps reading after the uffd runs dry before it sleeps in
#: the event loop. A thread resumed by a resolution usually faults again within
#: microseconds; catching that fault without a trip through epoll and the
#: scheduler is most of the difference with a C handler at low concurrency.
DEFAULT_SPIN = 50e-6
#: The longest spin :class:`~uffd_async.EventReader` takes: more holds the loop too long.
_MAX_SPIN = 0.01
#: The most events one read asks for (``Userfaultfd.read_events``' bound).
_MAX_BATCH = 1 << 16

T = TypeVar("T")


def _fallback(page: object) -> Literal["poison", "zero", "leave"] | Resolver:
    if page in ("poison", "zero", "leave"):
        return page
    if isinstance(page, str) or not callable(page):
        raise InvalidArgument(
            errno.EINVAL,
            f"page must be 'poison', 'zero', 'leave' or a resolver (an async callable), "
            f"not {page!r}",
        )
    return as_resolver(page)


@attrs.frozen(kw_only=True)
class OnError:
    """What the server does when a resolver raises.

    ``page``: ``"poison"`` (the default: UFFDIO_POISON, so the access raises
    SIGBUS instead of reading wrong bytes; where the kernel lacks POISON the
    thread is left blocked), ``"zero"`` (a zero page, only when you ask for
    it), ``"leave"`` (the thread stays blocked; when this server stops, the
    fault is handed back to the uffd for whoever serves it next), or a fallback
    resolver (a :class:`Resolver` or any async ``resolver(fault, uffd)``).
    ``propagate``: raise the error out of ``serve`` (the default), or log it
    and keep serving.
    """

    page: Literal["poison", "zero", "leave"] | Resolver = attrs.field(
        default="poison", converter=_fallback
    )
    propagate: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


def _limit(instance: object, attribute: Any, value: object) -> None:
    check_int("limit", value, minimum=1)


def _batch(instance: object, attribute: Any, value: object) -> None:
    check_int("batch", value, minimum=1, maximum=_MAX_BATCH)


def _on_error(instance: object, attribute: Any, value: object) -> None:
    if value is not None:
        check_instance("on_error", value, OnError)


def _page_size(instance: object, attribute: Any, value: object) -> None:
    if value is not None:
        check_page_size("page_size", value)


def _spin(instance: object, attribute: Any, value: object) -> None:
    if value is not None:
        check_seconds("spin", value, maximum=_MAX_SPIN, zero=True)


@attrs.frozen(kw_only=True)
class ServeOptions:
    """How a fault server serves; its fork children's servers get the very same.

    ``limit``: resolutions that await, at most, at once (further faults wait
    in order; none is dropped). ``batch``: events read at most per read(2).
    ``on_error``: what a failed resolution does (an :class:`OnError`).
    ``page_size``: the unit faults are resolved in (a huge page size for
    hugetlbfs). ``spin`` (seconds, up to 0.01): how long to busy-poll the uffd
    before sleeping in the event loop, while no resolution awaits; 0 turns it
    off. ``None`` leaves the choice to who serves: ``serve`` and
    :class:`FaultServer` take ``OnError()``, ``PAGE_SIZE`` and
    :data:`DEFAULT_SPIN`; a handoff server poisons a failed page and goes on
    serving, uses each handoff's mappings' page size, and spins only when it
    prefetches nothing.
    """

    limit: int = attrs.field(default=64, validator=_limit)
    batch: int = attrs.field(default=64, validator=_batch)
    on_error: OnError | None = attrs.field(default=None, validator=_on_error)
    page_size: int | None = attrs.field(default=None, validator=_page_size)
    spin: float | None = attrs.field(default=None, validator=_spin)


def settle(options: ServeOptions) -> ServeOptions:
    """``options`` with ``serve``'s choice wherever ``None`` left it open."""
    if all(value is not None for value in (options.on_error, options.page_size, options.spin)):
        return options  # nothing left open: the very object, for the fork children too
    return attrs.evolve(
        options,
        on_error=OnError() if options.on_error is None else options.on_error,
        page_size=PAGE_SIZE if options.page_size is None else options.page_size,
        spin=DEFAULT_SPIN if options.spin is None else options.spin,
    )


def from_keywords(cls: type[T], name: str, given: T | None, **keywords: Any) -> T:
    """``given`` (an options object passed as ``name``), or one made of ``keywords``.

    A keyword left ``None`` was not given. A keyword given beside ``given`` must
    agree with it: else which one the caller meant cannot be told, and guessing
    would serve with an option nobody chose (:class:`InvalidArgument`).
    """
    chosen = {key: value for key, value in keywords.items() if value is not None}
    made = cls(**chosen)  # checks the keywords, whether or not an object came too
    if given is None:
        return made
    check_instance(name, given, cls)
    for key in chosen:
        if getattr(made, key) != getattr(given, key):
            raise InvalidArgument(
                errno.EINVAL,
                f"{key}={keywords[key]!r} disagrees with {name}.{key}="
                f"{getattr(given, key)!r}: give one or the other",
            )
    return given
