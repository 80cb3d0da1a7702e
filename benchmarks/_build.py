"""Compiles the C side of the benchmarks (``benchmarks/c/*.c``) into ``benchmarks/_build/``.

It builds on every run, with the system compiler and ``-O2``, so the baseline
is always the committed source compiled for this machine, never a stale
object. Warnings are errors: every file must compile cleanly with
``-Wall -Wextra``. Most are libraries loaded with ctypes; scenario 6's
restored process (``restore_peer.c``) is a program of its own.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

HERE = pathlib.Path(__file__).parent
SOURCES = HERE / "c"
BUILD = HERE / "_build"
FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
LIBRARY_FLAGS = ("-shared", "-fPIC")


class BuildError(RuntimeError):
    """The C sources did not compile (the compiler's output is the message)."""


def compiler() -> str:
    """``$CC``, else ``cc``, else ``gcc``."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise BuildError("no C compiler found: install cc (gcc or clang) or set $CC")
    return found


def compiler_version() -> str:
    """The compiler's first ``--version`` line, for the machine report."""
    try:
        result = subprocess.run(
            [compiler(), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, BuildError, subprocess.TimeoutExpired):
        return "unknown"
    return (result.stdout.splitlines() or ["unknown"])[0]


def build(name: str, *, program: bool = False) -> pathlib.Path:
    """Compile ``c/<name>.c`` into ``_build/<name>.so`` (or, as a ``program``, into the
    executable ``_build/<name>``) and return its path.

    The library is written under a temporary name and renamed into place, so
    an interrupted build never leaves a half-written file to be loaded.
    """
    source = SOURCES / f"{name}.c"
    BUILD.mkdir(exist_ok=True)
    suffix = "" if program else ".so"
    target = BUILD / f"{name}{suffix}"
    partial = BUILD / f".{name}.{os.getpid()}{suffix}"
    flags = FLAGS if program else FLAGS + LIBRARY_FLAGS
    command = [compiler(), *flags, "-o", str(partial), str(source)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(command)} took longer than 120 s") from exc
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    os.replace(partial, target)
    return target
