"""The benchmark harness runs end to end, with every result checked, on small sizes.

Timings and ratios are never asserted: they belong to the machine, not the code.
What is asserted is that the harness exits 0 (so every page of every run held
the right contents) and reports the two baselines in every scenario (scenario 6,
restore to ready, measures the library's handlers against each other instead).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from uffd_async._core._loops import uvloop_available

ROOT = Path(__file__).parent.parent
BASELINES = {"c", "plain-python"}
#: The library's loops: asyncio, asyncio + uvloop (when installed) and trio.
LOOPS = ("asyncio", "uvloop", "trio") if uvloop_available() else ("asyncio", "trio")
LIBRARY = {f"uffd_async/{loop}" for loop in LOOPS}


@pytest.mark.skipif(shutil.which("cc") is None, reason="the benchmarks need a C compiler (cc)")
def test_quick_benchmark_checks_out() -> None:
    # Well inside the suite's 120 s deadline; the quick run takes seconds.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["quick"] is True
    assert report["machine"]["kernel"].startswith("Linux")
    scenarios = report["scenarios"]
    assert [s["key"] for s in scenarios] == [
        "1", "2", "3", "4", "4b", "5", "6", "7", "8", "9", "10", "11"
    ]  # fmt: skip
    for scenario in scenarios:
        if scenario["key"] == "11":  # a takeover: a peer process, the library's loops
            assert {r["loop"] for r in scenario["results"]} == set(LOOPS)
            assert all(
                r["takeover_max_ms"] > 0 and r["alone_max_ms"] > 0 for r in scenario["results"]
            )
            continue
        if scenario["key"] == "10":  # a shaped link (as root): a namespace, nginx, a proxy
            check_net_restore(scenario)
            continue
        if scenario["key"] == "9":  # two tenants: peer processes, the library's loops
            check_fairness(scenario)
            continue
        if scenario["key"] == "8":  # live snapshots: in-process writers, the library's loops
            check_live(scenario)
            continue
        if scenario["key"] == "7":  # restore from object storage: a peer process, HTTP
            check_http_restore(scenario, report["rounds"])
            continue
        if scenario["key"] == "6":  # restore to ready: a peer process, the library's servers
            check_restore(scenario, report["rounds"])
            continue
        if scenario["key"] == "4b":  # WP_ASYNC: the library's tracker only
            assert {r["runner"] for r in scenario["wp_async"]} == LIBRARY
            continue
        if scenario["key"] == "5":  # memory: the library's server only
            runs = scenario["memory"]
            assert {(r["backend"], r["resolver"]) for r in runs} == {
                (backend, kind) for backend in LOOPS for kind in ("inline", "awaiting")
            }
            assert all(r["faults"] > 0 for r in runs)
            continue
        assert scenario["cases"], scenario["key"]
        for case in scenario["cases"]:
            where = f"scenario {scenario['key']} {case['label']}"
            assert BASELINES | LIBRARY <= set(case["results"]), where
            for name in BASELINES | LIBRARY:
                samples = case["results"][name]["samples"]
                assert len(samples) == report["rounds"], where
                assert all(s["faults"] > 0 for s in samples), where


def check_restore(scenario: dict[str, Any], rounds: int) -> None:
    # The recording named every page the first process touched (the harness checks the
    # order too), and every handler and floor served (a) and (b) on every loop.
    assert scenario["recorded_pages"] == scenario["set_pages"] > 0
    results = {(r["backend"], r["workload"], r["handler"]): r for r in scenario["results"]}
    floors = {"floor_c", "floor_python", "floor_prefetch"}
    handlers = {"lazy", "readahead", "prefetch", "prefetch_loop", "prefetch_readahead", "reap"}
    handlers |= {"eager", "populate"}
    assert set(results) == {
        (backend, workload, handler)
        for backend in LOOPS
        for workload in ("a", "b")
        for handler in floors | handlers
    }
    for (backend, workload, handler), result in results.items():
        where = f"scenario 6 {backend} ({workload}) {handler}"
        assert len(result["samples"]) == rounds, where
        assert all(s["ready_ns"] > 0 for s in result["samples"]), where
        assert result["vs_floor"] > 0 and result["vs_reap"] > 0, where
        if handler == "floor_c":
            assert result["vs_floor"] == 1.0, where
        if handler == "reap":
            assert result["vs_reap"] == 1.0, where
        if handler in floors:  # the set alone, copied with no process and no fault
            assert result["faults"] == 0, where
            assert result["prefetched"] == scenario["set_pages"], where
        if handler == "lazy":  # one demand fault per page touched, nothing copied ahead
            assert result["faults"] == scenario["set_pages"], where
            assert result["prefetched"] == 0, where
        if handler in ("reap", "eager"):  # copied before the process could touch anything
            assert result["prefetched"] >= scenario["set_pages"], where
            if workload == "a" or handler == "eager":
                assert result["faults"] == 0, where
    assert {t["backend"] for t in scenario["targets"]} == set(LOOPS)
    check_zero_heavy(scenario["zero_heavy"], scenario["set_pages"], rounds)


def check_zero_heavy(zero: dict[str, Any], set_pages: int, rounds: int) -> None:
    # Both images, each with zero pages mapped and (the library has the switch) copied,
    # served lazily, eagerly and with prefetch + populate all, on every loop.
    assert zero["modes"] == ["zero_pages", "copied"]
    shares = {about["image"]: about for about in zero["images"]}
    assert set(shares) == {"memory", "guest"}
    assert 0.85 <= shares["guest"]["zero_pages"] <= 0.95  # 90% zeros, holes among them
    assert 0.3 <= shares["guest"]["holes"] < shares["guest"]["zero_pages"]
    results = {(r["backend"], r["image"], r["mode"], r["handler"]): r for r in zero["results"]}
    assert set(results) == {
        (backend, image, mode, handler)
        for backend in LOOPS
        for image in ("memory", "guest")
        for mode in ("zero_pages", "copied")
        for handler in ("lazy", "eager", "populate")
    }
    for (backend, image, mode, handler), result in results.items():
        where = f"scenario 6 zero-heavy {backend} {image} {mode} {handler}"
        assert len(result["samples"]) == rounds, where
        assert all(s["ready_ns"] > 0 for s in result["samples"]), where
        assert result["vs_copied"] > 0, where
        if handler == "lazy":  # every page of the set a demand fault, zero or not
            assert result["faults"] == set_pages, where
        if handler == "eager":  # everything in place before the process ran
            assert result["faults"] == 0, where


def check_http_restore(scenario: dict[str, Any], rounds: int) -> None:
    # Every runner served (a) and (b) on asyncio and trio (quick leaves uvloop out); the
    # recording named a page in every chunk the process touched (the harness checks it).
    # One thread reading in order faults once per chunk, and each such fault is one request.
    assert all(r["chunks"] > 0 for r in scenario["recordings"])
    pages, chunk = scenario["pages"], scenario["default_chunk_size"]
    results = {(r["backend"], r["workload"], r["kind"]): r for r in scenario["results"]}
    kinds = {"lazy", "prefetch", "per_page", "download"}
    assert set(results) == {
        (backend, workload, kind)
        for backend in ("asyncio", "trio")
        for workload in ("a", "b")
        for kind in kinds
    }
    for (backend, workload, kind), result in results.items():
        where = f"scenario 7 {backend} ({workload}) {kind}"
        touched = scenario["set_pages"] if workload == "a" else pages
        assert len(result["samples"]) == (1 if kind == "per_page" else rounds), where
        assert all(s["ready_ns"] > 0 for s in result["samples"]), where
        if kind in ("per_page", "download"):  # one fault per page (per-page: scaled up)
            assert result["faults"] == pytest.approx(touched), where
        if kind == "download":  # one request: the whole object
            assert result["requests"] == 1 and result["download_ms"] > 0, where
        if kind == "lazy" and workload == "b":
            chunks = -(-pages * 4096 // chunk)
            assert result["faults"] == chunks, where
            assert result["requests"] == chunks + 1, where  # and one to open the source
    assert {t["backend"] for t in scenario["targets"]} == {"asyncio", "trio"}


def check_net_restore(scenario: dict[str, Any]) -> None:
    # Not root: skipped, saying why. As root: the link had the shape asked for (the proxy's
    # 20 ms before a first byte is a floor, its 100 MB/s a ceiling: not the machine's
    # figures), every runner served every workload on asyncio and trio, the proxy counted
    # what crossed, and no namespace of a finished run is left behind.
    if os.geteuid() != 0:
        assert "root" in scenario["skipped"]
        return
    assert "skipped" not in scenario, scenario.get("skipped")
    shape = scenario["measured_shape"]
    assert shape["first_byte_ms"] >= 20.0
    assert 0 < shape["one_connection_mb_s"] <= 120
    assert 0 <= scenario["image"]["zero_pages"] <= 1 and scenario["image"]["mapped_bytes"] > 0
    plan = {
        "a": {"download", "lazy", "lazy_small", "prefetch", "object", "pack", "local"},
        "b": {"download", "lazy", "lazy_noahead", "prefetch", "object", "pack", "local"},
        "c": {"download", "lazy", "prefetch", "servers", "local"},
        "d": {"lazy", "cache", "local"},
        "e": {"download", "lazy", "pack", "local"},
    }
    skipped = set(scenario["skipped_runners"])
    results = {(r["backend"], r["workload"], r["runner"]): r for r in scenario["results"]}
    assert set(results) == {
        (backend, workload, runner)
        for backend in ("asyncio", "trio")
        for workload, runners in plan.items()
        for runner in runners - skipped
    }
    size = scenario["pages"] * 4096
    for (backend, workload, runner), result in results.items():
        where = f"scenario 10 {backend} ({workload}) {runner}"
        assert result["ms"] > 0, where
        if runner == "local":  # nothing crossed the link
            assert result["requests"] == 0 and result["most_fetches"] == 0, where
        elif runner == "download":  # 8 MiB parts, each fetched once, then served from a file
            assert result["requests"] == -(-size // (8 << 20)), where
            assert result["body_bytes"] >= size and result["most_fetches"] == 1, where
        elif runner == "cache":  # warm: every chunk from the host cache, none over the link
            assert result["requests"] == 0 and result["most_fetches"] == 0, where
            assert result["cold"]["requests"] > 0, where  # a fresh cache: the cold run fetched
        elif runner == "pack":  # zstd chunks: fewer bytes than the raw chunks
            raw = results[(backend, workload, "lazy")]
            assert 0 < result["body_bytes"] < raw["body_bytes"], where
        else:
            assert result["requests"] > 0 and result["link_bytes"] > 0, where
        if workload == "c" and runner != "local":  # one server for all: chunks fetched once
            assert result["most_fetches"] >= 1, where
        if runner == "lazy_noahead":  # one chunk in flight: as many faults as chunks
            assert result["faults"] >= -(-size // scenario["chunk_size"]), where
    assert {t["backend"] for t in scenario["targets"]} == {"asyncio", "trio"}
    assert not [name for name in _namespaces() if not _alive(int(name[len("uffdnet") :]))]


def _namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith("uffdnet") and name[7:].isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


LINK_UP = """
import sys, time
from pathlib import Path
from benchmarks._network import open_link
with open_link(Path(sys.argv[1])) as link:
    print(link.namespace, link.host_device, link.proxy_pid, link.nginx_pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="the shaped link needs root and tc"
)
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_the_link_is_removed_on_interrupt(tmp_path: Path, how: signal.Signals) -> None:
    # Ctrl-C (or a SIGTERM) while the link is up: the namespace, the veth pair, nginx and
    # the proxy are all gone once the process has exited.
    with subprocess.Popen(
        [sys.executable, "-c", LINK_UP, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            line = process.stdout.readline()
            assert line, process.stderr.read()
            namespace, device, proxy, nginx = line.split()
            assert namespace in _namespaces()
            process.send_signal(how)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert namespace not in _namespaces()
    shown = subprocess.run(["ip", "link", "show", device], capture_output=True)
    assert shown.returncode != 0
    assert not _alive(int(proxy)) and not _alive(int(nginx))


def check_live(scenario: dict[str, Any]) -> None:
    # The harness checked every image, the copy and the layer against the memory at their
    # instant; here: every method ran on every loop, the writers wrote, every page was saved,
    # and the layer held exactly the 5% of the pages the writers were given.
    methods = scenario["methods"]
    assert set(methods) == {"none", "stop-copy-resume"} | {
        f"{kind}/{loop}" for kind in ("live", "full", "layer") for loop in LOOPS
    }
    assert methods["none"]["writes_per_s"] > 0 and methods["stop-copy-resume"]["copy_ms"] > 0
    for loop in LOOPS:
        assert methods[f"live/{loop}"]["pages"] == scenario["pages"], loop
        assert methods[f"full/{loop}"]["pages"] == scenario["pages"], loop
        assert methods[f"layer/{loop}"]["pages"] == round(scenario["pages"] * 0.05), loop
    assert {t["loop"] for t in scenario["targets"]} == set(LOOPS)


def check_fairness(scenario: dict[str, Any]) -> None:
    # Every loop served the light peer alone and beside the storm (each of its pages
    # checked by the peer), the heavy one stormed, and each server came back from a cancel.
    assert {r["loop"] for r in scenario["results"]} == set(LOOPS)
    for result in scenario["results"]:
        assert result["light_faults"] == scenario["light_faults"] * scenario["rounds"]
        assert result["heavy_faults_per_s"] > 0 and result["cancel_ms"] >= 0
