"""The mutation catalogs (``tools/mutants``) stay pointed at real code.

A mutant whose line was edited away would be reported "broken" only when someone runs the
harness; this fails at once, naming the mutant, so a change to a module updates its
catalog in the same commit. (Running the mutants themselves takes minutes: see
``tools/mutants/run.py``.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "tools" / "mutants"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, MUTANTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the catalogs import ``mutant``
    spec.loader.exec_module(module)
    return module


def test_every_mutant_names_one_line_of_real_code_and_real_tests() -> None:
    load("mutant")
    run = load("run")
    mutants = run.load_catalogs()
    assert len(mutants) >= 100
    problems = []
    for mutant in mutants:
        path = ROOT / mutant.file
        count = path.read_text().count(mutant.old) if path.is_file() else -1
        if count != 1:
            problems.append(f"{mutant.id}: its line occurs {count} times in {mutant.file}")
        if mutant.old == mutant.new:
            problems.append(f"{mutant.id}: changes nothing")
        for test in mutant.tests:
            if not (ROOT / test.split("::")[0]).exists():
                problems.append(f"{mutant.id}: no test file {test}")
    assert problems == []
