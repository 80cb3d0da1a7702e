"""The mappings message of Firecracker's page-fault-handler protocol, without I/O.

Protocol facts this module relies on (Firecracker's snapshot-restore UFFD
handler protocol; see :mod:`._handoff_io` for the transport):

* The message is one UTF-8 JSON array, one object per guest memory region:
  ``base_host_virt_addr`` (where the region is mapped in the sender), ``size``,
  ``offset`` (where the region's bytes start in the memory file; regions are
  laid end to end) and ``page_size`` in bytes (4096, or the huge page size on
  hugetlbfs). Every number is an unsigned 64-bit integer.
* Older Firecracker versions named the page size ``page_size_kib`` although it
  held bytes too: accepted, and read as bytes. An object must carry one of
  the two names; carrying both is ambiguous and refused.
* Firecracker adds fields over time, so unknown fields are ignored; a handler
  that rejected them would break on the next release. Duplicate keys are
  refused: JSON parsers disagree on which one wins.
* The peer is untrusted: every mapping must be page-aligned to its own page
  size (a power of two, at least 4 KiB), non-empty, within the 64-bit address
  space and file, disjoint from the others in virtual memory, and (when the
  backing file's size is known) inside it. The serving side then never needs
  to check a mapping again.
"""

from __future__ import annotations

import errno
import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from ._errors import HandoffError, InvalidArgument

#: Fields every mapping object carries, in Firecracker's order.
FIELDS = ("base_host_virt_addr", "size", "offset", "page_size")
#: The older name of ``page_size``; it held bytes all the same.
LEGACY_PAGE_SIZE = "page_size_kib"
#: A guest has a handful of regions (more with memory hotplug slots); this only bounds the work.
DEFAULT_MAX_REGIONS = 1024

_U64_LIMIT = 1 << 64
_MIN_PAGE_SIZE = 4096


@attrs.frozen(kw_only=True)
class GuestMapping:
    """One guest memory region as the sender maps it (Firecracker's ``GuestRegionUffdMapping``).

    Faults at ``base_host_virt_addr + n`` are served from byte ``offset + n``
    of the guest memory file, ``page_size`` bytes at a time.
    """

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        """The first address past the region."""
        return self.base_host_virt_addr + self.size


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
            f"the mappings message must be a JSON array of objects, not {_json_type(document)}"
        )
    if len(document) > max_regions:
        raise HandoffError(
            f"the message has {len(document)} mappings, more than max_regions={max_regions}"
        )
    mappings = [_mapping(index, item) for index, item in enumerate(document)]
    _validate(mappings, backing_size)
    return mappings


def encode_mappings(mappings: Iterable[GuestMapping]) -> bytes:
    """The JSON message Firecracker sends for ``mappings`` (``page_size`` in bytes).

    The mappings are validated as :func:`parse_mappings` would, so a sender
    finds its mistakes before a handler refuses them.
    """
    mappings = list(mappings)
    _validate(mappings, None)
    document = [{name: getattr(mapping, name) for name in FIELDS} for mapping in mappings]
    return json.dumps(document, separators=(",", ":")).encode()


def check_mappings(mappings: Iterable[GuestMapping], backing_size: int | None = None) -> None:
    """Refuse (:class:`HandoffError`) what :func:`parse_mappings` would refuse in ``mappings``.

    For mappings that did not come through :func:`parse_mappings`, before serving them.
    """
    _validate(list(mappings), backing_size)


