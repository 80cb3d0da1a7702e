# Benchmarks: how fast is a Python userfaultfd handler, next to the C one everyone writes?
#
# What is measured: a C workload (T pthreads, called through ctypes so it never holds
# the GIL) touches every page of a freshly registered region once, and a handler serves
# the faults. The time is taken inside C, from the release of the threads to the end of
# the last one. Handlers ("runners"): `c`, a reference handler in C (benchmarks/c/
# handler.c, one thread: poll, read a batch, one ioctl per fault, as the Rust and Go
# crates and Firecracker's examples do); `plain-python`, the same written in plain
# Python in a thread; and the uffd_async runners, plugged in through
# benchmarks/_async.py. Scenarios: lazy population from memory, the same with
# readahead, a slow source (1 ms per page fetch), write tracking, memory, and
# restore to ready (a separate process touching a boot-like working set, served
# lazily, with readahead, with a recorded working set prefetched, and copied
# first; benchmarks/_restore.py), and restore from object storage (the same process
# served from a snapshot on a loopback HTTP server; benchmarks/_http_restore.py), and
# over a link shaped like a real network (a real memory image in nginx behind 20 ms to
# the first byte, 100 MB/s a connection, 1 Gbit/s; as root; benchmarks/_net_restore.py),
# live snapshots of memory that C threads keep writing (benchmarks/_live.py), and two
# tenants on one loop, one faulting without pause (benchmarks/_fairness.py), and a
# successor taking over from a running server under a steady fault stream
# (benchmarks/_takeover.py).
# Each case runs every runner alternately for several rounds; the table shows medians
# and each runner's speed as a fraction of the C handler's in the same invocation.
# After every run, every page is checked against the source (or, for write tracking,
# every written page must have been reported); a wrong result exits non-zero.
#
# Run it from the repository root:
#   make bench                          (= python -m benchmarks)
#   python -m benchmarks --quick        (small sizes, 1 round: seconds)
#   python -m benchmarks --json --rounds 5 --scenario 1 --runner c --runner plain-python
"""Command line: runs the scenarios and prints the table (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import uffd_async as ua

from ._build import BuildError
from ._c import native
from ._fairness import FairnessFailed, fairness_table
from ._fairness import measure as measure_fairness
from ._http_restore import http_restore_table
from ._http_restore import measure as measure_http_restore
from ._job import Runner
from ._live import LiveFailed, live_table
from ._live import measure as measure_live
from ._machine import describe
from ._memory import measure, memory_table
from ._net_restore import measure as measure_net_restore
from ._net_restore import net_restore_table
from ._report import CaseResult, Result, scenario_json, table
from ._restore import RestoreFailed, restore_table
from ._restore import measure as measure_restore
from ._run import RunFailed, RunnerSkipped, Sample, run_once
from ._runners import BASELINE, all_runners
from ._scenarios import Scenario, scenarios
from ._takeover import TakeoverFailed, takeover_table
from ._takeover import measure as measure_takeover
from ._wpasync import measure as measure_wp_async
from ._wpasync import wp_async_table

#: Scenarios measured by a harness of their own: (measure, table, its failure types).
STANDALONE: dict[str, tuple[Any, Any, tuple[type[Exception], ...]]] = {
    "6": (measure_restore, restore_table, (RestoreFailed,)),
    "7": (measure_http_restore, http_restore_table, (RestoreFailed,)),
    "8": (measure_live, live_table, (LiveFailed,)),
    "9": (measure_fairness, fairness_table, (FairnessFailed,)),
    "10": (measure_net_restore, net_restore_table, (RestoreFailed,)),
    "11": (measure_takeover, takeover_table, (TakeoverFailed,)),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure userfaultfd fault handlers: C, plain Python, uffd_async.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 round")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3, quick 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--scenario", action="append", metavar="KEY", help="run only these (1-11; repeatable)"
    )
    parser.add_argument(
        "--runner", action="append", metavar="NAME", help="run only these (repeatable)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one run may take (default 120)"
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1 or args.timeout <= 0:
        parser.error("--rounds and --timeout must be positive")
    known = all_runners()
    for name in args.runner or ():
        if name not in known:
            parser.error(f"unknown runner {name!r}; known: {', '.join(known)}")
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    support = ua.probe()
    if not support.available:
        warn(f"userfaultfd is not usable here: {support.reason}")
        return 2
    runners = {n: r for n, r in all_runners().items() if not args.runner or n in args.runner}
    chosen = [s for s in scenarios(quick=args.quick) if not args.scenario or s.key in args.scenario]
    machine = describe()
    if not args.json:
        say(" | ".join(f"{key}: {value}" for key, value in machine.items()))
        say(
            f"rounds: {args.rounds} (medians) | vs C: speed as a fraction of the C handler's "
            "(C time / runner time)"
        )
    try:
        native()  # compile before anything is measured
    except BuildError as exc:
        warn(f"FAILED: {exc}")
        return 1
    skipped: dict[str, str] = {}
    report: list[dict[str, Any]] = []
    most = max((c.pages for s in chosen for c in s.cases), default=1)
    with ua.Region.anonymous(most * ua.PAGE_SIZE) as source:
        native().fill_pattern(source.address, most, ua.PAGE_SIZE)
        for scenario in chosen:
            began = time.monotonic()
            if scenario.key == "5":
                try:
                    results = measure(quick=args.quick)
                except RuntimeError as exc:  # a page that does not hold its source bytes
                    warn(f"FAILED: {exc}")
                    return 1
                report.append({"key": "5", "title": scenario.title, "memory": results})
                if not args.json:
                    say()
                    say(memory_table(results))
                    say(f"   ({time.monotonic() - began:.1f} s)")
                continue
            standalone = STANDALONE.get(scenario.key)
            if standalone is not None:  # a scenario with a harness of its own
                measure_it, show, failures = standalone
                caught: tuple[type[Exception], ...] = (*failures, BuildError)
                try:
                    result = measure_it(quick=args.quick, rounds=args.rounds, timeout=args.timeout)
                except caught as exc:
                    warn(f"FAILED: {exc}")
                    return 1
                report.append(result)
                if not args.json:
                    say()
                    say(show(result))
                    say(f"   ({time.monotonic() - began:.1f} s)")
                continue
            try:
                cases = run_scenario(scenario, runners, skipped, source, args)
            except RunFailed as exc:
                warn(f"FAILED: {exc}")
                return 1
            took = time.monotonic() - began
            report.append({**scenario_json(scenario, cases, BASELINE), "wall_s": took})
            if not args.json:
                say()
                say(table(scenario, cases, BASELINE))
                if scenario.cases:
                    say(f"   ({took:.1f} s with setup and checks)")
            if scenario.key == "4":
                first = scenario.cases[0]
                try:
                    wp_async = measure_wp_async(
                        first.pages, first.threads, args.rounds, source.address
                    )
                except RuntimeError as exc:  # a page not collected, or without its write
                    warn(f"FAILED: {exc}")
                    return 1
                c_rate = _baseline_rate(cases[0])
                report.append(
                    {"key": "4b", "wp_async": wp_async, "c_fault_mode_pages_per_s": c_rate}
                )
                if not args.json:
                    say()
                    say(wp_async_table(wp_async, c_rate))
    if args.json:
        out = {
            "machine": machine,
            "rounds": args.rounds,
            "quick": args.quick,
            "baseline": BASELINE,
            "skipped_runners": skipped,
            "scenarios": report,
        }
        say(json.dumps(out, indent=2))
    elif skipped:
        say()
        for name, reason in skipped.items():
            say(f"skipped runner {name}: {reason}")
    return 0


def _baseline_rate(case: CaseResult) -> float | None:
    baseline = case.baseline(BASELINE)
    return baseline.pages_per_s if baseline else None


def run_scenario(
    scenario: Scenario,
    runners: dict[str, Runner],
    skipped: dict[str, str],
    source: ua.Region,
    args: argparse.Namespace,
) -> list[CaseResult]:
    """Every case of the scenario, every runner alternately, ``args.rounds`` times."""
    out: list[CaseResult] = []
    for case in scenario.cases:
        samples: dict[str, list[Sample]] = {}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                if name in skipped:
                    continue
                try:
                    sample = run_once(name, runner, scenario.key, case, source, args.timeout)
                except RunnerSkipped as exc:
                    skipped[name] = str(exc)
                    if args.json:
                        warn(f"skipping runner {name}: {exc}")
                    continue
                samples.setdefault(name, []).append(sample)
        results = tuple(
            Result(runner=name, pages=case.pages, samples=tuple(runs))
            for name, runs in samples.items()
        )
        out.append(CaseResult(case=case, results=results))
    return out


if __name__ == "__main__":
    sys.exit(main())
