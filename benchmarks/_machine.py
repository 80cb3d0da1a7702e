"""Describes the machine a run was measured on, for the top of the report."""

from __future__ import annotations

import os
import platform

import uffd_async as ua

from ._build import compiler_version


def cpu_model() -> str:
    """The first ``model name`` in /proc/cpuinfo (or what platform knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict[str, str | int]:
    """Kernel, CPU, cores, Python, compiler, and how this process gets a uffd."""
    support = ua.probe()
    return {
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "compiler": compiler_version(),
        "uffd": support.method.value if support.method else f"unavailable: {support.reason}",
        "page_size": ua.PAGE_SIZE,
    }
