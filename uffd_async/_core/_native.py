"""Loads the small C library (``_native_lib.c``) through ctypes.

ctypes releases the GIL for the duration of every foreign call, which is the
whole point: code that may fault on registered memory runs in here, so the
event loop that resolves the fault can keep running. setup.py builds the
library next to this file; a source checkout that was never built compiles
it once with ``$CC`` (or ``cc``) into a cache directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.machinery
import os
import pathlib
import shutil
import subprocess
import tempfile

_HERE = pathlib.Path(__file__).parent
_SOURCE = _HERE / "_native_lib.c"


def _built_library() -> pathlib.Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / f"_native_lib{suffix}"
        if candidate.exists():
            return candidate
    return None


def _compile_into_cache() -> pathlib.Path:
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = (
        pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
        / "uffd_async"
    )
    target = cache / f"_native-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ImportError(
            "uffd_async's native helper is not built and no C compiler was found: "
            "install the package with pip (which builds it) or install cc"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        partial = pathlib.Path(tmp) / target.name
        result = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(_SOURCE)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ImportError(f"building uffd_async's native helper failed:\n{result.stderr}")
        os.replace(partial, target)
    return target


def _load() -> ctypes.CDLL:
    path = _built_library() or _compile_into_cache()
    lib = ctypes.CDLL(str(path))
    lib.ua_touch.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    lib.ua_touch.restype = ctypes.c_uint64
    lib.ua_fnv1a.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib.ua_fnv1a.restype = ctypes.c_uint64
    lib.ua_fork_touch.argtypes = [
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.ua_fork_touch.restype = ctypes.c_int
    lib.ua_resolve_batch.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.POINTER(FastPath),
        ctypes.c_void_p,
        ctypes.POINTER(FastCounts),
    ]
    lib.ua_resolve_batch.restype = ctypes.c_int
    lib.ua_zero_pages.argtypes = [
        ctypes.c_size_t,
        ctypes.c_uint64,
        ctypes.c_uint64,
        ctypes.c_void_p,
    ]
    lib.ua_zero_pages.restype = ctypes.c_uint64
    return lib


class FastPath(ctypes.Structure):
    """``struct ua_fast``: what the C fast path may resolve, and how (see _native_lib.c)."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("pages", ctypes.c_uint64),
        ("source", ctypes.c_uint64),
        ("page_size", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("populated", ctypes.c_void_p),
        ("kind", ctypes.c_int64),
        ("readahead", ctypes.c_uint64),
        ("image", ctypes.c_uint64),
        ("slots", ctypes.c_void_p),
        ("pid", ctypes.c_int64),
        ("marks", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
    ]


class FastCounts(ctypes.Structure):
    _fields_ = [
        ("resolved", ctypes.c_uint64),
        ("eexist", ctypes.c_uint64),
        ("filled", ctypes.c_uint64),
    ]


FAST_COPY, FAST_ZEROPAGE, FAST_UNPROTECT, FAST_SAVE = 1, 2, 3, 4


lib = _load()

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.munmap.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int
libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
libc.mremap.restype = ctypes.c_void_p
libc.syscall.restype = ctypes.c_long
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
libc.mincore.restype = ctypes.c_int


# -- ua_replay: a working set replayed off the event loop (_restore/_native_replay.py) --


class ReplayRun(ctypes.Structure):
    """``struct ua_replay_run``: one run of pages to copy (see _native_lib.c)."""

    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("pages", ctypes.c_uint64),
        ("page_size", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("populated", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("blocked", ctypes.c_void_p),
    ]


class ReplayPart(ctypes.Structure):
    """``struct ua_replay_part``: a part whose faults the replay answers, and its runs."""

    _fields_ = [("fast", FastPath), ("run_of", ctypes.c_void_p), ("blocked", ctypes.c_void_p)]


class ReplayControl(ctypes.Structure):
    """``struct ua_replay_ctl``: the replay's stop flag, gate, plan and progress."""

    _fields_ = [
        ("stop", ctypes.c_int32),
        ("lock", ctypes.c_int32),
        ("event", ctypes.c_int32),
        ("want", ctypes.c_int32),
        ("bytes_copied", ctypes.c_uint64),
        ("eexist", ctypes.c_uint64),
        ("error", ctypes.c_int64),
        ("slice_pages", ctypes.c_uint64),
        ("set_runs", ctypes.c_uint64),
        ("set_done_ns", ctypes.c_int64),
        ("done", ctypes.c_void_p),
        ("parts", ctypes.POINTER(ReplayPart)),
        ("nparts", ctypes.c_uint64),
        ("faults", ctypes.c_uint64),
        ("pending", ctypes.c_void_p),
        ("pending_len", ctypes.c_uint64),
        ("pending_cap", ctypes.c_uint64),
        ("jumps", ctypes.c_uint64),
        ("zero_bytes", ctypes.c_uint64),
    ]


REPLAY_DONE, REPLAY_STOPPED, REPLAY_EAGAIN, REPLAY_ERROR, REPLAY_HANDBACK = 0, 1, 2, 3, 4
#: Records one read of the replay's asks for (``UA_REPLAY_READ``): its hand-back holds them.
REPLAY_READ = 64
#: Whether the loaded library has ua_replay (a build older than its source has not).
HAS_REPLAY = hasattr(lib, "ua_replay") and hasattr(lib, "ua_replay_pause")
if HAS_REPLAY:
    lib.ua_replay.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(ReplayRun),
        ctypes.c_uint64,
        ctypes.POINTER(ReplayControl),
    ]
    lib.ua_replay.restype = ctypes.c_int
    for _name in ("ua_replay_quiesce", "ua_replay_pause", "ua_replay_resume"):
        getattr(lib, _name).argtypes = [ctypes.POINTER(ReplayControl)]
        getattr(lib, _name).restype = None
