"""What a handoff server hands its successor, as bytes: the takeover messages, without I/O.

The exchange itself (who connects where, the fds) is :mod:`._takeover`'s; this
module only turns values into bytes and back, with bounds, so that a damaged or
hostile message is a :class:`TakeoverError` and never a crash or a huge
allocation. Protocol facts it relies on:

* Both ends may be different releases of this library: the successor says
  which control protocol versions it speaks (:func:`encode_hello`), the
  running server answers with the highest one both speak, or refuses in one
  line (:func:`encode_refusal`) and goes on serving. Every later message is
  in the chosen version; a new version is added beside the old ones, never
  in place of one.
* The state (:class:`Succession`) names fds by their index among the fds
  that travel with it (``SCM_RIGHTS``, or systemd's fd store, where each
  index is a name): it never holds fd numbers, which mean nothing in
  another process.
* A resolver's bookkeeping (pages removed, moved, unmapped) is carried as the
  Remove/Remap/Unmap events it applied, in order: the successor makes a fresh
  resolver from the mappings and applies them again. Replaying is exact, since
  applying events is all that ever changed that bookkeeping.
* The working set recorded so far is carried in order of first touch, as runs.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .._core._errors import TakeoverError
from .._core._events import Remap, Remove, Unmap
from .._restore._guest_mapping import GuestMapping, validate_mappings
from ._wire import MessageShape

__all__ = [
    "VERSIONS",
    "Carried",
    "CarriedHandoff",
    "Prefetched",
    "Reply",
    "Succession",
    "choose_version",
    "decode_state",
    "encode_acceptance",
    "encode_hello",
    "encode_refusal",
    "encode_state",
    "parse_hello",
    "parse_reply",
]

#: The control protocol versions this release speaks, oldest first.
VERSIONS: tuple[int, ...] = (1,)
#: The first bytes of a successor's hello line.
HELLO = b"UFFD_ASYNC TAKEOVER "
#: Bound on a control line (hello, reply, ack), newline included.
MAX_LINE = 512
#: Bounds on the state message: far above what a host serves, far below what hurts.
MAX_STATE = 256 << 20
MAX_HANDOFFS = 1 << 16
MAX_CHILDREN = 1 << 12
MAX_EVENTS = 1 << 20
MAX_FDS = 1 << 20
_MAX_VERSIONS = 16
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

#: systemd's ``FDNAME=``: printable ASCII but ``:``, at most 255 characters.
_FDNAME = re.compile(r"[!-9;-~]{1,255}")
_STATE_MAGIC = b"UASUCC\r\n"
_HEADER = struct.Struct("<8sHQ")  # magic, version, JSON length; the CRC32 follows the JSON
_CRC = struct.Struct("<I")

ResolverEvent = Remap | Remove | Unmap


class Reply(enum.Enum):
    """The one-word control lines after the hello."""

    #: The successor adopted every fd: the running server stops for good.
    ACK = b"ACK\n"
    #: The running server has stopped for good: the successor serves from now on.
    DONE = b"DONE\n"


@attrs.frozen(kw_only=True)
class Prefetched:
    """How far a handoff's prefetch got, so the successor goes on from there."""

    prefetched: int = 0
    runs: int = 0
    working_set_done: bool = False
    populated: bool = False


@attrs.frozen(kw_only=True)
class Carried:
    """A fork child's uffd (index of its fd) and the events its resolver applied."""

    uffd: int
    events: tuple[ResolverEvent, ...] = ()


@attrs.frozen(kw_only=True)
class CarriedHandoff:
    """One served peer: what its handshake said, its fds (as indexes), its serving state."""

    mappings: tuple[GuestMapping, ...]
    shape: MessageShape
    pid: int
    uid: int
    gid: int
    uffd: int
    conn: int
    memfd: int | None = None
    events: tuple[ResolverEvent, ...] = ()
    children: tuple[Carried, ...] = ()
    prefetch: Prefetched | None = None


