"""Every example runs as shipped (smaller sizes, both backends)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_lazy_restore(backend: str) -> None:
    result = run(str(EXAMPLES / "lazy_restore.py"), "--backend", backend, "--size-mib", "32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every byte matches the snapshot: True" in result.stdout


@pytest.mark.parametrize("mode", ["fault", "async"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_write_tracking(mode: str, backend: str) -> None:
    result = run(
        str(EXAMPLES / "write_tracking.py"), "--mode", mode, "--backend", backend,
        "--pages", "512", "--writes", "2000",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "snapshot matches memory: True" in result.stdout


def test_fault_gate_example_is_a_passing_pytest_trio_test() -> None:
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "fault_gate.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
