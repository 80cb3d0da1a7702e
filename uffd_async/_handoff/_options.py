"""A handoff server's options, in two frozen values beside :class:`ServeOptions`.

:class:`PeerPolicy` is who may hand a uffd over and how much a peer may send;
:class:`ReplayOptions` is how a snapshot's pages reach each process beyond its
faults. With :class:`~uffd_async.ServeOptions` they are everything
``serve_handoffs`` takes besides the path and the source. Each is checked when
it is made (:class:`InvalidArgument`), so a bad value is refused before any
socket or file exists; what depends on the path or the source (an abstract
socket has no mode, a factory has no pages to read ahead) is checked by the
server that gets them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Any

import attrs

from .._core._checks import check_instance, check_int, check_seconds
from .._core._errors import InvalidArgument, InvalidArgumentType
from .._restore._working_set import WorkingSet
from ._transfer import DEFAULT_MAX_MESSAGE, DEFAULT_TIMEOUT
from ._wire import DEFAULT_MAX_REGIONS

__all__ = ["PeerPolicy", "ReplayOptions", "check_record_path"]


def _uids(value: Iterable[int] | None) -> frozenset[int]:
    """The uids as a set (``None``: none), each one checked."""
    if value is None:
        return frozenset()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgumentType(f"allowed_uids must be a set of uids, not {type(value).__name__}")
    uids = frozenset(value)
    for uid in uids:
        check_int("each of allowed_uids", uid, minimum=0, expected="a uid (an int >= 0)")
    return uids


def _socket_mode(instance: object, attribute: Any, value: object) -> None:
    if value is not None:
        check_int(
            "socket_mode", value, minimum=0, maximum=0o777, expected="permission bits (0 to 0o777)"
        )


def _socket_group(instance: object, attribute: Any, value: object) -> None:
    if value is not None and not isinstance(value, str):
        check_int("socket_group", value, minimum=0, expected="a name or a gid")


def _timeout(instance: object, attribute: Any, value: object) -> None:
    check_seconds("timeout", value)


def _max_message(instance: object, attribute: Any, value: object) -> None:
    check_int("max_message", value, minimum=1)


def _max_regions(instance: object, attribute: Any, value: object) -> None:
    check_int("max_regions", value, minimum=1)


def _max_peers(instance: object, attribute: Any, value: object) -> None:
    if value is not None:
        check_int("max_peers", value, minimum=1)


@attrs.frozen(kw_only=True)
class PeerPolicy:
    """Who may hand a uffd over, and the bounds on what a peer sends.

    ``allowed_uids``: uids a peer may run as besides this process's effective
    uid (add Firecracker's, or the jailer's, to serve it). ``socket_mode`` and
    ``socket_group`` (a name or a gid): the socket file's permissions and
    group, so that a peer of another uid may connect at all (``0o660`` and the
    jail's group, or ``0o666`` in a directory only it can reach); ``None``
    leaves them as ``bind()`` made them. ``timeout`` (seconds), ``max_message``
    (bytes), ``max_regions``: bounds on the handshake, as in
    :func:`~uffd_async.receive_uffd`. ``max_peers``: how many peers may be
    connected or served at once (``None``: no limit); one more is refused with
    a warning and its connection closed unread.
    """

    allowed_uids: frozenset[int] = attrs.field(default=frozenset(), converter=_uids)
    socket_mode: int | None = attrs.field(default=None, validator=_socket_mode)
    socket_group: int | str | None = attrs.field(default=None, validator=_socket_group)
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=_timeout)
    max_message: int = attrs.field(default=DEFAULT_MAX_MESSAGE, validator=_max_message)
    max_regions: int = attrs.field(default=DEFAULT_MAX_REGIONS, validator=_max_regions)
    max_peers: int | None = attrs.field(default=None, validator=_max_peers)


def _path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _prefetch(
    value: str | os.PathLike[str] | WorkingSet | None,
) -> str | WorkingSet | None:
    return value if value is None or isinstance(value, WorkingSet) else os.fspath(value)


def _readahead(instance: object, attribute: Any, value: object) -> None:
    check_int("readahead", value, minimum=0)


def _populate(instance: object, attribute: Any, value: object) -> None:
    check_instance("populate", value, bool)


@attrs.frozen(kw_only=True)
class ReplayOptions:
    """How a snapshot's pages reach each process besides its demand faults.

    ``readahead``: pages copied past each fault (files, not URLs: a URL's
    fault brings its whole chunk). ``record`` (a path): the pages every
    process's demand faults ask for are saved there as a working set (see
    :class:`~uffd_async.WorkingSet`; needs ``readahead=0``, as pages readahead
    brings in never fault). ``prefetch`` (a path or a ``WorkingSet``): each
    process gets that working set copied in ahead of its faults, in recorded
    order, demand faults first; ``populate=True``: then every other page of
    its mappings, so it becomes fully resident. Snapshot sources only: a
    resolver factory makes its own resolvers.
    """

    readahead: int = attrs.field(default=0, validator=_readahead)
    record: str | None = attrs.field(default=None, converter=_path)
    prefetch: str | WorkingSet | None = attrs.field(default=None, converter=_prefetch)
    populate: bool = attrs.field(default=False, validator=_populate)

    def __attrs_post_init__(self) -> None:
        if self.record is not None and self.readahead:
            raise InvalidArgument(
                errno.EINVAL,
                "record with readahead=0: pages readahead brings in never fault, so they "
                "would be missing from the working set",
            )

    @property
    def active(self) -> bool:
        """Whether anything is recorded, prefetched or populated (readahead aside)."""
        return self.record is not None or self.prefetch is not None or self.populate


def check_record_path(path: str | os.PathLike[str]) -> None:
    """Refuse, before anything is served, a working-set path the recording could never be
    saved to (its directory missing, or a directory there): else it is lost at the end."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise InvalidArgument(
            errno.ENOENT, f"cannot record to {path}: {directory} is not an existing directory"
        )
    if os.path.isdir(path):
        raise InvalidArgument(errno.EISDIR, f"cannot record to {path}: it is a directory")