@attrs.frozen(kw_only=True)
class Succession:
    """Everything a successor needs besides the fds: which fd is what, and the state."""

    version: int
    fds: int
    #: The listening handoff socket and the takeover control socket, when they are carried.
    listener: int | None = None
    control: int | None = None
    handoffs: tuple[CarriedHandoff, ...] = ()
    #: The running server's counters (``HandoffStats`` fields; unknown names are ignored).
    totals: dict[str, int] = attrs.field(factory=dict)
    #: The latency histogram's bucket counts and sum (``LatencyHistogram``).
    latency: tuple[int, ...] = ()
    latency_ns: int = 0
    #: The working set recorded so far (snapshot base pages, first touch first), if recording.
    recording: tuple[int, ...] | None = None
    #: In systemd's fd store, each fd's ``FDNAME`` (by index); empty over a control socket.
    names: tuple[str, ...] = ()


# -- the control lines --------------------------------------------------------------------


def encode_hello(versions: Iterable[int] = VERSIONS) -> bytes:
    """The successor's first line: the protocol versions it speaks."""
    return HELLO + ",".join(str(version) for version in versions).encode() + b"\n"


def parse_hello(line: bytes) -> tuple[int, ...]:
    """The versions a hello offers; :class:`TakeoverError` if it is no hello."""
    if len(line) > MAX_LINE or not line.startswith(HELLO) or not line.endswith(b"\n"):
        raise TakeoverError(f"not a takeover hello: {line[:64]!r}")
    fields = line[len(HELLO) : -1].split(b",")
    if len(fields) > _MAX_VERSIONS or not all(
        field.isdigit() and len(field) <= 5 for field in fields
    ):
        raise TakeoverError(f"a takeover hello with bad versions: {line[:64]!r}")
    return tuple(int(field) for field in fields)


def choose_version(offered: Iterable[int], spoken: Sequence[int] = VERSIONS) -> int | None:
    """The highest version both speak, or None."""
    common = set(offered) & set(spoken)
    return max(common) if common else None


def encode_acceptance(version: int) -> bytes:
    return b"OK %d\n" % version


def encode_refusal(reason: str) -> bytes:
    """One line that says why; cut to fit :data:`MAX_LINE`."""
    text = " ".join(reason.split()).encode("utf-8", "replace")[: MAX_LINE - 4]
    return b"NO " + text + b"\n"


def parse_reply(line: bytes, offered: Sequence[int] = VERSIONS) -> int:
    """The version the running server chose; :class:`TakeoverError` with its reason if it
    refused, or if it chose a version that was not offered."""
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise TakeoverError(f"the running server sent no reply line: {line[:64]!r}")
    if line.startswith(b"NO "):
        reason = line[3:-1].decode("utf-8", "replace")
        raise TakeoverError(f"the running server refused the takeover: {reason}")
    word = line[3:-1]
    if not line.startswith(b"OK ") or not word.isdigit() or len(word) > 5:
        raise TakeoverError(f"the running server sent a reply that is neither OK nor NO: {line!r}")
    version = int(word)
    if version not in offered:
        raise TakeoverError(f"the running server chose version {version}, not one of {offered}")
    return version


# -- the state ------------------------------------------------------------------------------


def encode_state(state: Succession) -> bytes:
    """The state message: a header, JSON, and a CRC32 of the JSON."""
    document = {
        "fds": state.fds,
        "listener": state.listener,
        "control": state.control,
        "totals": dict(state.totals),
        "latency": [list(state.latency), state.latency_ns],
        "recording": None if state.recording is None else _runs(state.recording),
        "handoffs": [_handoff_document(handoff) for handoff in state.handoffs],
        "names": list(state.names),
    }
    body = json.dumps(document, separators=(",", ":")).encode()
    if len(body) > MAX_STATE:
        raise TakeoverError(f"the state is {len(body)} bytes, more than {MAX_STATE}")
    return _HEADER.pack(_STATE_MAGIC, state.version, len(body)) + body + _CRC.pack(zlib.crc32(body))


def decode_state(data: bytes, *, fds: int | None = None) -> Succession:
    """Parse and check a state message; ``fds``, when given, is how many fds came with it."""
    if len(data) < _HEADER.size + _CRC.size:
        raise TakeoverError(f"the state message is {len(data)} bytes: too short for its header")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != _STATE_MAGIC:
        raise TakeoverError("the state message does not start with its magic bytes")
    if version not in VERSIONS:
        raise TakeoverError(f"the state message is version {version}; this speaks {VERSIONS}")
    if length > MAX_STATE or len(data) != _HEADER.size + length + _CRC.size:
        raise TakeoverError(f"the state message says {length} bytes but holds {len(data)}")
    body = data[_HEADER.size : _HEADER.size + length]
    (crc,) = _CRC.unpack_from(data, _HEADER.size + length)
    if zlib.crc32(body) != crc:
        raise TakeoverError("the state message is damaged (its CRC32 does not match)")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise TakeoverError(f"the state message is not JSON: {exc}") from None
    return _Reader(version, fds).state(document)


