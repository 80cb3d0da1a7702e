"""Mutants of a source's outage policy: the wait-and-retry loop (_outage.py), where the
remote sources and packs meet it (_chunked_source.py, _pack_source.py), its metrics and its
flags (each catalog: one list named MUTANTS)."""

from mutant import Mutant

F = "uffd_async/_remote/_outage.py"
BASE = "uffd_async/_remote/_chunked_source.py"
PACK = "uffd_async/_remote/_pack_source.py"
T = "tests/test_source_outage.py"

MUTANTS = [
    Mutant(
        id="outage-never-waits",
        file=F,
        old="        return Unavailable(error)",
        new="        return error",
        tests=[f"{T}::test_a_store_gone_mid_restore_is_waited_out"],
        why="the default policy fails the fault at once: one store blip kills the guest",
    ),
    Mutant(
        id="outage-poison-policy-waits",
        file=F,
        old="        if not self.policy.waits:\n            return await get()",
        new="        if False:\n            return await get()",
        tests=[f"{T}::test_poison_fails_at_once"],
        why="--on-source-error poison waits anyway: fail-fast deployments hang for minutes",
    ),
    Mutant(
        id="outage-deadline-never-reached",
        file=F,
        old="                if demand and now - first >= self.policy.deadline:",
        new="                if False:",
        tests=[f"{T}::test_a_fault_backs_off_capped_until_its_deadline"],
        why="a fault waits on a dead source forever instead of getting SIGBUS",
    ),
    Mutant(
        id="outage-backoff-uncapped",
        file=F,
        old="                bound = min(self.policy.backoff_cap, _BACKOFF * 2**tries)",
        new="                bound = _BACKOFF * 2**tries",
        tests=[f"{T}::test_a_fault_backs_off_capped_until_its_deadline"],
        why="tries grow minutes apart: the guest waits long after the store is back",
    ),
    Mutant(
        id="outage-pause-overshoots-deadline",
        file=F,
        old="                    delay = min(delay, first + self.policy.deadline - now)",
        new="                    pass",
        tests=[f"{T}::test_a_fault_backs_off_capped_until_its_deadline"],
        why="the last pause runs past --source-deadline",
    ),
    Mutant(
        id="outage-prefetch-begins-it-early",
        file=F,
        old="                if demand or failures > retries:",
        new="                if demand or failures >= retries:",
        tests=[f"{T}::test_a_prefetch_waits_without_counting_as_a_fault"],
        why="a prefetch's blip within its retries is logged and counted as an outage",
    ),
    Mutant(
        id="outage-late-fault-not-counted",
        file=F,
        old="            if self.active:",
        new="            if False:",
        tests=[f"{T}::test_every_fault_waits_and_the_end_is_said_once"],
        why="faults that come during an outage are missing from the stuck-faults metric",
    ),
    Mutant(
        id="outage-logged-every-try",
        file=F,
        old="        elif now - self._reported >= _REPORT_EVERY:",
        new="        elif True:",
        tests=[f"{T}::test_every_fault_waits_and_the_end_is_said_once"],
        why="an outage floods the log with a line per try",
    ),
    Mutant(
        id="outage-recovery-wakes-nobody",
        file=F,
        old="            self._back.set()",
        new="            pass",
        tests=[f"{T}::test_a_recovery_wakes_every_sleeper_at_once"],
        why="faults sleep out their backoff after the store is back",
    ),
    Mutant(
        id="outage-stuck-gauge-leaks",
        file=F,
        old="                    self._stats.faults_waiting -= 1",
        new="                    pass",
        tests=[f"{T}::test_a_fault_backs_off_capped_until_its_deadline"],
        why="a poisoned fault stays counted as waiting: the gauge never returns to 0",
    ),
    Mutant(
        id="outage-demand-retries-in-its-slot",
        file=F,
        old='        return role == "demand" and not self.active',
        new='        return role == "demand"',
        tests=[f"{T}::test_prefetch_stands_down_and_resumes_after_the_demand"],
        why="in an outage each fetch sleeps through its quick retries holding a connection",
    ),
    Mutant(
        id="outage-chunked-retries-in-slot",
        file=BASE,
        old="                if not self._outage.quick_retry():  # it backs off outside its slot",
        new="                if False:",
        tests=[f"{T}::test_prefetch_stands_down_and_resumes_after_the_demand"],
        why="prefetches retry holding the connections the faults' retries need",
    ),
    Mutant(
        id="outage-chunked-never-ends",
        file=BASE,
        old="                self._outage.succeeded()",
        new="                pass",
        tests=[f"{T}::test_a_store_gone_mid_restore_is_waited_out"],
        why="the outage is never over: no recovery line, the outage seconds grow for ever",
    ),
    Mutant(
        id="outage-pack-io-not-waited",
        file=PACK,
        old="            raise self._outage.gave_up(exc) from None",
        new="            raise exc from None",
        tests=[f"{T}::test_a_packs_chunks_gone_for_a_while_are_waited_for"],
        why="an NFS cache tier that goes away for a moment kills every guest faulting on it",
    ),
    Mutant(
        id="outage-pack-never-ends",
        file=PACK,
        old="        self._outage.succeeded()",
        new="        pass",
        tests=[f"{T}::test_a_packs_chunks_gone_for_a_while_are_waited_for"],
        why="a pack's outage is never over: no recovery line",
    ),
    Mutant(
        id="outage-flags-taken-with-a-file",
        file="uffd_async/__main__.py",
        old="            if value is not None and not pack:",
        new="            if False:",
        tests=[f"{T}::test_the_flags_are_refused_where_nothing_is_fetched"],
        why="--on-source-error on a snapshot file is silently ignored",
    ),
    Mutant(
        id="outage-metrics-gauge-of-the-total",
        file="uffd_async/_handoff/_metrics.py",
        old="                    http.faults_waiting)  # fmt: skip",
        new="                    http.faults_waited)  # fmt: skip",
        tests=[f"{T}::test_the_command_line_waits_out_an_outage_and_says_so"],
        why="the stuck-faults gauge never falls back to 0 after an outage",
    ),
]
