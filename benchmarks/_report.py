"""Turns samples into medians, ratios to the C handler, a table and JSON.

Medians, not means: one run disturbed by the machine should not move the
result. Rates use the median time; "vs C" compares with the C handler's median
from the same invocation, so both saw the same machine state.
"""

from __future__ import annotations

import statistics
from typing import Any

import attrs

from ._run import Sample
from ._scenarios import ASYNC_LIMIT, Case, Scenario


@attrs.frozen(kw_only=True)
class Result:
    """One runner's samples for one case, and what they add up to."""

    runner: str
    pages: int
    samples: tuple[Sample, ...]

    @property
    def median_ns(self) -> float:
        return statistics.median(s.elapsed_ns for s in self.samples)

    @property
    def median_faults(self) -> float:
        return statistics.median(s.faults for s in self.samples)

    @property
    def pages_per_s(self) -> float:
        return self.pages / (self.median_ns / 1e9)

    @property
    def faults_per_s(self) -> float:
        return self.median_faults / (self.median_ns / 1e9)


@attrs.frozen(kw_only=True)
class CaseResult:
    case: Case
    results: tuple[Result, ...]

    def baseline(self, name: str) -> Result | None:
        return next((r for r in self.results if r.runner == name), None)


def ideal_pages_per_s(case: Case) -> float | None:
    """What an async server with ``ASYNC_LIMIT`` fetches in flight could reach (slow cases)."""
    return ASYNC_LIMIT * 1e6 / case.slow_us if case.slow_us else None


def vs(result: Result, baseline: Result | None) -> float | None:
    """Speed as a fraction of the baseline's: baseline time / this time."""
    if baseline is None:
        return None
    return baseline.median_ns / result.median_ns


HEADER = (
    f"  {'case':<20} {'runner':<20} {'time ms':>9} {'pages/s':>11} "
    f"{'faults':>8} {'faults/s':>11} {'vs C':>6}"
)


def table(scenario: Scenario, cases: list[CaseResult], baseline: str) -> str:
    """The scenario as a text table (one line per case and runner)."""
    lines = [f"{scenario.key}. {scenario.title}", f"   {scenario.note}"]
    if scenario.skipped:
        return "\n".join([*lines, f"   skipped: {scenario.skipped}"])
    lines.append(HEADER)
    for case_result in cases:
        base = case_result.baseline(baseline)
        for r in case_result.results:
            ratio = vs(r, base)
            lines.append(
                f"  {case_result.case.label:<20} {r.runner:<20} {r.median_ns / 1e6:>9.1f} "
                f"{r.pages_per_s:>11,.0f} {r.median_faults:>8,.0f} {r.faults_per_s:>11,.0f} "
                + (f"{ratio:>6.2f}" if ratio is not None else f"{'-':>6}")
            )
        ideal = ideal_pages_per_s(case_result.case)
        library = [r for r in case_result.results if r.runner.startswith("uffd_async/")]
        if ideal and library:
            shares = ", ".join(
                f"{r.runner.removeprefix('uffd_async/')} {r.pages_per_s / ideal:.2f}"
                for r in library
            )
            lines.append(f"  {'':<20} of the ideal {ideal:,.0f} pages/s: {shares}")
    return "\n".join(lines)


def scenario_json(scenario: Scenario, cases: list[CaseResult], baseline: str) -> dict[str, Any]:
    """The scenario for ``--json``: parameters, medians, ratios and every sample."""
    out: dict[str, Any] = {
        "key": scenario.key,
        "title": scenario.title,
        "note": scenario.note,
        "skipped": scenario.skipped,
        "cases": [],
    }
    for case_result in cases:
        base = case_result.baseline(baseline)
        out["cases"].append(
            {
                "label": case_result.case.label,
                "params": attrs.asdict(case_result.case),
                "results": {
                    r.runner: {
                        "median_ms": r.median_ns / 1e6,
                        "pages_per_s": r.pages_per_s,
                        "faults": r.median_faults,
                        "faults_per_s": r.faults_per_s,
                        "vs_c": vs(r, base),
                        "of_ideal": (
                            r.pages_per_s / ideal
                            if (ideal := ideal_pages_per_s(case_result.case))
                            else None
                        ),
                        "samples": [attrs.asdict(s) for s in r.samples],
                    }
                    for r in case_result.results
                },
            }
        )
    return out