def _runs(pages: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return runs


def _events_document(events: Iterable[ResolverEvent]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for event in events:
        if isinstance(event, Remove):
            out.append(["remove", event.start, event.end])
        elif isinstance(event, Unmap):
            out.append(["unmap", event.start, event.end])
        else:
            out.append(["remap", event.from_address, event.to_address, event.length])
    return out


def _handoff_document(handoff: CarriedHandoff) -> dict[str, Any]:
    prefetch = handoff.prefetch
    return {
        "mappings": [
            [m.base_host_virt_addr, m.size, m.offset, m.page_size] for m in handoff.mappings
        ],
        "shape": handoff.shape.value,
        "pid": handoff.pid,
        "uid": handoff.uid,
        "gid": handoff.gid,
        "uffd": handoff.uffd,
        "conn": handoff.conn,
        "memfd": handoff.memfd,
        "events": _events_document(handoff.events),
        "children": [
            {"uffd": child.uffd, "events": _events_document(child.events)}
            for child in handoff.children
        ],
        "prefetch": None if prefetch is None else attrs.asdict(prefetch),
    }


class _Reader:
    """Checks each value of a decoded document as it converts it; remembers the fds used."""

    def __init__(self, version: int, fds: int | None) -> None:
        self.version = version
        self.expected_fds = fds
        self.fds = 0
        self.used: set[int] = set()

    def state(self, document: object) -> Succession:
        document = self.fields("the state", document)
        self.fds = self.number("fds", document.get("fds"), MAX_FDS)
        if self.expected_fds is not None and self.fds != self.expected_fds:
            raise TakeoverError(f"the state names {self.fds} fds but {self.expected_fds} came")
        listener = document.get("listener")
        control = document.get("control")
        totals = self.fields("totals", document.get("totals"))
        latency = self.items("latency", document.get("latency"), 2)
        if len(latency) != 2:
            raise TakeoverError("latency must be [counts, sum]")
        counts = self.items("latency counts", latency[0], 64)
        recording = document.get("recording")
        handoffs = self.items("handoffs", document.get("handoffs"), MAX_HANDOFFS)
        return Succession(
            version=self.version,
            fds=self.fds,
            listener=None if listener is None else self.fd("listener", listener),
            control=None if control is None else self.fd("control", control),
            totals={
                str(name): self.number(f"totals.{name}", value, _U64)
                for name, value in totals.items()
                if not isinstance(value, float)  # ratios are derived again, not carried
            },
            latency=tuple(self.number("a latency count", count, _U64) for count in counts),
            latency_ns=self.number("the latency sum", latency[1], _U64),
            recording=None if recording is None else self.recording(recording),
            handoffs=tuple(self.handoff(index, item) for index, item in enumerate(handoffs)),
            names=self.names(document.get("names", [])),
        )

    def names(self, value: object) -> tuple[str, ...]:
        names = self.items("names", value, MAX_FDS)
        if names and len(names) != self.fds:
            raise TakeoverError(f"the state names {len(names)} fds of {self.fds}")
        for name in names:
            if not isinstance(name, str) or not _FDNAME.fullmatch(name):
                raise TakeoverError(f"not an fd name: {name!r:.40}")
        if len(set(names)) != len(names):
            raise TakeoverError("the state gives two fds one name")
        return tuple(names)

    def handoff(self, index: int, item: object) -> CarriedHandoff:
        where = f"handoff {index}"
        item = self.fields(where, item)
        mappings = []
        for number, fields in enumerate(
            self.items(f"{where} mappings", item.get("mappings"), 1024)
        ):
            values = self.items(f"{where} mapping {number}", fields, 4)
            if len(values) != 4:
                raise TakeoverError(f"{where} mapping {number} must have 4 numbers")
            base, size, offset, page_size = (self.number(where, value, _U64) for value in values)
            mappings.append(
                GuestMapping(
                    base_host_virt_addr=base, size=size, offset=offset, page_size=page_size
                )
            )
        try:
            validate_mappings(mappings, None)
            shape = MessageShape(item.get("shape"))
        except (ValueError, TypeError) as exc:
            raise TakeoverError(f"{where}: {exc}") from None
        memfd = item.get("memfd")
        children = self.items(f"{where} children", item.get("children"), MAX_CHILDREN)
        prefetch = item.get("prefetch")
        return CarriedHandoff(
            mappings=tuple(mappings),
            shape=shape,
            pid=self.number(f"{where} pid", item.get("pid"), _U32),
            uid=self.number(f"{where} uid", item.get("uid"), _U32),
            gid=self.number(f"{where} gid", item.get("gid"), _U32),
            uffd=self.fd(f"{where} uffd", item.get("uffd")),
            conn=self.fd(f"{where} conn", item.get("conn")),
            memfd=None if memfd is None else self.fd(f"{where} memfd", memfd),
            events=self.events(where, item.get("events")),
            children=tuple(
                Carried(
                    uffd=self.fd(f"{where} child uffd", self.fields(where, child).get("uffd")),
                    events=self.events(f"{where} child", self.fields(where, child).get("events")),
                )
                for child in children
            ),
            prefetch=None if prefetch is None else self.prefetched(where, prefetch),
        )

    def prefetched(self, where: str, value: object) -> Prefetched:
        value = self.fields(f"{where} prefetch", value)
        flags = {}
        for name in ("working_set_done", "populated"):
            flag = value.get(name)
            if not isinstance(flag, bool):
                raise TakeoverError(f"{where} prefetch.{name} must be true or false")
            flags[name] = flag
        return Prefetched(
            prefetched=self.number(where, value.get("prefetched"), _U64),
            runs=self.number(where, value.get("runs"), _U64),
            **flags,
        )

    def events(self, where: str, value: object) -> tuple[ResolverEvent, ...]:
        events: list[ResolverEvent] = []
        for item in self.items(f"{where} events", value, MAX_EVENTS):
            fields = self.items(f"{where} event", item, 4)
            kind = fields[0] if fields else None
            numbers = [self.number(f"{where} event", number, _U64) for number in fields[1:]]
            if kind == "remove" and len(numbers) == 2:
                events.append(Remove(start=numbers[0], end=numbers[1]))
            elif kind == "unmap" and len(numbers) == 2:
                events.append(Unmap(start=numbers[0], end=numbers[1]))
            elif kind == "remap" and len(numbers) == 3:
                events.append(
                    Remap(from_address=numbers[0], to_address=numbers[1], length=numbers[2])
                )
            else:
                raise TakeoverError(f"{where}: not an event: {item!r:.80}")
        return tuple(events)

    def recording(self, value: object) -> tuple[int, ...]:
        pages: list[int] = []
        for run in self.items("recording", value, MAX_STATE // 8):
            fields = self.items("a recorded run", run, 2)
            if len(fields) != 2:
                raise TakeoverError("a recorded run must be [first page, pages]")
            first = self.number("a recorded run's first page", fields[0], _U64)
            count = self.number("a recorded run's pages", fields[1], _U32)
            if len(pages) + count > _U32:
                raise TakeoverError("the recording holds more pages than any snapshot")
            pages.extend(range(first, first + count))
        return tuple(pages)

    def fd(self, what: str, value: object) -> int:
        index = self.number(what, value, _U32)
        if index >= self.fds:
            raise TakeoverError(f"{what} names fd {index} of {self.fds}")
        if index in self.used:
            raise TakeoverError(f"{what} names fd {index}, which something else is")
        self.used.add(index)
        return index

    @staticmethod
    def number(what: str, value: object, maximum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise TakeoverError(f"{what} must be an integer from 0 to {maximum}, not {value!r:.40}")
        return value

    @staticmethod
    def items(what: str, value: object, maximum: int) -> list[Any]:
        if not isinstance(value, list):
            raise TakeoverError(f"{what} must be a list")
        if len(value) > maximum:
            raise TakeoverError(f"{what} has {len(value)} items, more than {maximum}")
        return value

    @staticmethod
    def fields(what: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise TakeoverError(f"{what} must be an object")
        return value
