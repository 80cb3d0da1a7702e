"""Squashing a base image and its layers into one full image file.

Facts this module relies on (the composition is :mod:`._layer`'s, the atomic
write :mod:`uffd_async._core._atomic_file`'s):

* The base's holes stay holes: ``SEEK_DATA``/``SEEK_HOLE`` find its data, and
  only that is copied; the output starts as a file of holes, which read as
  zeros.
* The base's data is copied in the kernel (``copy_file_range``: a reflink
  where the filesystem can), falling back to ``pread``/``pwrite`` where the
  kernel refuses (another filesystem, an old kernel).
* The output is never one of the inputs (the same file by any name): writing
  it would replace a file being read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from .._core._atomic_file import AtomicFile
from .._core._errors import InvalidArgument, LayerError
from ._identity import file_identity, read_at
from ._layer import Layer, check_chain, compose

__all__ = ["check_output", "squash"]

#: Bytes copied per call when squashing without copy_file_range.
_COPY_CHUNK = 8 << 20


def squash(
    base_path: str | os.PathLike[str],
    layer_paths: Iterable[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    check: bool = True,
) -> bytes:
    """Write the image the base and its layers (oldest first) make to ``out_path``, as one
    full image, atomically; return its identity. ``check``: as for
    :class:`~uffd_async.LayeredSnapshot`.

    The base's holes stay holes (``SEEK_DATA``), and its data is copied in the kernel
    (``copy_file_range``: a reflink where the filesystem can) where it can.
    """
    base = os.fspath(base_path)
    inputs = [os.fspath(path) for path in layer_paths]
    check_output(os.fspath(out_path), base, inputs)
    layers: list[Layer] = []
    fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size == 0:
            raise InvalidArgument(errno.EINVAL, f"the base {base!r} is not a non-empty file")
        size = status.st_size
        for path in inputs:
            layers.append(Layer(path))
        check_chain(base, size, file_identity(fd, size) if check else None, layers)
        out = AtomicFile(out_path, size, reserve=False)
        try:
            for start, end, source, at in compose(size, [layer._header for layer in layers]):
                if source == 0:
                    _copy_data(fd, out.fd, start, end, base)
                else:
                    out.pwrite(layers[source - 1]._view(at, end - start), start)
            identity = file_identity(out.fd, size)
            out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        for layer in layers:
            layer.close()
        os.close(fd)
    return identity


def check_output(out: str, base: str, layer_paths: list[str]) -> None:
    """The output must be none of the inputs (the same file by any name: samefile)."""
    for role, path in [("the base", base), *(("a layer", p) for p in layer_paths)]:
        try:
            same = os.path.samefile(out, path)
        except OSError:  # one of them does not exist (yet): not the same file
            continue
        if same:
            raise InvalidArgument(
                errno.EINVAL,
                f"the output {out!r} is {role} ({path!r}): squashing would replace it; "
                "write to another file",
            )


def _copy_data(source: int, target: int, start: int, end: int, name: str) -> None:
    """Copy the data of ``source`` in [start, end) to the same offsets of ``target``,
    leaving its holes alone (``target`` reads zeros there already)."""
    position = start
    while position < end:
        try:
            data = os.lseek(source, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(source, data, os.SEEK_HOLE), end)
        _copy_range(source, target, data, hole, name)
        position = hole


def _copy_range(source: int, target: int, start: int, end: int, name: str) -> None:
    position = start
    while position < end:
        try:
            copied = os.copy_file_range(
                source, target, end - position, offset_src=position, offset_dst=position
            )
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = _copy_by_hand(source, target, position, min(end, position + _COPY_CHUNK))
        if copied == 0:
            raise LayerError(f"{name}: it ended at byte {position} while being read (truncated?)")
        position += copied


def _copy_by_hand(source: int, target: int, start: int, end: int) -> int:
    data = read_at(source, end - start, start)
    view, offset = memoryview(data), start
    while view:
        written = os.pwrite(target, view, offset)
        view, offset = view[written:], offset + written
    return len(data)
