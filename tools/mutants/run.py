"""Plant one-line bugs in a scratch copy of the tree and check that a test catches each.

Why: a suite that stays green when a plausible bug is planted does not vouch for the
code it covers. Each mutant (listed in the ``catalog_*.py`` modules beside this file)
names a file, a line's exact text (it must occur once), its replacement, and the tests
that should fail. Every mutant runs in its own copy of the tree under /tmp,
so the work tree is never touched and another run can go on beside it.

    .venv/bin/python tools/mutants/run.py                  # every catalog
    .venv/bin/python tools/mutants/run.py --only chunks    # mutants whose id starts so
    .venv/bin/python tools/mutants/run.py --list
    .venv/bin/python tools/mutants/run.py --rev HEAD       # a commit, not the work tree
    .venv/bin/python tools/mutants/run.py --file uffd_async/_remote/_chunks.py \\
        --old 'if x:' --new 'if not x:' tests/test_http_source.py

A mutant is *caught* when pytest exits non-zero. A hang (the per-mutant timeout, or the
suite's own per-test watchdog) is a failure too, but the summary counts it apart, since
a test that fails only by hanging should learn to fail by assertion.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mutant import Mutant

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
#: What faulthandler prints when tests/conftest.py's per-test watchdog ends a hung run.
WATCHDOG_FIRED = "Timeout ("
#: What the copy leaves out: built and cached things, and the history.
IGNORED = shutil.ignore_patterns(
    ".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.so"
)


def load_catalogs() -> list[Mutant]:
    mutants: list[Mutant] = []
    for path in sorted(HERE.glob("catalog_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        mutants.extend(module.MUTANTS)
    ids = [m.id for m in mutants]
    duplicated = {i for i in ids if ids.count(i) > 1}
    if duplicated:
        raise SystemExit(f"duplicate mutant ids: {sorted(duplicated)}")
    return mutants


def apply(tree: pathlib.Path, mutant: Mutant) -> None:
    path = tree / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.id}: {mutant.old!r} occurs {count} times in {mutant.file}")
    path.write_text(text.replace(mutant.old, mutant.new))


def copy_tree(tree: pathlib.Path, revision: str | None) -> None:
    """The work tree as it is, or (``revision``) a commit's files alone: then edits in
    progress beside the run cannot change its verdicts."""
    if revision is None:
        shutil.copytree(ROOT, tree, ignore=IGNORED)
        return
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)


def run_one(
    mutant: Mutant, python: str, keep: bool = False, revision: str | None = None
) -> tuple[str, float, str]:
    """Returns ("caught" | "hung" | "survived", seconds, pytest's last lines)."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"uffd-mutant-{mutant.id}-"))
    tree = scratch / "tree"
    try:
        copy_tree(tree, revision)
        apply(tree, mutant)
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
        command = [
            python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "-o", "addopts=-m 'not slow'", *mutant.extra_args, *mutant.tests,
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
                timeout=mutant.timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            return "hung", time.monotonic() - started, text[-400:]
        took = time.monotonic() - started
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        if WATCHDOG_FIRED in done.stderr or WATCHDOG_FIRED in done.stdout:
            return "hung", took, tail  # the suite's per-test watchdog ended the run
        if done.returncode == 0:
            return "survived", took, tail
        if done.returncode in (4, 5):  # usage error, or no test collected: the catalog is wrong
            return "broken", took, tail
        return "caught", took, tail
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def report(results: Iterable[tuple[Mutant, str, float, str]]) -> int:
    rows = list(results)
    counts: dict[str, int] = {}
    for mutant, outcome, took, tail in rows:
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{outcome:9} {took:6.1f}s  {mutant.id}: {mutant.why or mutant.file}")
        if outcome in ("survived", "broken", "hung"):
            print("          " + tail.replace("\n", "\n          "))
    total = len(rows)
    caught = counts.get("caught", 0) + counts.get("hung", 0)
    print(
        f"\n{total} mutants: {counts.get('caught', 0)} caught by a failing test, "
        f"{counts.get('hung', 0)} only by a timeout, {counts.get('survived', 0)} survived, "
        f"{counts.get('broken', 0)} broken; {caught}/{total} caught"
    )
    return 1 if counts.get("survived") or counts.get("broken") else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="id prefix (repeatable)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch trees")
    parser.add_argument(
        "--rev", help="plant into this commit's files (e.g. HEAD), not the work tree as it is"
    )
    parser.add_argument("--python", default=str(ROOT / ".venv/bin/python"))
    parser.add_argument("--file")
    parser.add_argument("--old")
    parser.add_argument("--new")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("tests", nargs="*")
    args = parser.parse_args(argv)
    if args.file:
        if args.old is None or args.new is None or not args.tests:
            parser.error("--file needs --old, --new and the tests to run")
        mutants = [Mutant("adhoc", args.file, args.old, args.new, args.tests, timeout=args.timeout)]
    else:
        mutants = load_catalogs()
        if args.only:
            mutants = [m for m in mutants if any(m.id.startswith(p) for p in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.id}: {m.file}: {m.why}")
        return 0
    results = []
    for mutant in mutants:
        outcome, took, tail = run_one(mutant, args.python, keep=args.keep, revision=args.rev)
        print(f"  {outcome:9} {took:6.1f}s {mutant.id}", flush=True)
        results.append((mutant, outcome, took, tail))
    print()
    return report(results)


if __name__ == "__main__":
    sys.exit(main())
