"""``python -m uffd_async probe`` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import uffd_async as ua


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uffd_async", *args], capture_output=True, text=True, timeout=60
    )


def test_probe_text() -> None:
    result = run_cli("probe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("userfaultfd: available (")
    assert "features: " in result.stdout and "MISSING_SHMEM" in result.stdout
    assert "ioctls: " in result.stdout and "COPY" in result.stdout


def test_probe_json_matches_the_api() -> None:
    result = run_cli("probe", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    support = ua.probe()
    assert report["available"] is True
    assert report["method"] == support.method.value if support.method else None
    assert set(report["features"]) == {f.name for f in ua.Feature if f in support.features}


def test_unusable_probe_exits_1_with_the_remedy() -> None:
    """Every way in refused: exit status 1 and what to change."""
    code = (
        "import errno, os, sys\n"
        "from uffd_async import _open\n"
        "def refuse(method):\n"
        "    raise OSError(errno.EPERM, os.strerror(errno.EPERM))\n"
        "_open.open_raw = refuse\n"
        "from uffd_async.__main__ import main\n"
        "sys.exit(main(['probe']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "NOT available" in result.stdout
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in result.stdout


def test_usage_error() -> None:
    assert run_cli().returncode == 2
