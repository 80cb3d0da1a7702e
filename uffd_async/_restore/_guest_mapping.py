"""Guest mappings: where each region of a restored guest's memory is, and where its bytes are.

A mapping names one guest memory region as the process that registered it maps it
(Firecracker's ``GuestRegionUffdMapping``); the handoff message carries them
(:mod:`uffd_async._handoff._wire` is its JSON), and a snapshot's resolver serves them
(:mod:`._snapshot`). Facts the checks rely on:

* Every number is an unsigned 64-bit integer, as the sender's structure has it.
* The peer is untrusted: every mapping must be page-aligned to its own page
  size (a power of two, at least 4 KiB), non-empty, within the 64-bit address
  space and file, disjoint from the others in virtual memory, and (when the
  backing file's size is known) inside it. The serving side then never needs
  to check a mapping again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import attrs

from .._core._checks import MIN_PAGE_SIZE, is_page_size
from .._core._errors import HandoffError

__all__ = ["FIELDS", "GuestMapping", "check_mappings", "json_type", "u64", "validate_mappings"]

#: The fields of a :class:`GuestMapping`, in Firecracker's order.
FIELDS = ("base_host_virt_addr", "size", "offset", "page_size")
_U64_LIMIT = 1 << 64


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


def check_mappings(mappings: Iterable[GuestMapping], backing_size: int | None = None) -> None:
    """Refuse (:class:`HandoffError`) what :func:`parse_mappings` would refuse in ``mappings``.

    For mappings that did not come through :func:`parse_mappings`, before serving them.
    """
    validate_mappings(list(mappings), backing_size)


def u64(index: int, field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f" ({value!r:.40})" if isinstance(value, (float, str)) else ""
        raise HandoffError(
            f"mapping {index}: {field!r} must be an integer, not {json_type(value)}{shown}",
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


def validate_mappings(mappings: Sequence[GuestMapping], backing_size: int | None) -> None:
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
        u64(index, name, getattr(mapping, name))
    page_size = mapping.page_size
    if not is_page_size(page_size):
        raise HandoffError(
            f"mapping {index}: 'page_size' {page_size} is not a power of two of at least "
            f"{MIN_PAGE_SIZE}",
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


def json_type(value: object) -> str:
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