def check_limits(backing_size: int | None, max_regions: int) -> None:
    """Refuse bad limits from our own caller (TypeError, InvalidArgument), not the peer."""
    if backing_size is not None:
        if _not_int(backing_size):
            raise TypeError(f"backing_size must be an int or None, not {backing_size!r}")
        if backing_size < 0:
            raise InvalidArgument(errno.EINVAL, f"backing_size {backing_size} is negative")
    if _not_int(max_regions):
        raise TypeError(f"max_regions must be an int, not {max_regions!r}")
    if max_regions < 1:
        raise InvalidArgument(errno.EINVAL, f"max_regions must be at least 1, not {max_regions}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise HandoffError(f"the mappings message repeats the key {key!r} in one object")
        result[key] = value
    return result


def _mapping(index: int, item: object) -> GuestMapping:
    if not isinstance(item, dict):
        raise HandoffError(
            f"mapping {index} must be a JSON object, not {_json_type(item)}", mapping=index
        )
    if "page_size" in item and LEGACY_PAGE_SIZE in item:
        raise HandoffError(
            f"mapping {index} has both 'page_size' and '{LEGACY_PAGE_SIZE}'; send one",
            mapping=index,
            field="page_size",
        )
    page_size_field = LEGACY_PAGE_SIZE if LEGACY_PAGE_SIZE in item else "page_size"
    values = {}
    for name in FIELDS:
        field = page_size_field if name == "page_size" else name
        if field not in item:
            raise HandoffError(
                f"mapping {index} has no {field!r} field"
                + (f" (nor the older {LEGACY_PAGE_SIZE!r})" if name == "page_size" else ""),
                mapping=index,
                field=field,
            )
        values[name] = _u64(index, field, item[field])
    return GuestMapping(**values)


def _u64(index: int, field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f" ({value!r:.40})" if isinstance(value, (float, str)) else ""
        raise HandoffError(
            f"mapping {index}: {field!r} must be an integer, not {_json_type(value)}{shown}",
            mapping=index,
            field=field,
        )
    if not 0 <= value < _U64_LIMIT:
        raise HandoffError(
            f"mapping {index}: {field!r} is {value}, outside the unsigned 64-bit range",
            mapping=index,
            field=field,
        )
    return value


def _validate(mappings: Sequence[GuestMapping], backing_size: int | None) -> None:
    """Check every mapping alone, then the set: disjoint, and inside the backing file."""
    if not mappings:
        raise HandoffError("the mappings message lists no mappings: there is nothing to serve")
    for index, mapping in enumerate(mappings):
        _check_one(index, mapping, backing_size)
    by_address = sorted(range(len(mappings)), key=lambda i: mappings[i].base_host_virt_addr)
    for before, after in itertools.pairwise(by_address):
        if mappings[before].end > mappings[after].base_host_virt_addr:
            first, second = mappings[before], mappings[after]
            raise HandoffError(
                f"mapping {after} [{second.base_host_virt_addr:#x}, {second.end:#x}) overlaps "
                f"mapping {before} [{first.base_host_virt_addr:#x}, {first.end:#x})",
                mapping=after,
                field="base_host_virt_addr",
            )
    total = sum(mapping.size for mapping in mappings)
    if backing_size is not None and total > backing_size:
        raise HandoffError(
            f"the mappings total {total} bytes, more than the {backing_size}-byte backing memory"
        )


def _check_one(index: int, mapping: GuestMapping, backing_size: int | None) -> None:
    for name in FIELDS:
        _u64(index, name, getattr(mapping, name))
    page_size = mapping.page_size
    if page_size < _MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise HandoffError(
            f"mapping {index}: 'page_size' {page_size} is not a power of two of at least "
            f"{_MIN_PAGE_SIZE}",
            mapping=index,
            field="page_size",
        )
    if mapping.size == 0:
        raise HandoffError(f"mapping {index}: 'size' is 0", mapping=index, field="size")
    for name in ("base_host_virt_addr", "size", "offset"):
        value = getattr(mapping, name)
        if value % page_size:
            raise HandoffError(
                f"mapping {index}: {name!r} {value:#x} is not a multiple of its page_size "
                f"{page_size:#x}",
                mapping=index,
                field=name,
            )
    for name in ("base_host_virt_addr", "offset"):
        start = getattr(mapping, name)
        if start + mapping.size > _U64_LIMIT:
            raise HandoffError(
                f"mapping {index}: {name!r} {start:#x} + 'size' {mapping.size:#x} overflows "
                "64 bits",
                mapping=index,
                field=name,
            )
    if backing_size is not None and mapping.offset + mapping.size > backing_size:
        raise HandoffError(
            f"mapping {index}: 'offset' {mapping.offset:#x} + 'size' {mapping.size:#x} ends "
            f"past the {backing_size:#x}-byte backing memory",
            mapping=index,
            field="offset",
        )


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
