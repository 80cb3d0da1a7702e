"""The mappings message of Firecracker's page-fault-handler protocol, without I/O.

Protocol facts this module relies on (Firecracker's snapshot-restore UFFD
handler protocol; see :mod:`._transfer` for the transport). What each
released Firecracker sends, from ``GuestRegionUffdMapping`` in its
``src/vmm/src/persist.rs`` at each tag (serde_json, compact, fields in this
order; 1.0 had no UFFD backend):

=============  ===================================================  ====================
Firecracker    fields of each mapping                               its socket afterwards
=============  ===================================================  ====================
1.1 to 1.6     ``base_host_virt_addr``, ``size``, ``offset``        closed at once
1.7 to 1.11    the same + ``page_size_kib`` (holding **bytes**)     closed at once
1.12 and on    the same + ``page_size`` and ``page_size_kib``,      kept open (leaked)
               both bytes, equal                                    until it exits
=============  ===================================================  ====================

* The message is one UTF-8 JSON array, one object per guest memory region:
  ``base_host_virt_addr`` (where the region is mapped in the sender), ``size``,
  ``offset`` (where the region's bytes start in the memory file; regions are
  laid end to end) and the page size. Every number is an unsigned 64-bit
  integer.
* No page size at all means 4 KiB pages: hugetlbfs guest memory came with
  the page size field (1.7). ``page_size_kib`` holds bytes despite its name;
  when both names are there they must agree, else the message is refused
  (nobody can tell which one is meant).
* Firecracker adds fields over time, so unknown fields are ignored, as serde
  does for Firecracker's own handlers. Duplicate keys are refused: JSON
  parsers disagree on which one wins.
* Which shape arrived says how the sender treats the connection (the last
  column above): :class:`MessageShape`. A handler that took the hangup of a
  1.1 to 1.11 sender for its end would stop serving a guest that lives on.
* The peer is untrusted: each mapping is checked as
  :mod:`uffd_async._restore._guest_mapping` says, before anyone serves it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from typing import Any

from .._core._checks import check_int
from .._core._errors import HandoffError
from .._restore._guest_mapping import (
    FIELDS,
    GuestMapping,
    check_mappings,
    json_type,
    u64,
    validate_mappings,
)

__all__ = [
    "DEFAULT_MAX_REGIONS",
    "FIELDS",
    "GuestMapping",
    "MessageShape",
    "check_limits",
    "check_mappings",
    "encode_mappings",
    "parse_mappings",
    "parse_message",
]

#: The older name of ``page_size``; it held bytes all the same.
LEGACY_PAGE_SIZE = "page_size_kib"
#: What a mapping without any page size field means (Firecracker before 1.7).
IMPLIED_PAGE_SIZE = 4096
#: A guest has a handful of regions (more with memory hotplug slots); this only bounds the work.
DEFAULT_MAX_REGIONS = 1024


class MessageShape(enum.Enum):
    """Which released Firecracker a mappings message looks like, and so what its socket does."""

    #: Firecracker 1.1 to 1.6: no page size field; closes its socket right after sending.
    NO_PAGE_SIZE = "1.1-1.6"
    #: Firecracker 1.7 to 1.11: ``page_size_kib`` only; closes its socket right after sending.
    PAGE_SIZE_KIB = "1.7-1.11"
    #: Firecracker 1.12 and later (and :func:`encode_mappings`): ``page_size``; the sender
    #: keeps its socket open until it exits.
    PAGE_SIZE = "1.12+"

    @property
    def keeps_connection(self) -> bool:
        """Whether the sender's hangup can mean that it exited."""
        return self is MessageShape.PAGE_SIZE


