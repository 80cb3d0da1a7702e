"""Scenario 10's snapshot: a real process's memory, not random bytes.

A Python process imports a set of standard modules and builds a heap (dicts of
records, strings, lists of numbers, compiled code, a JSON document), then waits;
as root we copy its memory: every readable region of /proc/PID/maps, in address
order, from /proc/PID/mem (pages that were never touched read as zeros, as they
would in a guest's snapshot), into one image, cut or padded with zeros to the
size asked for. The image is cached under ``benchmarks/_build/`` by a digest of
its recipe (this file's recipe, the size, the Python that ran it), so later runs
reuse it. :func:`describe_image` gives its zero-page share and its zstd ratio.

Kernel facts this module relies on:

* Reading /proc/PID/mem needs ptrace access to PID (root has it, for a child
  of ours); a region can still refuse a read (EIO: a guard page, a device
  mapping): such a piece is written as zeros.
* ``[vvar]``-like regions (vvar, vvar_vclock, vsyscall) are the kernel's, not
  the process's memory: they are left out.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._build import BUILD

PAGE = 4096
KERNEL_REGIONS = ("[vvar]", "[vvar_vclock]", "[vsyscall]")

#: What the imaged process does: imports these, then builds the heap below (seeded).
MODULES = (
    "asyncio", "json", "email.parser", "http.client", "xml.etree.ElementTree", "decimal",
    "sqlite3", "ssl", "unittest", "argparse", "typing", "dataclasses", "logging", "csv",
    "pathlib", "urllib.request", "zipfile", "tarfile", "pickle", "difflib", "statistics",
    "inspect", "ast", "tokenize", "concurrent.futures", "multiprocessing", "socket", "uuid",
)  # fmt: skip
#: SCALE (1.0 for the full image) sizes it: about 200 MiB of heap at 1.0.
HEAP = """
import random, json, string
rng = random.Random(10)
n = lambda count: max(1, int(count * SCALE))
words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 12)))
         for _ in range(n(50_000))]
records = {i: {"id": i, "name": rng.choice(words) + " " + rng.choice(words),
               "score": rng.random() * 100, "tags": [rng.choice(words) for _ in range(4)],
               "active": rng.random() < 0.5}
           for i in range(n(300_000))}
numbers = [rng.randint(0, 1 << 40) for _ in range(n(2_000_000))]
floats = [rng.gauss(0.0, 1.0) for _ in range(n(1_000_000))]
text = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(n(100_000))]
document = json.dumps([records[i] for i in range(0, len(records), 7)])
code = [compile(f"def f{i}(x):\\n    return x * {i} + len({rng.choice(words)!r})", "<gen>", "exec")
        for i in range(n(5_000))]
"""
RECIPE_VERSION = 1


def recipe(size: int, scale: float) -> dict[str, Any]:
    return {
        "version": RECIPE_VERSION,
        "size": size,
        "scale": scale,
        "modules": MODULES,
        "heap": HEAP,
        "python": sys.version,
    }


def _child_program(scale: float) -> str:
    imports = "".join(f"import {name}\n" for name in MODULES)
    wait = "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
    return imports + f"SCALE = {scale!r}\n" + HEAP + wait


def _regions(pid: int) -> list[tuple[int, int]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        span, perms = fields[0], fields[1]
        name = fields[5] if len(fields) > 5 else ""
        if "r" not in perms or name in KERNEL_REGIONS:
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        out.append((start, end))
    return out


def _copy_memory(pid: int, destination: Path, size: int) -> dict[str, int]:
    """Readable regions of ``pid`` into ``destination``, in address order, up to ``size``."""
    written = unreadable = 0
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        with open(destination, "wb") as out:
            for start, end in _regions(pid):
                at = start
                while at < end and written < size:
                    length = min(end - at, 1 << 20, size - written)
                    try:
                        data = os.pread(fd, length, at)
                    except OSError:
                        data = b""
                    if len(data) < length:
                        unreadable += length - len(data)
                        data += bytes(length - len(data))
                    out.write(data)
                    written += length
                    at += length
            mapped = written
            out.truncate(size)  # padded with zeros (a sparse tail) when the process is smaller
    finally:
        os.close(fd)
    return {"mapped_bytes": mapped, "unreadable_bytes": unreadable}


def memory_image(size: int, scale: float = 1.0) -> tuple[Path, dict[str, Any]]:
    """The cached image of ``size`` bytes (built now if missing) and how it was made;
    ``scale`` sizes the process's heap (small for a quick run)."""
    if size % PAGE:
        raise ValueError(f"the image's size must be a multiple of {PAGE}")
    digest = hashlib.sha256(json.dumps(recipe(size, scale), sort_keys=True).encode()).hexdigest()[
        :16
    ]
    BUILD.mkdir(exist_ok=True)
    path = BUILD / f"memory-image-{digest}.mem"
    about = BUILD / f"memory-image-{digest}.json"
    if path.exists() and about.exists():
        return path, json.loads(about.read_text())
    child = subprocess.Popen(
        [sys.executable, "-c", _child_program(scale)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError("the process to image did not start")
        partial = path.with_suffix(f".{os.getpid()}.partial")
        copied = _copy_memory(child.pid, partial, size)
    finally:
        child.kill()
        child.wait()
    os.replace(partial, path)
    made = {**copied, "digest": digest, "modules": len(MODULES), "scale": scale}
    about.write_text(json.dumps(made))
    return path, made


def _zstd_module() -> Any:
    for name in ("compression.zstd", "backports.zstd", "zstandard"):
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    return None, None


def describe_image(path: Path, chunk_size: int = 1 << 20) -> dict[str, Any]:
    """Zero-page share, and the zstd ratio (level 3) of each ``chunk_size`` chunk
    compressed alone (as a pack would), all-zero chunks left out; with no zstd module
    importable, the whole file through the ``zstd`` command, or nothing (and why)."""
    data = path.read_bytes()
    zero_page = bytes(PAGE)
    pages = len(data) // PAGE
    zeros = sum(1 for i in range(pages) if data[i * PAGE : (i + 1) * PAGE] == zero_page)
    zero_chunk = bytes(chunk_size)
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    stored = [c for c in chunks if c != zero_chunk[: len(c)]]
    out: dict[str, Any] = {
        "bytes": len(data),
        "zero_pages": zeros / pages if pages else 0.0,
        "zero_chunks": 1 - len(stored) / len(chunks) if chunks else 0.0,
        "chunk_size": chunk_size,
    }
    name, module = _zstd_module()
    if module is not None:
        if name == "zstandard":
            compressor = module.ZstdCompressor(level=3)
            packed = sum(len(compressor.compress(c)) for c in stored)
        else:
            packed = sum(len(module.compress(c, level=3)) for c in stored)
        out["zstd"] = {
            "how": f"{name}, level 3, each non-zero chunk alone",
            "ratio": len(data) / max(packed, 1),
            "packed_bytes": packed,
        }
    elif shutil.which("zstd"):
        result = subprocess.run(
            ["zstd", "-3", "-c", "-q", str(path)], capture_output=True, timeout=300
        )
        packed = len(result.stdout)
        out["zstd"] = {
            "how": "no zstd module importable (backports.zstd, zstandard); the zstd command, "
            "level 3, the whole file",
            "ratio": len(data) / max(packed, 1),
            "packed_bytes": packed,
        }
    else:
        out["zstd"] = {"how": "no zstd module importable and no zstd command: not measured"}
    return out
