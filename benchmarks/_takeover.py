"""Scenario 11: a successor takes over from a running server under a steady fault stream.

A peer process (``tests/_takeover_peer.py``, the one the takeover tests use)
hands its memory over, forks, and parent and child each read a page every
``INTERVAL`` seconds (every page checked against the snapshot), timing each
access on their own clock. Measured, per loop (asyncio, uvloop when installed,
trio), alternately each round: the longest single access with one server
throughout, and with a successor (``HandoffServer(..., takeover=True)``, in the
same process and loop: the old one stops, hands everything over, and returns)
taking over a third of the way into the stream. The figure: the longest wait
across a takeover, as a ratio to the longest wait without one.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

import uffd_async as ua

from ._live import _run, loops
from ._restore import _write_snapshot

PAGES = 4096
QUICK_PAGES = 512
INTERVAL = 0.0002
_ROOT = Path(__file__).resolve().parent.parent


class TakeoverFailed(RuntimeError):
    """The peer read a wrong page, the handover did not happen, or a timeout."""


async def _peer_round(where: Path, pages: int, timeout: float, takeover: bool) -> dict[str, Any]:
    path = where / "t.sock"
    snapshot = where / "snapshot.mem"
    config = {"socket": str(path), "snapshot": str(snapshot), "pages": pages, "interval": INTERVAL}
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            first = ua.HandoffServer(path, snapshot)
            returned = anyio.Event()

            async def serve_first(*, task_status: Any) -> None:
                await first.serve(task_status=task_status)
                returned.set()

            await tg.start(serve_first)
            process = await anyio.open_process(
                [sys.executable, "-m", "tests._takeover_peer", json.dumps(config)], cwd=_ROOT
            )
            async with process:
                assert process.stdout is not None
                lines = _lines(process.stdout)
                if await anext(lines) != "ready":
                    raise TakeoverFailed("the peer did not get ready")
                switch_ms = 0.0
                if takeover:
                    await anyio.sleep(pages * INTERVAL / 2 / 3)  # a third of each half's stream
                    began = anyio.current_time()
                    second = ua.HandoffServer(path, snapshot, takeover=True)
                    await tg.start(second.serve)
                    await returned.wait()
                    switch_ms = (anyio.current_time() - began) * 1e3
                output = [line async for line in lines]
                if await process.wait() != 0 or output[-1:] != ["ok"]:
                    raise TakeoverFailed(f"the peer failed: {output}")
            if takeover and not first.handed_over:
                raise TakeoverFailed("the first server did not hand over")
            tg.cancel_scope.cancel()
    longest = next(int(line.split()[1]) for line in output if line.startswith("max_ns"))
    return {"max_ns": longest, "switch_ms": switch_ms}


async def _lines(stream: Any) -> Any:
    buffered = b""
    async for chunk in stream:
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            yield line.decode()


def measure(*, quick: bool, rounds: int, timeout: float) -> dict[str, Any]:
    """Without and with a takeover, on every loop, ``rounds`` times, alternately."""
    pages = QUICK_PAGES if quick else PAGES
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    samples: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="uffd-bench-takeover-", dir=shm) as where:
        place = Path(where)
        _write_snapshot(place / "snapshot.mem", pages)
        for _ in range(rounds):
            for name, loop in loops().items():
                try:
                    alone = _run(_peer_round, place, pages, timeout, False, loop=loop)
                    across = _run(_peer_round, place, pages, timeout, True, loop=loop)
                except TakeoverFailed:
                    raise
                except Exception as exc:
                    raise TakeoverFailed(f"scenario 11 on {name}: {exc!r}") from exc
                samples.setdefault(name, []).append((alone, across))
    results = []
    for name, runs in samples.items():
        alone_ms = max(a["max_ns"] for a, _ in runs) / 1e6
        across_ms = max(b["max_ns"] for _, b in runs) / 1e6
        results.append(
            {
                "loop": name,
                "alone_max_ms": alone_ms,
                "takeover_max_ms": across_ms,
                "ratio": across_ms / alone_ms,
                "switch_ms": statistics.median(b["switch_ms"] for _, b in runs),
            }
        )
    return {
        "key": "11",
        "title": "Takeover under a steady fault stream",
        "pages": pages,
        "interval_ms": INTERVAL * 1e3,
        "rounds": rounds,
        "results": results,
    }


def takeover_table(report: dict[str, Any]) -> str:
    lines = [
        "11. Takeover under a steady fault stream",
        f"   a peer and its fork child read {report['pages']:,} pages, one every "
        f"{report['interval_ms']:g} ms each, every page checked; a successor takes over a third "
        "of the way in",
        "   ms: the longest single access (the peer's clock), over all rounds; x: with / without; "
        "switch: the successor's start to the old server's return (median)",
        f"  {'loop':<8} {'without':>9} {'takeover':>9} {'x':>6} {'switch ms':>10}",
    ]
    for r in report["results"]:
        lines.append(
            f"  {r['loop']:<8} {r['alone_max_ms']:>9.2f} {r['takeover_max_ms']:>9.2f} "
            f"{r['ratio']:>5.1f}x {r['switch_ms']:>10.1f}"
        )
    return "\n".join(lines)
