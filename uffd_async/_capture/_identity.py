"""A snapshot's identity: what a working set or a layer names the image it belongs to by.

Capture writes it (an image writer returns it, a layer names its parent by it); restore
checks it (a working set replays only on the snapshot it was recorded for). Facts it
relies on:

* A working set recorded for another snapshot is only ever a waste of time,
  never of bytes: the pages it names are copied from the snapshot being
  served. So the identity is cheap rather than complete: a SHA-256 of the
  snapshot's size and of 64 blocks of 4 KiB spread over it (cheap for any
  size, and over HTTP too; two snapshots that differ only elsewhere pass for
  the same one, which costs time at worst).
* It depends on the bytes only, never on where they are: a file, a base with
  its layers, an HTTP object with the same bytes all have the same identity.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Iterable

__all__ = ["file_identity", "identity_of", "identity_samples", "read_at", "snapshot_identity"]

_SAMPLES = 64
_SAMPLE = 4096


def identity_samples(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes a snapshot's identity hashes: all of a small one,
    else 64 blocks of 4 KiB spread evenly (cheap to read over HTTP too)."""
    if size <= _SAMPLES * _SAMPLE:
        return [(0, size)]
    step = (size - _SAMPLE) // (_SAMPLES - 1)
    return [(n * step, _SAMPLE) for n in range(_SAMPLES)]


def identity_of(size: int, samples: Iterable[bytes]) -> bytes:
    """The identity from the bytes at ``identity_samples(size)``, in that order."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    for sample in samples:
        digest.update(sample)
    return digest.digest()


def snapshot_identity(address: int, size: int) -> bytes:
    """SHA-256 of ``size`` and of 64 blocks of 4 KiB spread over the bytes at ``address``."""
    return identity_of(
        size,
        (ctypes.string_at(address + offset, length) for offset, length in identity_samples(size)),
    )


def file_identity(fd: int, size: int) -> bytes:
    """The identity of the ``size`` bytes of the file ``fd`` (read with ``pread``)."""
    return identity_of(
        size, (read_at(fd, length, offset) for offset, length in identity_samples(size))
    )


def read_at(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes from ``offset``: fewer only at the end of the file."""
    parts = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        length, offset = length - len(part), offset + len(part)
    return b"".join(parts)