def parse_mappings(
    data: bytes | bytearray | memoryview,
    *,
    backing_size: int | None = None,
    max_regions: int = DEFAULT_MAX_REGIONS,
) -> list[GuestMapping]:
    """Parse and validate the JSON mappings message; :class:`HandoffError` on anything else.

    ``backing_size`` is the size of the memory file (the memfd's, when one was
    handed over): every mapping must then lie inside it.
    """
    return parse_message(data, backing_size=backing_size, max_regions=max_regions)[0]


def parse_message(
    data: bytes | bytearray | memoryview,
    *,
    backing_size: int | None = None,
    max_regions: int = DEFAULT_MAX_REGIONS,
) -> tuple[list[GuestMapping], MessageShape]:
    """:func:`parse_mappings`, and the message's :class:`MessageShape` (its oldest object's)."""
    check_limits(backing_size, max_regions)
    try:
        text = bytes(data).decode("utf-8")
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except HandoffError:
        raise
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; so is an
        # integer too long to convert, and nesting too deep is a RecursionError.
        raise HandoffError(f"the mappings message is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, list):
        raise HandoffError(
            f"the mappings message must be a JSON array of objects, not {json_type(document)}"
        )
    if len(document) > max_regions:
        raise HandoffError(
            f"the message has {len(document)} mappings, more than max_regions={max_regions}"
        )
    parsed = [_mapping(index, item) for index, item in enumerate(document)]
    mappings = [mapping for mapping, _ in parsed]
    validate_mappings(mappings, backing_size)
    shapes = list(MessageShape)
    return mappings, min((shape for _, shape in parsed), key=shapes.index)


def encode_mappings(mappings: Iterable[GuestMapping]) -> bytes:
    """The JSON message Firecracker 1.12 and later sends for ``mappings``.

    Both ``page_size`` and ``page_size_kib`` (bytes, equal), as those versions
    send them, so that handlers written for any version accept it. The
    mappings are validated as :func:`parse_mappings` would, so a sender finds
    its mistakes before a handler refuses them.
    """
    mappings = list(mappings)
    validate_mappings(mappings, None)
    document = [
        {**{name: getattr(mapping, name) for name in FIELDS}, LEGACY_PAGE_SIZE: mapping.page_size}
        for mapping in mappings
    ]
    return json.dumps(document, separators=(",", ":")).encode()


def check_limits(backing_size: int | None, max_regions: int) -> None:
    """Refuse bad limits from our own caller (:class:`InvalidArgument`), not the peer."""
    if backing_size is not None:
        check_int("backing_size", backing_size, minimum=0)
    check_int("max_regions", max_regions, minimum=1)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise HandoffError(f"the mappings message repeats the key {key!r} in one object")
        result[key] = value
    return result


def _mapping(index: int, item: object) -> tuple[GuestMapping, MessageShape]:
    if not isinstance(item, dict):
        raise HandoffError(
            f"mapping {index} must be a JSON object, not {json_type(item)}", mapping=index
        )
    values = {}
    for name in ("base_host_virt_addr", "size", "offset"):
        if name not in item:
            raise HandoffError(f"mapping {index} has no {name!r} field", mapping=index, field=name)
        values[name] = u64(index, name, item[name])
    sizes = {
        field: u64(index, field, item[field])
        for field in ("page_size", LEGACY_PAGE_SIZE)
        if field in item
    }
    if len(set(sizes.values())) > 1:
        raise HandoffError(
            f"mapping {index} has 'page_size' {sizes['page_size']} but '{LEGACY_PAGE_SIZE}' "
            f"{sizes[LEGACY_PAGE_SIZE]}: both hold the page size in bytes, and must agree",
            mapping=index,
            field=LEGACY_PAGE_SIZE,
        )
    if "page_size" in sizes:
        shape = MessageShape.PAGE_SIZE
    elif sizes:
        shape = MessageShape.PAGE_SIZE_KIB
    else:
        shape = MessageShape.NO_PAGE_SIZE
    values["page_size"] = next(iter(sizes.values()), IMPLIED_PAGE_SIZE)
    return GuestMapping(**values), shape
