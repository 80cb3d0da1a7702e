"""UFFDIO_POISON: the access gets SIGBUS, so each case runs in a child process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

import uffd_async as ua

pytestmark = pytest.mark.skipif(
    not ua.probe().features & ua.Feature.POISON, reason="kernel lacks UFFDIO_POISON"
)

PRELUDE = """
import select, sys, threading
import uffd_async as ua
P = ua.PAGE_SIZE
uffd = ua.Userfaultfd.open(ua.Feature.POISON)
region = ua.Region.anonymous(2 * P)
ioctls = uffd.register(region.address, region.length)
assert ioctls & ua.Ioctl.POISON, ioctls
"""


def run_child(body: str) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_poisoning_a_blocked_fault_delivers_sigbus_to_the_toucher() -> None:
    result = run_child(
        """
        threading.Thread(target=ua.touch, args=(region.address + P, 1), daemon=True).start()
        assert select.select([uffd], [], [], 10)[0], "no fault"
        [fault] = uffd.read_events()
        print("faulted", fault.page == region.address + P, flush=True)
        print("poisoned", uffd.poison(fault.page, P), flush=True)
        threading.Event().wait(10)
        print("survived", flush=True)
        """
    )
    assert result.returncode == -signal.SIGBUS, (result.stdout, result.stderr)
    assert "faulted True" in result.stdout
    assert "survived" not in result.stdout


def test_poisoned_page_faults_with_sigbus_later() -> None:
    result = run_child(
        """
        print("poisoned", uffd.poison(region.address, P, wake=False) == P, flush=True)
        ua.touch(region.address, 1, write=False)
        print("survived", flush=True)
        """
    )
    assert result.returncode == -signal.SIGBUS, (result.stdout, result.stderr)
    assert "poisoned True" in result.stdout
    assert "survived" not in result.stdout


def test_poison_on_a_populated_page_is_page_exists() -> None:
    with ua.Userfaultfd.open() as uffd, ua.Region.anonymous(ua.PAGE_SIZE) as region:
        uffd.register(region.address, region.length)
        uffd.zeropage(region.address, region.length)
        with pytest.raises(ua.PageExists):
            uffd.poison(region.address, region.length)


def test_feature_sigbus_faults_without_a_handler() -> None:
    """With Feature.SIGBUS no event is queued: the toucher gets SIGBUS at once."""
    code = textwrap.dedent(
        """
        import uffd_async as ua
        uffd = ua.Userfaultfd.open(ua.Feature.SIGBUS)
        region = ua.Region.anonymous(ua.PAGE_SIZE)
        uffd.register(region.address, region.length)
        print("registered", flush=True)
        ua.touch(region.address, 1)
        print("survived", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGBUS, (result.stdout, result.stderr)
    assert "registered" in result.stdout and "survived" not in result.stdout
